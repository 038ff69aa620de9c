"""Bandits fold of streams.bandits_core: counts, posteriors, daily buckets, publishing."""
from __future__ import annotations

import random
import typing

import fastjsonschema
import numpy as np
import pytest

from schemas import json_schema
from schemas.posteriors import Posterior
from services.experiments import bandit
from streams.bandits_core import (DAY_MS, BanditsConfig, PartitionBandits, decode_reward, fold,
                                  snapshot, snapshot_seed, utc_day)
from streams.codec import BadRecord

DAY0 = 20_000 * DAY_MS      # 2024-10-04T00:00Z


def reward(arm: str, value: int, ts: int = DAY0, experiment: str = "exp", rid: str = "r") -> dict:
    return {"v": 1, "request_id": rid, "experiment": experiment, "arm": arm, "visitor": "u",
            "reward": value, "exposure_ts": ts, "reward_ts": ts + 1000,
            "item": "i" if value else None, "position": 0 if value else None}


def test_counts_and_posteriors_follow_the_beta_binomial_update():
    part = PartitionBandits(BanditsConfig())
    for arm, value in [("A", 1), ("A", 0), ("A", 0), ("B", 1), ("B", 1)]:
        part.add(reward(arm, value))
    names, alpha, beta = part.experiments["exp"].posterior()
    assert names == ["A", "B"]
    assert alpha == [2.0, 3.0], "alpha = 1 + clicks (prior Beta(1, 1))"
    assert beta == [3.0, 1.0], "beta = 1 + exposures without a click"
    assert part.experiments["exp"].arms == {"A": [3, 1], "B": [2, 2]}


def test_daily_history_buckets_by_the_exposures_utc_day():
    part = PartitionBandits(BanditsConfig())
    for arm, value, ts in [("A", 1, DAY0), ("A", 0, DAY0 + DAY_MS - 1), ("A", 1, DAY0 + DAY_MS),
                           ("B", 0, DAY0 + DAY_MS + 5)]:
        part.add(reward(arm, value, ts))
    day0, day1 = utc_day(DAY0), utc_day(DAY0 + DAY_MS)
    assert (day0, day1) == ("2024-10-04", "2024-10-05")
    assert part.experiments["exp"].daily == {day0: {"A": [2, 1]}, day1: {"A": [1, 1], "B": [1, 0]}}
    snap = part.due(0)[0]
    assert snap["daily"] == {day0: {"A": {"exposures": 2, "clicks": 1}},
                             day1: {"A": {"exposures": 1, "clicks": 1}, "B": {"exposures": 1, "clicks": 0}}}


def test_experiments_are_folded_apart():
    part = PartitionBandits(BanditsConfig())
    part.add(reward("A", 1, experiment="e1"))
    part.add(reward("A", 0, experiment="e2"))
    assert part.experiments["e1"].arms == {"A": [1, 1]} and part.experiments["e2"].arms == {"A": [1, 0]}


def test_snapshots_are_throttled_per_experiment_and_versions_grow():
    cfg = BanditsConfig(publish_ms=1000, check_ms=100, draws=2000)
    part = PartitionBandits(cfg)
    part.add(reward("A", 1))
    part.add(reward("B", 0))
    first = part.due(0)
    assert [s["version"] for s in first] == [1], "the first change publishes at once"
    assert part.due(10) == [], "nothing new: nothing to publish"
    part.add(reward("A", 0))
    assert part.due(500) == [], "a change within publish_ms of the last snapshot waits"
    later = part.due(1000)
    assert [s["version"] for s in later] == [2] and later[0]["exposures"] == [2, 1]
    part.add(reward("A", 1, experiment="other"))
    assert [s["experiment"] for s in part.due(1001)] == ["other"], "throttling is per experiment"


