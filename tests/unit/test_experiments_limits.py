"""Limits on what experiments accept, and bad data that loses only itself (audit):
huge arm weights, too many arms, Monte Carlo cost, malformed posterior snapshots,
and the recommender's feed, which must keep allocating the other experiments."""
from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from schemas import json_schema
from services.experiments import ExperimentError
from services.experiments.allocation import BUCKETS, boundaries
from services.experiments.bandit import as_posterior
from services.experiments.registry import MAX_ARMS, MAX_WEIGHT, RecordError, validate
from services.experiments.results import (MAX_DRAW_CELLS, SnapshotError, check_draws, read_snapshot,
                                          results)
from services.recommender import experiments as rec
from services.recommender.experiments import Allocation, ExperimentFeed
from services.recommender.request import Query
from services.settings import Settings

SURFACE = "home.recommendations"
DAY = 86_400_000


def exp(id="lim", kind="ab", weights=(1.0, 1.0), **over) -> dict:
    record = {
        "v": 1, "revision": 1, "id": id, "name": "n", "owner": "o", "hypothesis": "h",
        "surface": SURFACE, "population": {}, "unit": "user_id",
        "arms": [{"name": f"a{i}", "weight": w, "description": None} for i, w in enumerate(weights)],
        "kind": kind, "epsilon": None, "primary_metric": "click_through",
        "start": 10 * DAY, "planned_end": 24 * DAY, "ended": None, "status": "running",
        "namespace": None, "updated": 10 * DAY,
    }
    record.update(over)
    return record


# -- weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("weights,why", [
    ([1e308, 1], "10000 x 1e308 overflows: floor(inf) raised OverflowError"),
    ([1e308, 1e308], "the total is inf: inf / inf is NaN, floor raised ValueError"),
    ([1.7e308, 1.7e308], "each finite, the sum is not"),
])
def test_boundaries_refuse_weights_that_overflow(weights, why):
    with pytest.raises(ExperimentError, match="too large"):
        boundaries(weights)


@pytest.mark.parametrize("over,message,why", [
    ({"weights": (1e308, 1)}, "weight", "the audit's record: accepted, then broke every reader"),
    ({"weights": (1e308, 1e308)}, "weight", "an infinite total"),
    ({"weights": (MAX_WEIGHT * 1.5, 1)}, "weight", "over the cap"),
    ({"weights": (1,) * (MAX_ARMS + 1)}, "arms", "more arms than the cap"),
])
def test_registry_refuses_huge_weights_and_too_many_arms(over, message, why):
    with pytest.raises(RecordError, match=message):
        validate(exp(**over))


def test_the_largest_allowed_experiment_splits():
    record = exp(weights=(MAX_WEIGHT,) * MAX_ARMS)
    validate(record)
    assert boundaries([a["weight"] for a in record["arms"]])[-1] == BUCKETS


def test_json_schema_carries_the_registry_limits():
    arms = json_schema("experiments")["properties"]["arms"]
    assert arms["maxItems"] == MAX_ARMS
    assert arms["items"]["properties"]["weight"]["maximum"] == MAX_WEIGHT


# -- results cost ----------------------------------------------------------------------------

