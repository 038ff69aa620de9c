"""SCD2 history rules of streams/history.py as tables of event sequences, the records it
emits, as-of lookups at their boundaries, and a property-style check: any shuffled,
duplicated delivery of a change stream yields the history of the ordered one."""
from __future__ import annotations

import json
import random
import typing
from pathlib import Path

import fastjsonschema
import pytest

from schemas import json_schema
from schemas.history import HistoryRow
from streams.debezium import ChangeEvent, decode, key_id
from streams.history import (UNAVAILABLE, HistoryConfig, Outputs, TableHistory, as_of, resolve,
                             same_row, version_at)

MIN = 60_000
T0 = 1_795_000_000_000
TABLE = "public.subscriptions"
FIXTURES = Path(__file__).parent / "fixtures" / "debezium"


def ev(key, op: str, pos, minute: float, plan: str | None = None, *, row: dict | None = None,
       before: dict | None = None, moved_to=None, moved_from=None) -> ChangeEvent:
    """A decoded change event; `pos` is an LSN (commit LSN equal) or a (commit, lsn) pair."""
    k = {"id": key}
    position = (pos, pos) if isinstance(pos, int) else tuple(pos)
    after = None
    if op in ("c", "u", "r"):
        after = {"id": key, "plan": plan} if row is None else {"id": key, **row}
    if op == "d" and before is None:
        before = {"id": key, "plan": None}     # REPLICA IDENTITY DEFAULT: only the key
    return ChangeEvent(TABLE, k, key_id(k), op, before, after, int(T0 + minute * MIN), position,
                       f"lsn {position[1]}", f"tx{position[0]}", "postgresql",
                       moved_to=moved_to, moved_from=moved_from)


def run(events, config: HistoryConfig = HistoryConfig()) -> tuple[list[HistoryRow], Outputs, TableHistory]:
    table, total = TableHistory(config), Outputs()
    for event in events:
        table.apply(event, total)
    return total.versions, total, table


def summary(rows) -> list[tuple]:
    """(key, op, valid_from minute, valid_to minute or None, deleted, plan) of the resolved history."""
    return [(v["key_id"], v["op"], (v["valid_from"] - T0) / MIN,
             None if v["valid_to"] is None else (v["valid_to"] - T0) / MIN, v["is_deleted"],
             (v["row"] or {}).get("plan"))
            for _, versions in sorted(resolve(rows).items()) for v in versions]


