"""The history query service's pure parts: HistoryStore (services/history/store.py) reads
rows in any order and more than once as `streams.history.resolve` does, and
`routes.answer` gives each lookup its status and reason."""
from __future__ import annotations

import random

import pytest

from services.history.routes import BadTime, answer, parse_time
from services.history.store import HistoryStore
from streams.debezium import ChangeEvent
from streams.history import TableHistory, resolve

T = 1_795_000_000_000
MIN = 60_000


def ev(op, pos, minute, plan=None):
    return ChangeEvent("public.subscriptions", {"id": 1}, "1", op, {"id": 1} if op == "d" else None,
                       None if op == "d" else {"id": 1, "plan": plan}, T + minute * MIN, (pos, pos),
                       f"lsn {pos}", None, "postgresql")


@pytest.fixture
def rows():
    history, out = TableHistory(), []
    for e in [ev("c", 10, 0, "basic"), ev("u", 20, 10, "pro"), ev("d", 40, 30),
              ev("u", 15, 5, "team")]:    # the last one late: re-cuts the versions around it
        out += history.apply(e).versions
    return out


def test_store_resolves_like_resolve_whatever_the_order_and_repeats(rows):
    shuffled = rows + rows[:3]
    random.Random(1).shuffle(shuffled)
    store = HistoryStore()
    for row in shuffled:
        store.add("subscriptions", row)
    assert store.history("subscriptions", "1") == resolve(rows)["1"]
    assert store.history("subscriptions", "2") is None and store.history("other", "1") is None


@pytest.mark.parametrize("as_of, status, plan, reason", [
    (None, 200, None, None),
    (str(T - 1), 404, None, "did not exist yet"),
    (str(T), 200, "basic", None),
    ("2026-11-18T11:12:40Z", 200, "team", None),           # T + 6 min, in the late version
    ("2026-11-18T11:17:40", 200, "pro", None),             # naive = UTC; T + 11 min
    (str(T + 30 * MIN), 404, None, "was deleted"),
    ("not a time", 400, None, "ISO-8601"),
])
def test_answers(rows, as_of, status, plan, reason):
    store = HistoryStore()
    for row in rows:
        store.add("subscriptions", row)
    got_status, body = answer(store, "subscriptions", "1", as_of)
    assert got_status == status
    if plan is not None:
        assert body["version"]["row"]["plan"] == plan
    if reason is not None:
        assert reason in body["error"]
    if as_of is None:
        assert [v["row"]["plan"] for v in body["versions"]] == ["basic", "team", "pro", "pro"]


def test_unknown_table_and_key(rows):
    store = HistoryStore()
    store.add("subscriptions", rows[0])
    assert answer(store, "nope", "1", None)[0] == 404
    assert "no history for key" in answer(store, "subscriptions", "9", None)[1]["error"]


def test_parse_time():
    assert parse_time("1795000000000") == 1_795_000_000_000
    assert parse_time("2026-11-18T11:06:40+00:00") == parse_time("2026-11-18T11:06:40Z") == T
    with pytest.raises(BadTime):
        parse_time("2026-13-01")