def test_monte_carlo_cells_are_capped():
    check_draws(MAX_ARMS, MAX_DRAW_CELLS // MAX_ARMS)
    with pytest.raises(ExperimentError, match=f"at most {MAX_DRAW_CELLS // MAX_ARMS} draws"):
        check_draws(MAX_ARMS, MAX_DRAW_CELLS // MAX_ARMS + 1)
    many = exp(weights=(1,) * MAX_ARMS)
    with pytest.raises(ExperimentError, match="Monte Carlo"):
        results(many, draws=200_000, seed=1)


# -- malformed posterior snapshots -------------------------------------------------------------

ARMS = ["popular", "personalized"]


@pytest.mark.parametrize("snap,reason,why", [
    ({"exposures": ["abc", 1], "clicks": [0, 0]}, "abc", "a string count (int() raised ValueError)"),
    ({"daily": [5]}, "TypeError", "a day that is not an object (TypeError)"),
    ({"daily": ["x"]}, "AttributeError", "a day that is a string (AttributeError)"),
    ({"alpha": [[1], 1], "beta": [1, 1]}, "TypeError", "a list for a parameter (float() raised TypeError)"),
    ({"alpha": [-1, 1], "beta": [1, 1]}, "alpha must be positive", "the server's data, once a 400"),
    ({"alpha": [1, 1], "beta": [0, 1]}, "beta must be positive", "zero is not a Beta parameter"),
    ({"prob_best": ["nan", 1]}, "probability", "NaN as a string"),
    ({"prob_best": [2, 0]}, "probability", "not a probability"),
    ({"exposures": [float("inf"), 1], "clicks": [0, 0]}, "OverflowError", "int(inf) raised OverflowError"),
    ({"value_remaining": "inf"}, "value_remaining", "not finite"),
])
def test_malformed_snapshots_are_snapshot_errors(snap, reason, why):
    record = {"experiment": "e", "version": 1, "arms": ARMS, **snap}
    with pytest.raises(SnapshotError, match=reason):
        read_snapshot(record, ARMS)


def test_as_posterior_refuses_ragged_and_string_parameters():
    for alpha in ([[1], 1], ["x", 1]):
        with pytest.raises(ExperimentError, match="lists of numbers"):
            as_posterior(alpha, [1, 1])


# -- the recommender: one bad record loses only itself --------------------------------------------

def user(u: str) -> Query:
    return Query(u, u, None, 10, True)


def test_allocation_update_leaves_out_only_the_experiment_it_cannot_build():
    a = Allocation(SURFACE, 0)
    good = exp("good", namespace={"name": "ns", "range": [0, 5000]})
    huge = exp("huge", weights=(1e308, 1), namespace={"name": "ns", "range": [5000, 10000]})
    ragged = exp("ragged", kind="thompson", population={})
    # posterior_arrays raised ValueError (not ExperimentError) on this, out of update
    posteriors = {"ragged": {"version": 1, "arms": ["a0", "a1"], "alpha": [[1, 2], 1], "beta": [1, 1]}}
    a.update([good, huge, ragged], posteriors)
    assert [e.id for e in a.live] == ["good"]
    assert set(a.not_applied) == {"huge", "ragged"} and "too large" in a.not_applied["huge"]
    served = {(d.experiment if (d := a.decide(user(f"u{i}"), 0)) else None) for i in range(200)}
    assert "good" in served


def _record(topic, key, value, offset=0):
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return SimpleNamespace(topic=topic, partition=0, offset=offset, key=key.encode(), value=raw)


def test_feed_keeps_going_past_bad_records_and_reports_what_it_left_out(monkeypatch):
    feed = ExperimentFeed(Settings.from_env(), Allocation(SURFACE, 0))
    exp_topic, post_topic = feed.topics
    good = exp("good", namespace={"name": "ns", "range": [0, 5000]})
    huge = exp("huge", weights=(1e308, 1), namespace={"name": "ns", "range": [5000, 10000]})
    ragged = {"experiment": "good", "version": 2, "arms": ["a0", "a1"], "alpha": [[1], 1], "beta": [1, 1]}
    assert feed.fold([_record(exp_topic, "huge", huge, 0), _record(exp_topic, "good", good, 1),
                      _record(post_topic, "good", ragged, 2)])
    assert feed.refused == 1 and feed.bad == 1, "the huge weight refused, the ragged snapshot bad"

    # Something no rule foresaw, raised while folding one record: that record alone is lost.
    real_apply = rec.apply

    def apply(state, key, value):
        if key == "boom":
            raise RuntimeError("unforeseen")
        return real_apply(state, key, value)
    monkeypatch.setattr(rec, "apply", apply)
    other = exp("other", namespace={"name": "ns", "range": [5000, 10000]})
    assert feed.fold([_record(exp_topic, "boom", exp("boom"), 3), _record(exp_topic, "other", other, 4)])
    assert feed.bad == 2 and "@3" in feed.last_error and "unforeseen" in feed.last_error
    feed._apply()
    assert [e.id for e in feed.allocation.live] == ["good", "other"]

    # An experiment the allocation cannot build (here forced past the registry): it is
    # named in the error /health shows, the others still run; gone once it stops.
    broken = {**other, "revision": 2, "name": "renamed"}
    monkeypatch.setattr(rec, "Live", _failing_for("other", rec.Live))
    assert feed.fold([_record(exp_topic, "other", broken, 5)])
    feed._apply()
    assert [e.id for e in feed.allocation.live] == ["good"]
    assert feed.last_error.startswith(rec.NOT_APPLIED) and "other" in feed.last_error
    assert feed.describe()["not_applied"] == {"other": "OverflowError: forced"}
    assert feed.unapplied == 1
    stopped = {**broken, "revision": 3, "status": "stopped", "ended": 11 * DAY}
    assert feed.fold([_record(exp_topic, "other", stopped, 6)])
    feed._apply()
    assert feed.last_error is None and feed.describe()["not_applied"] == {}


def _failing_for(exp_id, live_cls):
    def build(e, snap, seed=None):
        if e["id"] == exp_id:
            raise OverflowError("forced")
        return live_cls(e, snap, seed)
    return build