# (reason, events, resolved history, duplicates)
CASES = [
    ("an insert opens a version, an update closes it at the update's commit time",
     [ev(1, "c", 10, 0, "basic"), ev(1, "u", 20, 5, "pro")],
     [("1", "c", 0, 5, False, "basic"), ("1", "u", 5, None, False, "pro")], 0),
    ("the same position twice is a duplicate: ignored",
     [ev(1, "c", 10, 0, "basic"), ev(1, "u", 20, 5, "pro"), ev(1, "u", 20, 5, "pro"),
      ev(1, "c", 10, 0, "basic")],
     [("1", "c", 0, 5, False, "basic"), ("1", "u", 5, None, False, "pro")], 2),
    ("an event older than the current version is placed in history, not applied as current",
     [ev(1, "c", 10, 0, "basic"), ev(1, "u", 30, 9, "team"), ev(1, "u", 20, 5, "pro")],
     [("1", "c", 0, 5, False, "basic"), ("1", "u", 5, 9, False, "pro"),
      ("1", "u", 9, None, False, "team")], 0),
    ("an event older than everything becomes the first version",
     [ev(1, "u", 20, 5, "pro"), ev(1, "c", 10, 0, "basic")],
     [("1", "c", 0, 5, False, "basic"), ("1", "u", 5, None, False, "pro")], 0),
    ("commit LSN orders interleaved transactions (the later commit has the smaller LSN)",
     [ev(1, "c", (100, 300), 0, "basic"), ev(1, "u", (400, 250), 1, "pro")],
     [("1", "c", 0, 1, False, "basic"), ("1", "u", 1, None, False, "pro")], 0),
    ("a snapshot read seeds the history",
     [ev(1, "r", 10, 0, "basic"), ev(2, "r", 10, 0, "pro")],
     [("1", "r", 0, None, False, "basic"), ("2", "r", 0, None, False, "pro")], 0),
    ("a read identical to the current row is not a new version (r after c)",
     [ev(1, "c", 10, 0, "basic"), ev(1, "r", 50, 9, "basic")],
     [("1", "c", 0, None, False, "basic")], 0),
    ("a read that differs is a change the stream missed: a version with op r",
     [ev(1, "c", 10, 0, "basic"), ev(1, "r", 50, 9, "pro")],
     [("1", "c", 0, 9, False, "basic"), ("1", "r", 9, None, False, "pro")], 0),
    ("a read made identical to its predecessor by a late update is retracted",
     [ev(1, "c", 10, 0, "basic"), ev(1, "r", 50, 9, "pro"), ev(1, "u", 30, 5, "pro")],
     [("1", "c", 0, 5, False, "basic"), ("1", "u", 5, None, False, "pro")], 0),
    ("a read after a delete re-creates the row",
     [ev(1, "c", 10, 0, "basic"), ev(1, "d", 20, 5), ev(1, "r", 50, 9, "basic")],
     [("1", "c", 0, 5, False, "basic"), ("1", "d", 5, 9, True, "basic"),
      ("1", "r", 9, None, False, "basic")], 0),
    ("a delete closes the version and opens a deleted marker with the last image; "
     "its tombstone changes nothing",
     [ev(1, "c", 10, 0, "basic"), ev(1, "d", 20, 5), None],
     [("1", "c", 0, 5, False, "basic"), ("1", "d", 5, None, True, "basic")], 0),
    ("insert again after a delete",
     [ev(1, "c", 10, 0, "basic"), ev(1, "d", 20, 5), None, ev(1, "c", 30, 7, "pro")],
     [("1", "c", 0, 5, False, "basic"), ("1", "d", 5, 7, True, "basic"),
      ("1", "c", 7, None, False, "pro")], 0),
    ("a late delete is placed before the later insert",
     [ev(1, "c", 10, 0, "basic"), ev(1, "c", 30, 7, "pro"), ev(1, "d", 20, 5)],
     [("1", "c", 0, 5, False, "basic"), ("1", "d", 5, 7, True, "basic"),
      ("1", "c", 7, None, False, "pro")], 0),
    ("a delete of a row never seen is a marker alone (its before image)",
     [ev(1, "d", 20, 5, before={"id": 1, "plan": "gone"})],
     [("1", "d", 5, None, True, "gone")], 0),
    ("a primary-key change: a delete on the old key and a create on the new one",
     [ev(2, "c", 10, 0, "pro"), ev(2, "d", 20, 5, moved_to="20"), None,
      ev(20, "c", 20, 5, "pro", moved_from="2")],
     [("2", "c", 0, 5, False, "pro"), ("2", "d", 5, None, True, "pro"),
      ("20", "c", 5, None, False, "pro")], 0),
    ("commit clocks that step back do not make valid time run backwards",
     [ev(1, "c", 10, 5, "basic"), ev(1, "u", 20, 3, "pro"), ev(1, "u", 30, 8, "team")],
     [("1", "c", 5, 5, False, "basic"), ("1", "u", 5, 8, False, "pro"),
      ("1", "u", 8, None, False, "team")], 0),
    ("two commits in the same millisecond: the earlier version lasts zero time",
     [ev(1, "c", 10, 0, "basic"), ev(1, "u", 20, 0, "pro")],
     [("1", "c", 0, 0, False, "basic"), ("1", "u", 0, None, False, "pro")], 0),
    ("an update that changes nothing is still a version (Debezium saw an UPDATE run)",
     [ev(1, "c", 10, 0, "basic"), ev(1, "u", 20, 5, "basic")],
     [("1", "c", 0, 5, False, "basic"), ("1", "u", 5, None, False, "basic")], 0),
]


@pytest.mark.parametrize("reason,events,expected,duplicates", CASES, ids=[c[0] for c in CASES])
def test_history_rules(reason, events, expected, duplicates):
    rows, out, table = run(events)
    assert summary(rows) == expected, reason
    assert out.duplicates == duplicates, reason
    assert out.tombstones == events.count(None), reason
    for kid, versions in resolve(rows).items():
        assert table.current(kid) == versions[-1], "the state's current version is the last one"
        assert [v["is_current"] for v in versions] == [False] * (len(versions) - 1) + [True]


