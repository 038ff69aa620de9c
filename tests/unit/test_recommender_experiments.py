"""The recommender's experiment allocation (services/recommender/experiments.py): pure logic.

A/B through the decision equals the published allocation vectors; bandit decisions
replay from (posterior, seed, draw); stickiness and its expiry; the unit,
population and namespace rules; the registry/posterior fold."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from services.experiments.allocation import assign
from services.experiments.bandit import ThompsonSampler
from services.recommender.experiments import (Allocation, EpsilonSampler, ExperimentFeed,
                                              posterior_arrays)
from services.recommender.request import Query
from services.settings import Settings

SURFACE = "home.recommendations"
VECTORS = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "allocation_vectors.json")
                     .read_text())["vectors"]
DAY = 86_400_000


def exp(id="home-1", kind="ab", arms=("popular", "personalized"), weights=None, **over) -> dict:
    weights = weights or [1.0] * len(arms)
    record = {
        "v": 1, "revision": 1, "id": id, "name": "n", "owner": "o", "hypothesis": "h",
        "surface": SURFACE, "population": {}, "unit": "user_id",
        "arms": [{"name": a, "weight": w, "description": None} for a, w in zip(arms, weights)],
        "kind": kind, "epsilon": None, "primary_metric": "click_through",
        "start": 10 * DAY, "planned_end": 24 * DAY, "ended": None, "status": "running",
        "namespace": None, "updated": 10 * DAY,
    }
    record.update(over)
    return record


def snapshot(experiment, version, arms, alpha, beta) -> dict:
    return {"v": 1, "experiment": experiment, "version": version, "arms": list(arms),
            "alpha": list(alpha), "beta": list(beta), "exposures": [0] * len(arms),
            "clicks": [0] * len(arms)}


def user(u: str) -> Query:
    return Query(u, u, None, 10, True)


def anon(a: str) -> Query:
    return Query(a, None, a, 10, True)


def allocation(*experiments, posteriors=None, sticky_ms=0) -> Allocation:
    a = Allocation(SURFACE, sticky_ms)
    a.update(experiments, posteriors or {})
    return a


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['experiment']}:{v['unit']}")
def test_ab_through_the_decision_equals_the_published_vectors(vector):
    arms = [f"arm{i}" for i in range(len(vector["weights"]))]
    a = allocation(exp(vector["experiment"], arms=arms, weights=vector["weights"],
                       namespace=vector["namespace"]))
    got = a.decide(user(vector["unit"]), 0)
    if vector["arm"] is None:
        assert got is None, vector["why"]
    else:
        assert got is not None and got.arm == arms[vector["arm"]], vector["why"]
        assert (got.experiment, got.kind) == (vector["experiment"], "ab")
        assert (got.posterior_version, got.seed, got.draw) == (None, None, None)


def test_ab_is_the_same_in_a_fresh_process_state_and_matches_assign():
    units = [f"user-{i}" for i in range(500)]
    first = allocation(exp("home-ab", weights=[0.3, 0.7]))
    again = allocation(exp("home-ab", weights=[0.3, 0.7]))
    arms = ["popular", "personalized"]
    for u in units:
        d1, d2 = first.decide(user(u), 0), again.decide(user(u), 10 ** 12)
        assert d1 == d2 and d1.arm == arms[assign("home-ab", u, [0.3, 0.7])]
    share = Counter(first.decide(user(u), 0).arm for u in units)["personalized"] / len(units)
    assert 0.62 < share < 0.78


def test_thompson_decisions_replay_from_posterior_seed_and_draw():
    arms = [f"a{i}" for i in range(10)]
    # the snapshot lacks two arms (no rewards yet): they are at Beta(1, 1)
    snap = snapshot("tt", 7, arms[:8], [1 + i for i in range(8)], [20 - i for i in range(8)])
    a = allocation(exp("tt", kind="thompson", arms=arms), posteriors={"tt": snap})
    alpha, beta = posterior_arrays(arms, snap)
    assert alpha[8:].tolist() == [1.0, 1.0] and beta[8:].tolist() == [1.0, 1.0]
    decisions = [a.decide(user(f"u{i}"), 0) for i in range(600)]  # > 2 blocks of 256
    assert [d.draw for d in decisions] == list(range(600))
    assert {(d.posterior_version, d.kind) for d in decisions} == {(7, "thompson")}
    for d in decisions[:5] + decisions[250:262] + decisions[-5:]:
        assert arms[ThompsonSampler.replay(alpha, beta, d.seed, d.draw)] == d.arm


def test_epsilon_greedy_replays_and_explores_at_epsilon():
    arms = ["a", "b", "c", "d"]
    snap = snapshot("eg", 3, arms, [5, 50, 5, 5], [50, 5, 50, 50])
    a = allocation(exp("eg", kind="epsilon_greedy", arms=arms, epsilon=0.2),
                   posteriors={"eg": snap})
    decisions = [a.decide(anon(f"x{i}"), 0) is None for i in range(3)]
    assert all(decisions), "unit user_id: an anonymous request is not in the experiment"
    decisions = [a.decide(user(f"u{i}"), 0) for i in range(4000)]
    alpha, beta = posterior_arrays(arms, snap)
    for d in decisions[::397]:
        assert arms[EpsilonSampler.replay(alpha, beta, 0.2, d.seed, d.draw)] == d.arm
    share_b = Counter(d.arm for d in decisions)["b"] / len(decisions)
    assert abs(share_b - (0.8 + 0.2 / 4)) < 0.03


def test_bandit_arm_is_sticky_until_it_expires_even_across_a_new_posterior():
    arms = ["a", "b"]
    a = allocation(exp("st", kind="thompson", arms=arms), sticky_ms=1000)
    first = a.decide(user("u1"), 0)
    assert first.posterior_version == 0, "no snapshot yet: the prior"
    assert all(a.decide(user("u1"), t) == first for t in (1, 500, 999))
    # a snapshot that makes the other arm certain: u1 keeps its arm while sticky
    other = "b" if first.arm == "a" else "a"
    certain = snapshot("st", 1, arms, [1e6 if n == other else 1 for n in arms],
                       [1 if n == other else 1e6 for n in arms])
    a.update([exp("st", kind="thompson", arms=arms)], {"st": certain})
    assert a.decide(user("u1"), 999) == first
    later = a.decide(user("u1"), 1000)       # expired: decided again, on the new posterior
    assert later.arm == other and later.posterior_version == 1 and later.seed != first.seed
    assert a.decide(user("u1"), 1999) == later


def test_sticky_map_is_bounded_and_evicts_the_soonest_expiry():
    a = Allocation(SURFACE, 10_000, capacity=100)
    a.update([exp("cap", kind="thompson", arms=["a", "b"])], {})
    for i in range(250):
        a.decide(user(f"u{i}"), i)
    assert len(a.sticky) == 100
    assert ("cap", "u249") in a.sticky and ("cap", "u0") not in a.sticky


def test_no_stickiness_when_sticky_s_is_zero():
    a = allocation(exp("ns", kind="thompson", arms=["a", "b"]))
    draws = [a.decide(user("u1"), 0).draw for _ in range(5)]
    assert draws == [0, 1, 2, 3, 4] and not a.sticky


@pytest.mark.parametrize("over,query,in_experiment,why", [
    ({}, user("u1"), True, "unit user_id, empty population: everyone with a user id"),
    ({}, anon("a1"), False, "unit user_id: no user id, not in the experiment"),
    ({"unit": "anonymous_id"}, anon("a1"), True, "unit anonymous_id with one"),
    ({"unit": "anonymous_id"}, user("u1"), False, "unit anonymous_id, only a user id"),
    ({"unit": "anonymous_id"}, Query("u1", "u1", "a1", 10, True), True, "both ids: the anonymous one"),
    ({"population": {"country": ["DE"]}}, user("u1"), False,
     "requests carry no attributes: a non-empty population matches none"),
    ({"surface": "search.results"}, user("u1"), False, "another surface"),
    ({"status": "stopped", "ended": 12 * DAY}, user("u1"), False, "not running"),
    ({"status": "draft"}, user("u1"), False, "not running"),
    ({"namespace": {"name": "home", "range": [0, 10000]}}, user("u1"), True, "whole namespace"),
])
@pytest.mark.parametrize("kind", ["ab", "thompson", "epsilon_greedy"])
def test_unit_population_surface_status_rules(kind, over, query, in_experiment, why):
    a = allocation(exp("rules", kind=kind, **over))
    got = a.decide(query, 0)
    assert (got is not None) == in_experiment, why
    if got is not None:
        assert got.experiment == "rules" and got.arm in ("popular", "personalized")


@pytest.mark.parametrize("kind", ["ab", "thompson"])
def test_namespace_range_excludes_units_outside_it(kind):
    from services.experiments.allocation import in_range

    a = allocation(exp("nsx", kind=kind, namespace={"name": "home", "range": [0, 5000]}))
    units = [f"user-{i}" for i in range(400)]
    inside = {u for u in units if in_range(u, "home", 0, 5000)}
    assert 120 < len(inside) < 280
    assert {u for u in units if a.decide(user(u), 0) is not None} == inside


def test_first_experiment_by_id_that_takes_the_unit_wins():
    lo = exp("b-first", namespace={"name": "home", "range": [0, 5000]}, arms=("x", "y"))
    hi = exp("a-second", namespace={"name": "home", "range": [5000, 10000]}, arms=("p", "q"))
    a = allocation(lo, hi)
    seen = Counter(a.decide(user(f"u{i}"), 0).experiment for i in range(300))
    assert set(seen) == {"a-second", "b-first"}, "disjoint ranges split the units"


def test_a_posterior_moves_a_thompson_allocation():
    arms = ["popular", "personalized"]
    e = exp("mv", kind="thompson", arms=arms)
    a = allocation(e)
    before = Counter(a.decide(user(f"u{i}"), 0).arm for i in range(2000))
    assert 0.4 < before["personalized"] / 2000 < 0.6, "the prior: an even split"
    a.update([e], {"mv": snapshot("mv", 4, ["personalized"], [300], [700])})  # popular: absent
    # Beta(300, 700) (~0.3) against Beta(1, 1): popular wins with P = 0.7
    after = Counter(a.decide(user(f"v{i}"), 0).arm for i in range(4000))
    assert abs(after["popular"] / 4000 - 0.7) < 0.04


def test_unchanged_experiment_keeps_its_sampler_and_a_stopped_one_forgets_sticky_units():
    e = exp("keep", kind="thompson", arms=["a", "b"])
    a = allocation(e, sticky_ms=60_000)
    live = a.live[0]
    a.decide(user("u1"), 0)
    a.update([e], {})
    assert a.live[0] is live and a.sticky
    a.update([], {})
    assert a.live == () and not a.sticky


def _record(topic, key, value, offset=0):
    return SimpleNamespace(topic=topic, partition=0, offset=offset,
                           key=None if key is None else key.encode(),
                           value=None if value is None else orjson.dumps(value))


def test_feed_folds_the_registry_and_keeps_the_latest_posterior():
    settings = Settings.from_env()
    feed = ExperimentFeed(settings, Allocation(SURFACE, 0))
    exp_topic, post_topic = feed.topics
    e = exp("fd", kind="thompson", arms=["a", "b"], status="draft", start=10 * DAY)
    running = {**e, "revision": 2, "status": "running"}
    assert feed.fold([_record(exp_topic, "fd", e), _record(exp_topic, "fd", running)])
    assert feed.fold([_record(post_topic, "fd", snapshot("fd", 3, ["a"], [5], [2]))])
    assert not feed.fold([_record(post_topic, "fd", snapshot("fd", 2, ["a"], [9], [9]))]), \
        "an older version changes nothing"
    assert not feed.fold([_record(exp_topic, "fd", e)]), "a stale revision is refused"
    assert feed.refused == 1
    assert not feed.fold([_record(post_topic, "fd", {"experiment": "fd"})]) and feed.bad == 1
    assert not feed.fold([_record(post_topic, "fd", snapshot("fd", 9, ["a"], [0], [1]))]), \
        "a non-positive parameter is not applied"
    feed._apply()
    (live,) = feed.allocation.live
    assert live.version == 3 and live.alpha.tolist() == [5.0, 1.0]
    described = feed.describe()
    assert described["running"][0]["posterior_version"] == 3
    assert described["posteriors"]["fd"]["version"] == 3
    stopped = {**running, "revision": 3, "status": "stopped", "ended": 11 * DAY}
    assert feed.fold([_record(exp_topic, "fd", stopped)])
    feed._apply()
    assert feed.allocation.live == ()


def test_decision_for_ten_arms_is_well_under_twenty_microseconds():
    import time

    arms = [f"a{i}" for i in range(10)]
    # a sticky map that is full and evicting for most of the run (a plain dict's
    # eviction once cost 12 µs per request here)
    a = Allocation(SURFACE, 3_600_000, capacity=2_000)
    a.update([exp("fast", kind="thompson", arms=arms)],
             {"fast": snapshot("fast", 1, arms, np.arange(1, 11), np.full(10, 30))})
    queries = [user(f"u{i}") for i in range(20_000)]
    t0 = time.perf_counter()
    for i, q in enumerate(queries):
        a.decide(q, i)
    per_us = (time.perf_counter() - t0) / len(queries) * 1e6
    assert per_us < 20, per_us
    assert len(a.sticky) == 2_000
