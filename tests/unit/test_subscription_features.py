"""The subscription features fold (streams/subscription_features.py) as a table of
history sequences, plus: any order and any re-delivery of the same rows give the same
state; the changelog round trip; routing and the partition's flush/dump."""
from __future__ import annotations

import random

import pytest

from streams.cdc_history import offline_history
from streams.feature_store import DAY
from streams.history import resolve
from streams.subscription_features import (META, USER_PREFIX, HistoryRouter, SubscriptionConfig,
                                           SubscriptionPartition, UserState, features, fold,
                                           fold_row, route)
from tests.integration.helpers import debezium_changes

CFG = SubscriptionConfig()
T0 = 1_790_000_000_000


def sub(pk: int, user: str, status: str, plan: str = "pro") -> dict:
    return {"id": pk, "user_id": user, "plan": plan, "status": status}


def history(changes) -> list[dict]:
    rows, late = offline_history(debezium_changes(changes))
    assert not late
    return rows


def state_of(rows, cfg=CFG) -> UserState | None:
    state = None
    for row in rows:
        state = fold_row(state, row, cfg)
    return state


# (changes as (op, id, row, ts), expected features, why). All rows belong to user "u".
CASES = [
    ([("c", 1, sub(1, "u", "trialing"), T0)],
     {"status": "trialing", "days_since_subscribed": 0, "cancellations": 0}, "a trial is active"),
    ([("c", 1, sub(1, "u", "incomplete"), T0), ("u", 1, sub(1, "u", "active"), T0 + 2 * DAY),
      ("u", 1, sub(1, "u", "active", "team"), T0 + 9 * DAY + 5)],
     {"status": "active", "days_since_subscribed": 7, "cancellations": 0},
     "days from the first active version to the latest change; a plan change is no cancellation"),
    ([("c", 1, sub(1, "u", "active"), T0), ("u", 1, sub(1, "u", "cancelled"), T0 + 3 * DAY),
      ("u", 1, sub(1, "u", "active"), T0 + 5 * DAY), ("u", 1, sub(1, "u", "cancelled"), T0 + 8 * DAY)],
     {"status": "cancelled", "days_since_subscribed": 8, "cancellations": 2}, "cancelled twice"),
    ([("c", 1, sub(1, "u", "active"), T0), ("u", 1, sub(1, "u", "cancelled"), T0 + DAY),
      ("u", 1, sub(1, "u", "canceled"), T0 + 2 * DAY)],
     {"status": "canceled", "days_since_subscribed": 2, "cancellations": 1},
     "inactive to inactive is not another cancellation"),
    ([("c", 1, sub(1, "u", "active"), T0), ("d", 1, None, T0 + 4 * DAY)],
     {"status": None, "days_since_subscribed": 4, "cancellations": 1},
     "deleting an active row cancels it; no live row: status null"),
    ([("c", 1, sub(1, "u", "cancelled"), T0), ("d", 1, None, T0 + DAY)],
     {"status": None, "days_since_subscribed": None, "cancellations": 0}, "never active"),
    ([("c", 1, sub(1, "u", "active"), T0), ("u", 1, sub(1, "u", "cancelled"), T0 + 10 * DAY),
      ("c", 2, sub(2, "u", "active"), T0 + 20 * DAY)],
     {"status": "active", "days_since_subscribed": 20, "cancellations": 1},
     "a second row: the live active one gives the status, the first active the days"),
    ([("c", 1, sub(1, "u", "active"), T0), ("c", 2, sub(2, "u", "trialing"), T0 + DAY),
      ("u", 2, sub(2, "u", "cancelled"), T0 + 2 * DAY)],
     {"status": "active", "days_since_subscribed": 2, "cancellations": 1},
     "an active row wins over a more recently changed inactive one"),
    ([("r", 1, sub(1, "u", "active"), T0), ("r", 1, sub(1, "u", "active"), T0 + DAY)],
     {"status": "active", "days_since_subscribed": 0, "cancellations": 0},
     "a second identical snapshot read adds nothing"),
]


@pytest.mark.parametrize("changes,expected,why", CASES, ids=[c[2] for c in CASES])
def test_features_of_a_history(changes, expected, why):
    rows = history(changes)
    state = state_of(rows)
    assert features(state, CFG) == expected, why
    assert state.ts == max(r["valid_from"] for r in rows), why
    # Any order, every row delivered twice: the same state.
    shuffled = rows + rows
    random.Random(len(rows)).shuffle(shuffled)
    assert state_of(shuffled) == state, why