def test_a_late_event_emits_the_corrected_versions():
    rows, _, _ = run([ev(1, "c", 10, 0, "basic"), ev(1, "u", 30, 9, "team"), ev(1, "u", 20, 5, "pro")])
    assert [(v["op"], (v["valid_from"] - T0) / MIN, v["valid_to"] and (v["valid_to"] - T0) / MIN,
             v["is_current"], v["revision"]) for v in rows] == [
        ("c", 0, None, True, 1),       # the insert
        ("c", 0, 9, False, 2),         # closed by the update at minute 9
        ("u", 9, None, True, 3),
        ("c", 0, 5, False, 4),         # the late update at minute 5 re-cuts the insert
        ("u", 5, 9, False, 5),         # and is placed between; the current one is unchanged
    ]


def test_a_retraction_is_emitted_and_resolve_drops_it():
    rows, _, _ = run([ev(1, "c", 10, 0, "basic"), ev(1, "r", 50, 9, "pro"), ev(1, "u", 30, 5, "pro")])
    last = [(v["op"], v["is_retracted"], v["is_current"]) for v in rows[-3:]]
    assert last == [("c", False, False), ("u", False, True), ("r", True, False)]


def test_duplicates_and_reads_without_change_emit_nothing():
    _, _, table = run([ev(1, "c", 10, 0, "basic")])
    out = table.apply(ev(1, "c", 10, 0, "basic"))
    out = table.apply(ev(1, "r", 40, 3, "basic"), out)
    out = table.apply(None, out)
    assert (out.versions, out.duplicates, out.tombstones) == ([], 1, 1)


# (reason, first row, second row, is the second a new version?)
COLUMNS = [
    ("a new column appears in the next version", {"plan": "pro"}, {"plan": "pro", "seats": 5}, True),
    ("a read with the new column null repeats a row without it", {"plan": "pro"},
     {"plan": "pro", "seats": None}, False),
    ("a read without a column that was null repeats it", {"plan": "pro", "seats": None}, {"plan": "pro"},
     False),
    ("a dropped column with a value is a change", {"plan": "pro", "seats": 5}, {"plan": "pro"}, True),
]


@pytest.mark.parametrize("reason,first,second,changed", COLUMNS, ids=[c[0] for c in COLUMNS])
def test_columns_added_or_dropped_while_running(reason, first, second, changed):
    rows, _, _ = run([ev(1, "c", 10, 0, row=first), ev(1, "r", 20, 5, row=second)])
    versions = resolve(rows)["1"]
    assert (len(versions) == 2) is changed, reason
    assert versions[-1]["row"] == {"id": 1, **(second if changed else first)}


def test_unavailable_toast_values_take_the_previous_versions_value():
    long = "x" * 5000
    rows, _, _ = run([ev(1, "c", 10, 0, row={"plan": "pro", "notes": long}),
                      ev(1, "u", 20, 5, row={"plan": "team", "notes": UNAVAILABLE})])
    assert resolve(rows)["1"][-1]["row"] == {"id": 1, "plan": "team", "notes": long}


def test_truncate_opens_a_deleted_marker_for_every_live_key():
    events = [ev(1, "c", 10, 0, "basic"), ev(2, "c", 11, 0, "pro"), ev(2, "d", 12, 1)]
    truncate = ChangeEvent(TABLE, None, None, "t", None, None, T0 + 4 * MIN, (20, 20), "lsn 20",
                           "tx20", "postgresql")
    rows, _, _ = run(events + [truncate])
    assert summary(rows) == [("1", "c", 0, 4, False, "basic"), ("1", "t", 4, None, True, "basic"),
                             ("2", "c", 0, 1, False, "pro"), ("2", "d", 1, None, True, "pro")]


def test_events_older_than_the_held_window_are_handed_back_not_applied():
    config = HistoryConfig(max_versions=2)
    events = [ev(1, "c", 10, 0, "a"), ev(1, "u", 20, 1, "b"), ev(1, "u", 30, 2, "c"),
              ev(1, "u", 40, 3, "d")]
    rows, out, _ = run(events + [ev(1, "u", 15, 0.5, "late"), ev(1, "u", 35, 2.5, "in")], config)
    assert [e.position for e, _ in out.late] == [(15, 15)]
    assert "older than the oldest event held for key 1" in out.late[0][1]
    assert [v[-1] for v in summary(rows)] == ["a", "b", "c", "in", "d"]


