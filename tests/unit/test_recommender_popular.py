"""The fallback's popular list: fresh partition snapshots merged as of now (against Popularity)."""
from __future__ import annotations

import pytest

from services.recommender.popular import merge_snapshots
from streams.feature_store import FEATURE_SET_VERSION, POPULAR, GroupWrite, apply_writes
from streams.feature_windows import HOUR, Popularity

NOW = 1_800_000_000_000


def snapshot(items, ts, half_life=6 * HOUR):
    fields, _ = apply_writes({}, POPULAR, FEATURE_SET_VERSION,
                             [GroupWrite("top", ts, {"items": [list(p) for p in items],
                                                     "half_life_ms": half_life})])
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_merge_equals_popularity_merge():
    a, b = [("x", 8.0), ("y", 4.0)], [("y", 6.0), ("z", 1.0)]
    items, fresh = merge_snapshots([snapshot(a, NOW - HOUR), snapshot(b, NOW)], NOW, 10)
    ref = Popularity.from_snapshot({"items": a, "half_life_ms": 6 * HOUR}, NOW - HOUR).merge(
        Popularity.from_snapshot({"items": b, "half_life_ms": 6 * HOUR}, NOW))
    assert fresh == 2
    want = ref.top(10, NOW)
    assert [i for i, _ in items] == [i for i, _ in want]
    assert [s for _, s in items] == pytest.approx([s for _, s in want])
    assert [i for i, _ in items] == ["y", "x", "z"]


@pytest.mark.parametrize("ages,n_fresh,items,why", [
    ((0, 0), 2, ["y", "x"], "both fresh"),
    ((0, 2 * HOUR), 1, ["x"], "a partition older than the group's max age (1 h) is left out"),
    ((2 * HOUR, 3 * HOUR), 0, ["y", "x"],
     "none fresh: the stale ones, flagged by n_fresh = 0, rather than no answer"),
])
def test_stale_partitions_are_left_out_while_any_is_fresh(ages, n_fresh, items, why):
    hashes = [snapshot([("x", 1.0)], NOW - ages[0]), snapshot([("y", 8.0)], NOW - ages[1])]
    got, fresh = merge_snapshots(hashes, NOW, 10)
    assert fresh == n_fresh, why
    assert [i for i, _ in got] == items, why


def test_missing_partitions_and_top_n():
    items, fresh = merge_snapshots([{}, snapshot([(f"i{j}", float(j)) for j in range(50)], NOW)], NOW, 5)
    assert fresh == 1
    assert [i for i, _ in items] == ["i49", "i48", "i47", "i46", "i45"]


def test_different_half_lives_do_not_merge_but_do_not_fail():
    hashes = [snapshot([("x", 1.0)], NOW), snapshot([("y", 5.0)], NOW, half_life=HOUR)]
    items, fresh = merge_snapshots(hashes, NOW, 10)
    assert fresh == 1 and [i for i, _ in items] == ["x"]


@pytest.mark.parametrize("bad,why", [
    (snapshot([("f", 9.0)], NOW + 400 * 24 * HOUR), "400 days ahead: its decay to now overflows"),
    (snapshot([("f", 9.0)], NOW + 2 * HOUR), "hours ahead of this clock: not believed"),
    (snapshot([("f", 9.0)], NOW, half_life=0), "a half-life of 0"),
    (snapshot([("f", 9.0)], NOW, half_life=-HOUR), "a negative half-life"),
    (snapshot([("f", -1.0)], NOW), "a negative score"),
])
def test_a_snapshot_that_cannot_be_true_is_skipped_never_an_error(bad, why):
    items, fresh = merge_snapshots([bad, snapshot([("x", 1.0)], NOW)], NOW, 10)
    assert [i for i, _ in items] == ["x"] and fresh == 1, why