def test_a_stop_verdict_change_publishes_at_once():
    cfg = BanditsConfig(publish_ms=60_000, check_ms=100, draws=4000)
    part = PartitionBandits(cfg)
    part.add(reward("A", 1))
    part.add(reward("B", 0))
    assert part.due(0)[0]["stop"] is False
    for _ in range(400):      # A clearly better: value remaining falls under 1 %
        part.add(reward("A", 1))
        part.add(reward("B", 0))
    assert part.due(50) == [], "the stop rule is checked at most every check_ms"
    fired = part.due(100)
    assert len(fired) == 1 and fired[0]["stop"] is True and fired[0]["version"] == 2
    part.add(reward("A", 1))
    assert part.due(300) == [], "no verdict change: back to the publish interval"


def test_one_arm_seen_is_no_reason_to_stop():
    part = PartitionBandits(BanditsConfig(draws=500))
    part.add(reward("A", 1))
    snap = part.due(0)[0]
    assert snap["arms"] == ["A"] and snap["stop"] is False
    assert bandit.assess(snap["alpha"], snap["beta"], draws=500, seed=snap["seed"]).stop is True


def test_snapshot_numbers_come_from_assess_with_a_seed_derived_from_experiment_and_version():
    part = PartitionBandits(BanditsConfig(draws=3000))
    for arm, value in [("A", 1), ("A", 0), ("B", 1), ("C", 0)]:
        part.add(reward(arm, value))
    snap = part.due(0)[0]
    assert snap["seed"] == snapshot_seed("exp", 1) != snapshot_seed("exp", 2)
    state = bandit.assess(snap["alpha"], snap["beta"], draws=3000, seed=snap["seed"])
    assert snap["prob_best"] == list(state.prob_best)
    assert snap["value_remaining"] == state.value_remaining and snap["stop"] == state.stop
    assert snap["champion"] == snap["arms"][state.champion]
    again = snapshot("exp", part.experiments["exp"], 1, 3000)
    assert again == snap, "a replay publishes the same snapshot"
    assert np.isclose(sum(snap["prob_best"]), 1.0)


def test_snapshots_match_the_json_schema():
    validate = fastjsonschema.compile(json_schema("posteriors"))
    part = PartitionBandits(BanditsConfig(draws=500))
    part.add(reward("A", 1))
    validate(part.due(0)[0])
    assert set(typing.get_type_hints(Posterior)) == set(json_schema("posteriors")["properties"])


def test_restored_state_folds_on_and_republishes_what_was_unpublished():
    rng = random.Random(4)
    rewards = [reward(rng.choice("AB"), rng.randrange(2), DAY0 + rng.randrange(3 * DAY_MS),
                      experiment=rng.choice(["e1", "e2"])) for _ in range(300)]
    cfg = BanditsConfig(draws=500)
    part, entries = PartitionBandits(cfg), {}
    for n, r in enumerate(rewards):
        part.add(r)
        if n % 50 == 10:
            part.due(n * 10_000)
        for key, value in part.take_dirty():
            entries[key] = value
        if n % 41 == 0:
            part = PartitionBandits(cfg, **part.meta())
            for key, value in entries.items():
                part.load(key.decode(), value)
    expected = fold(rewards)
    assert {e: (p.arms, p.daily) for e, p in part.experiments.items()} == \
        {e: (p.arms, p.daily) for e, p in expected.items()}
    final = {s["experiment"]: s for s in part.due(10**9)}
    assert set(final) == {"e1", "e2"}, "rewards not yet published are published after a restore"
    for experiment, snap in final.items():
        names, alpha, beta = expected[experiment].posterior()
        assert (snap["arms"], snap["alpha"], snap["beta"]) == (names, alpha, beta)


@pytest.mark.parametrize("value, reason", [
    (b"{", "not JSON"),
    (b'{"experiment": "e", "arm": "A", "reward": 2, "exposure_ts": 1, "reward_ts": 1}', "reward 0 or 1"),
    (b'{"experiment": "e", "arm": "A", "reward": true, "exposure_ts": 1, "reward_ts": 1}', "reward 0 or 1"),
    (b'{"experiment": null, "arm": "A", "reward": 1, "exposure_ts": 1, "reward_ts": 1}', "not a Reward"),
])
def test_bad_rewards_are_refused_with_the_reason(value, reason):
    with pytest.raises(BadRecord, match=reason):
        decode_reward(value)