def test_trimming_the_window_never_changes_what_in_order_delivery_emits():
    # Including reads that repeat the current row, which are held but are no version.
    events = [ev(k, op, 10 * i + k, i, f"p{i - (op == 'r')}") for i in range(30) for k in (1, 2)
              for op in ["c" if i == 0 else "d" if i % 7 == 6 else "r" if i % 5 in (2, 3) else "u"]]
    small, _, _ = run(events, HistoryConfig(max_versions=1))
    large, _, _ = run(events, HistoryConfig(max_versions=1000))
    assert small == large


def test_state_round_trip_through_the_changelog():
    events = [ev(1, "c", 10, 0, "a"), ev(2, "r", 5, 0, "z"), ev(1, "u", 30, 2, "c"),
              ev(1, "u", 20, 1, "b"), ev(2, "d", 40, 3), ev(1, "r", 50, 4, "c")]
    whole, _, _ = run(events)
    first = TableHistory()
    out = Outputs()
    for e in events[:3]:
        first.apply(e, out)
    again = TableHistory()
    for kid, raw in first.take_dirty():
        again.load(kid, raw)
    assert first.take_dirty() == []
    for e in events[3:]:
        again.apply(e, out)
    assert out.versions == whole


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_versions"):
        HistoryConfig(max_versions=0)


# As-of lookups ----------------------------------------------------------------------

HISTORY = [ev(1, "c", 10, 0, "basic"), ev(1, "u", 20, 5, "pro"), ev(1, "d", 30, 9), None,
           ev(1, "c", 40, 12, "team"), ev(2, "r", 5, 0, "pro")]


# (reason, time in minutes, include_deleted, expected plan of key 1 or None)
AS_OF = [
    ("before the first version: no row", -0.001, False, None),
    ("exactly at valid_from: that version (inclusive)", 0, False, "basic"),
    ("one ms before valid_to: still that version", 5 - 1 / MIN, False, "basic"),
    ("exactly at valid_to: the next version (exclusive)", 5, False, "pro"),
    ("while deleted: no row", 10, False, None),
    ("while deleted, asked for markers: the deleted marker with the last image", 10, True, "pro"),
    ("after it was created again", 12, False, "team"),
    ("long after: the open version", 10_000, False, "team"),
]


@pytest.mark.parametrize("reason,minute,include_deleted,plan", AS_OF, ids=[a[0] for a in AS_OF])
def test_as_of_boundaries(reason, minute, include_deleted, plan):
    rows, _, _ = run(HISTORY)
    found = as_of(rows, int(T0 + minute * MIN), include_deleted=include_deleted)
    assert (found["1"]["row"]["plan"] if "1" in found else None) == plan, reason
    assert found["2"]["row"]["plan"] == "pro" if minute >= 0 else "2" not in found


def test_resolve_reads_rows_in_any_order():
    rows, _, _ = run([ev(1, "c", 10, 0, "basic"), ev(1, "u", 30, 9, "team"), ev(1, "u", 20, 5, "pro"),
                      ev(1, "r", 50, 11, "x"), ev(1, "u", 45, 10, "x")])
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert resolve(shuffled) == resolve(rows) == resolve(reversed(rows))
    assert [v["op"] for v in resolve(rows)["1"]] == ["c", "u", "u", "u"]


def test_version_at_on_an_empty_history():
    assert version_at([], T0) is None


def test_history_rows_match_the_json_schema():
    validate = fastjsonschema.compile(json_schema("history"))
    rows, _, _ = run(HISTORY + [ev(1, "r", 50, 13, "x"), ev(1, "u", 45, 12.5, "x")])
    for row in rows:
        validate(json.loads(json.dumps(row)))
    assert set(typing.get_type_hints(HistoryRow)) == set(json_schema("history")["properties"])


def test_same_row_counts_missing_as_null():
    assert same_row({"a": 1, "b": None}, {"a": 1})
    assert not same_row({"a": 1}, {"a": 2})
    assert same_row(None, None) and not same_row(None, {})


# The fixture, end to end --------------------------------------------------------------