def test_configurable_active_statuses_and_columns():
    changes = [("c", 1, {"id": 1, "owner": "u", "state": "paid"}, T0),
               ("u", 1, {"id": 1, "owner": "u", "state": "past_due"}, T0 + DAY),
               ("u", 1, {"id": 1, "owner": "u", "state": "paid"}, T0 + 2 * DAY)]
    cfg = SubscriptionConfig("owner", "state", frozenset({"paid"}))
    assert features(state_of(history(changes), cfg), cfg) == {
        "status": "paid", "days_since_subscribed": 2, "cancellations": 1}
    lenient = SubscriptionConfig("owner", "state", frozenset({"paid", "past_due"}))
    assert features(state_of(history(changes), lenient), lenient)["cancellations"] == 0


def test_highest_revision_wins_and_retracted_versions_drop_out():
    row = history([("c", 1, sub(1, "u", "active"), T0)])[0]
    cancelled = {**row, "row": sub(1, "u", "cancelled"), "revision": row["revision"] + 1}
    for order in ([row, cancelled], [cancelled, row], [cancelled, row, cancelled]):
        assert features(state_of(order), CFG)["status"] == "cancelled"
    retracted = {**row, "is_retracted": True, "revision": row["revision"] + 2}
    assert features(state_of([row, cancelled, retracted]), CFG) == {
        "status": None, "days_since_subscribed": None, "cancellations": 0}


def test_rows_without_a_user_are_not_routed():
    row = history([("c", 1, sub(1, "u", "active"), T0)])[0]
    assert route({**row, "row": None}, CFG) is None
    assert route({**row, "row": {"id": 1}}, CFG) is None
    assert fold_row(None, {**row, "row": None}, CFG) is None
    assert route({**row, "row": {**row["row"], "user_id": 42}}, CFG)[0] == "42"


def test_fold_does_not_change_its_input():
    rows = history([("c", 1, sub(1, "u", "active"), T0), ("u", 1, sub(1, "u", "cancelled"), T0 + DAY)])
    first = state_of(rows[:1])
    snapshot = UserState.from_json(first.to_json())
    fold_row(first, rows[-1], CFG)
    assert first == snapshot


def test_partition_flush_dump_and_restore_from_the_changelog():
    rows = history([("c", 1, sub(1, "ann", "active"), T0), ("c", 2, sub(2, "bob", "trialing"), T0 + DAY),
                    ("u", 1, sub(1, "ann", "cancelled"), T0 + 3 * DAY)])
    part = SubscriptionPartition(CFG)
    for offset, row in enumerate(rows):
        user, value = route(row, CFG)
        part.add_record(user, value, "subs", offset + 1)
    assert part.has_work
    flushed = {u: (ts, values) for u, ts, values in part.flush()}
    assert flushed == {
        "ann": (T0 + 3 * DAY, {"status": "cancelled", "days_since_subscribed": 3, "cancellations": 1}),
        "bob": (T0 + DAY, {"status": "trialing", "days_since_subscribed": 0, "cancellations": 0})}
    assert not part.has_work and part.flush() == []
    entries = dict(part.take_dirty())
    assert set(entries) == {USER_PREFIX + b"ann", USER_PREFIX + b"bob", META}
    again = SubscriptionPartition.restore(CFG, {**entries, b"u:someone": b"{}", b"i:x": b"{}"})
    assert again.users == part.users and again.next_offset("subs") == len(rows)
    # A restored partition writes every user once (a crash may have beaten a Redis write).
    assert {u: (ts, values) for u, ts, values in again.flush()} == flushed
    # A re-delivered row changes nothing: no Redis write, no changelog entry but the offsets.
    user, value = route(rows[0], CFG)
    again.add_record(user, value, "subs", len(rows) + 1)
    assert not again.has_work and [k for k, _ in again.take_dirty()] == [META]
    with pytest.raises(ValueError):
        again.add_record("ann", b"not json", "subs", len(rows) + 2)
    assert again.next_offset("subs") == len(rows) + 2


def test_router_offsets_round_trip():
    router = HistoryRouter()
    router.done("history.subscriptions", 7)
    assert HistoryRouter.restore(dict(router.take_dirty())).next_offset("history.subscriptions") == 7
    assert HistoryRouter.restore({}).next_offset("history.subscriptions") == 0


def test_resolved_history_and_fold_agree_on_cancellations():
    rng = random.Random(5)
    changes, status, t = [], "active", T0
    changes.append(("c", 1, sub(1, "u", status), t))
    for _ in range(40):
        t += rng.randint(1, 3 * DAY)
        status = rng.choice(["active", "trialing", "cancelled", "past_due"])
        changes.append(("u", 1, sub(1, "u", status), t))
    rows = history(changes)
    versions = resolve(rows)["1"]
    active = [v["row"]["status"] in CFG.active for v in versions]
    expected = sum(1 for a, b in zip(active, active[1:]) if a and not b)
    assert features(state_of(rows), CFG)["cancellations"] == expected > 3