def fixture_events(name: str):
    for line in (FIXTURES / name).read_text().splitlines():
        r = json.loads(line)
        yield decode(r["key"].encode(), None if r["value"] is None else r["value"].encode(),
                     [(h, v.encode()) for h, v in r["headers"]])


@pytest.mark.parametrize("name", ["pg_subscriptions.schemas.jsonl", "pg_subscriptions.jsonl"])
def test_subscriptions_fixture_history(name):
    rows, out, _ = run(fixture_events(name))
    assert out.tombstones == 2
    history = resolve(rows)
    assert summary(rows) == [
        ("1", "r", 0, 2, False, "basic"), ("1", "u", 2, 6, False, "pro"), ("1", "u", 6, None, False, "pro"),
        ("2", "r", 0, 3, False, "pro"), ("2", "u", 3, 4, False, "pro"), ("2", "d", 4, None, True, "pro"),
        ("20", "c", 4, None, False, "pro"),
        ("3", "c", 1, 7, False, "basic"), ("3", "d", 7, None, True, "basic")]
    assert [v["row"]["status"] for v in history["2"]] == ["active", "past_due", "past_due"]
    history = resolve(rows)
    assert history["2"][1]["row"]["notes"].startswith("a long note")   # TOAST value carried over
    assert (history["2"][2]["moved_to"], history["20"][0]["moved_from"]) == ("20", "2")
    assert history["1"][2]["row"]["seats"] == 5
    then = as_of(rows, T0 + 3 * MIN + 30_000)
    assert {k: (v["row"]["plan"], v["row"]["status"]) for k, v in then.items()} == {
        "1": ("pro", "active"), "2": ("pro", "past_due"), "3": ("basic", "trial")}


# Property: order and duplicates do not matter -----------------------------------------

def change_stream(seed: int, keys: int = 4, steps: int = 40) -> list[ChangeEvent]:
    """A consistent stream of PostgreSQL-like events for a few keys: a snapshot, then
    transactions (commit LSN, LSN) with inserts, updates (some with an unavailable TOAST
    value), deletes, re-creates, re-snapshots that repeat the row, and commit clocks that
    sometimes step back."""
    rng = random.Random(seed)
    lsn, commit, minute = 1000, None, 0.0
    live: dict[int, dict] = {}
    events = []
    for k in range(1, keys + 1):
        if rng.random() < 0.6:
            live[k] = {"plan": rng.choice("abc"), "notes": f"n{k}"}
            events.append(ev(k, "r", (lsn, lsn), 0, row=live[k]))
    snapshot_lsn = lsn
    commit = None
    for _ in range(steps):
        minute += rng.choice([0, 0.5, 1, 2, -0.25])
        tx_commit = commit if commit is not None else None
        for _ in range(rng.randint(1, 3)):
            lsn += rng.randint(1, 50)
            k = rng.randint(1, keys)
            pos = (tx_commit if tx_commit is not None else lsn, lsn)
            if k not in live:
                live[k] = {"plan": rng.choice("abc"), "notes": f"n{k}-{lsn}"}
                events.append(ev(k, "c", pos, minute, row=live[k]))
            elif rng.random() < 0.2:
                events.append(ev(k, "d", pos, minute))
                del live[k]
            elif rng.random() < 0.15:
                events.append(ev(k, "r", pos, minute, row=live[k]))     # a re-snapshot read
            else:
                live[k] = {**live[k], "plan": rng.choice("abcd")}
                if rng.random() < 0.3:
                    live[k]["seats"] = rng.randint(1, 9)
                toast = rng.random() < 0.3
                events.append(ev(k, "u", pos, minute,
                                 row={**live[k], "notes": UNAVAILABLE} if toast else live[k]))
        lsn += rng.randint(1, 20)
        commit = lsn      # this transaction's commit LSN, the next one's "last committed"
    assert snapshot_lsn <= events[-1].position[1]
    return events


def oracle(events: list[ChangeEvent]) -> dict[str, list[tuple]]:
    """The documented rules applied naively to the distinct events in position order."""
    by_key: dict[str, dict] = {}
    for e in events:
        by_key.setdefault(e.key_id, {}).setdefault(e.position, e)
    out = {}
    for kid, distinct in by_key.items():
        versions, row, deleted, start = [], None, True, None
        for pos in sorted(distinct):
            e = distinct[pos]
            if e.op == "r" and start is not None and not deleted and same_row(e.after, row):
                continue
            if e.op == "d":
                image = {**row, **{c: v for c, v in e.before.items() if v is not None}} \
                    if row is not None and not deleted else e.before
            else:
                image = {c: (row[c] if v == UNAVAILABLE and not deleted and row else v)
                         for c, v in e.after.items()}
            start = e.ts_ms if start is None else max(start, e.ts_ms)
            row, deleted = image, e.op == "d"
            versions.append((list(pos), e.op, start, image, deleted))
        out[kid] = [v + (versions[i + 1][2] if i + 1 < len(versions) else None,)
                    for i, v in enumerate(versions)]
    return out


def comparable(rows) -> dict[str, list[tuple]]:
    return {kid: [(v["position"], v["op"], v["valid_from"], v["row"], v["is_deleted"], v["valid_to"])
                  for v in versions] for kid, versions in resolve(rows).items()}


def check_same_history(events, delivery, config: HistoryConfig) -> None:
    ordered, out, _ = run(events, config)
    assert out.duplicates == 0 and not out.late
    shuffled, out, table = run(delivery, config)
    assert out.duplicates == len(delivery) - len(events) and not out.late
    assert comparable(shuffled) == comparable(ordered) == oracle(events)
    for kid, versions in resolve(shuffled).items():
        assert table.current(kid)["position"] == versions[-1]["position"]
        assert [v["is_current"] for v in versions].count(True) == 1
        for when in range(T0 - MIN, T0 + 60 * MIN, 7_919):
            naive = [v for v in versions if v["valid_from"] <= when
                     and (v["valid_to"] is None or when < v["valid_to"])]
            assert version_at(versions, when) == (naive[-1] if naive else None)


@pytest.mark.parametrize("seed", range(60))
def test_shuffled_and_duplicated_delivery_yields_the_ordered_history(seed):
    # Any order at all, a third of the events delivered twice: with a window that
    # holds every event of a key, the history is the ordered one.
    events = change_stream(seed)
    rng = random.Random(1000 + seed)
    delivery = events + rng.sample(events, len(events) // 3)
    rng.shuffle(delivery)
    check_same_history(events, delivery, HistoryConfig(max_versions=1000))


@pytest.mark.parametrize("seed", range(60))
def test_what_debezium_delivers_needs_only_the_default_window(seed):
    # Debezium's disorder is local: after a connector restart it re-sends a run of
    # recent events, and records of one row can swap places across partitions or
    # retries. Runs of up to 10 events re-sent, neighbours swapped within 6 places.
    events = change_stream(seed, steps=120)
    rng = random.Random(2000 + seed)
    delivery = []
    for i, event in enumerate(events):
        delivery.append(event)
        if rng.random() < 0.05:
            delivery += events[max(0, i - rng.randint(1, 10)):i + 1]
    for i in range(len(delivery) - 1):
        j = min(len(delivery) - 1, i + rng.randint(0, 6))
        if rng.random() < 0.3:
            delivery[i], delivery[j] = delivery[j], delivery[i]
    check_same_history(events, delivery, HistoryConfig())


# The same lookup in SQL (the README's DuckDB query), over history rows as written ---------

AS_OF_SQL = """
with latest as (
  select * from read_json_auto('{path}')
  qualify row_number() over (partition by key_id, position order by revision desc) = 1)
select key_id, position from latest
where not is_retracted and not is_deleted
  and valid_from <= {when} and (valid_to is null or {when} < valid_to)
"""


def test_duckdb_point_in_time_query_agrees_with_as_of(tmp_path):
    import duckdb   # a test dependency (pyproject [test]): required, not skipped
    events = change_stream(3, steps=60)
    delivery = events + events[::4]
    random.Random(3).shuffle(delivery)
    rows, _, _ = run(delivery, HistoryConfig(max_versions=1000))
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for when in range(T0, T0 + 40 * MIN, 4 * MIN + 77):
        sql = {(k, tuple(p)) for k, p in duckdb.sql(AS_OF_SQL.format(path=path, when=when)).fetchall()}
        assert sql == {(k, tuple(v["position"])) for k, v in as_of(rows, when).items()}
