"""The experiment registry: record rules, the state machine, the collision rule,
and the fold that rebuilds the same state from a compacted topic."""
from __future__ import annotations

import typing

import fastjsonschema
import pytest

from schemas import json_schema
from schemas.experiments import Experiment
from services.experiments.registry import (Registry, RecordError, apply, propose, start, stop,
                                           validate)

DAY = 86_400_000


def exp(id="home-1", **over) -> Experiment:
    record = {
        "v": 1, "revision": 1, "id": id, "name": "Personalized home", "owner": "ana@example.com",
        "hypothesis": "The ALS model beats popular items on home click-through",
        "surface": "home.recommendations", "population": {}, "unit": "user_id",
        "arms": [{"name": "popular", "weight": 0.5, "description": "popular items"},
                 {"name": "personalized", "weight": 0.5, "description": None}],
        "kind": "ab", "epsilon": None, "primary_metric": "click_through",
        "start": 10 * DAY, "planned_end": 24 * DAY, "ended": None, "status": "draft",
        "namespace": None, "updated": 9 * DAY,
    }
    record.update(over)
    return record  # type: ignore[return-value]


def fold(*records) -> Registry:
    state = Registry()
    for r in records:
        state, refused = apply(state, r["id"], r)
        assert refused is None, refused
    return state


def test_typed_record_and_json_schema_name_the_same_fields():
    doc = json_schema("experiments")
    hints = typing.get_type_hints(Experiment)
    assert set(doc["required"]) == set(doc["properties"]) == set(hints)
    fastjsonschema.compile(doc)(exp())


@pytest.mark.parametrize("over,message,why", [
    ({"arms": [{"name": "a", "weight": 1, "description": None}]}, "arms", "one arm is not an experiment"),
    ({"arms": [{"name": "a", "weight": 1, "description": None}] * 2}, "unique", "duplicate arm names"),
    ({"arms": [{"name": "a", "weight": 0, "description": None}, {"name": "b", "weight": 0, "description": None}]},
     "all be zero", "no traffic anywhere"),
    ({"arms": [{"name": "a", "weight": -1, "description": None}, {"name": "b", "weight": 1, "description": None}]},
     "weight", "negative weight"),
    ({"planned_end": 10 * DAY}, "planned_end", "ends when it starts"),
    ({"status": "stopped"}, "ended", "stopped without an end time"),
    ({"ended": 12 * DAY}, "ended", "an end time while draft"),
    ({"epsilon": 0.1}, "epsilon", "epsilon on an A/B test"),
    ({"kind": "epsilon_greedy", "epsilon": 1.5}, "epsilon", "epsilon above 1"),
    ({"kind": "ucb"}, "kind", "unknown kind"),
    ({"unit": "email"}, "unit", "unknown unit"),
    ({"id": "home:1"}, "id", "a colon would make '<experiment>:<unit>' ambiguous"),
    ({"surface": "Home Page"}, "surface", "surfaces are dotted lowercase names"),
    ({"population": {"country": []}}, "population", "an attribute with no allowed value"),
    ({"namespace": {"name": "home", "range": [5000, 5000]}}, "range", "an empty range"),
    ({"namespace": {"name": "home", "range": [0, 10001]}}, "range", "beyond the 10,000 buckets"),
    ({"v": 2}, "v", "unknown schema version"),
    ({"extra": 1}, "extra", "unknown field"),
])
def test_bad_records_are_refused_with_the_reason(over, message, why):
    with pytest.raises(RecordError, match=message):
        validate(exp(**over))
    state, refused = apply(Registry(), "home-1", exp(**over))
    assert refused and message in refused and state == Registry(), why


def test_good_kinds_validate():
    for kind, epsilon in (("ab", None), ("thompson", None), ("epsilon_greedy", 0.05), ("epsilon_greedy", None)):
        validate(exp(kind=kind, epsilon=epsilon))


RUNNING = exp("running-1", status="running", revision=2, population={"country": ["DE", "FR"]})


@pytest.mark.parametrize("new,refused,why", [
    (exp("b", status="running"), "collision", "same surface, everyone vs DE/FR overlaps"),
    (exp("b", status="running", population={"country": ["FR", "US"]}), "collision", "FR in both"),
    (exp("b", status="running", population={"device": ["mobile"]}), "collision",
     "different attributes: mobile users in DE overlap"),
    (exp("b", status="running", unit="anonymous_id"), "collision", "another unit is still the same people"),
    (exp("b", status="running", population={"country": ["US"]}), None, "disjoint countries"),
    (exp("b", status="running", surface="search.results"), None, "another surface"),
    (exp("b", status="draft"), None, "a draft arriving in the fold is not checked (compaction reorders drafts)"),
    (exp("b", status="stopped", ended=11 * DAY), None, "a stopped experiment occupies nothing"),
])
def test_collision_rule_in_the_fold(new, refused, why):
    state = fold(RUNNING)
    after, reason = apply(state, new["id"], new)
    if refused is None:
        assert reason is None and new["id"] in after.experiments, why
    else:
        assert reason is not None and refused in reason and "running-1" in reason, why
        assert after is state


def ns(name, lo, hi):
    return {"name": name, "range": [lo, hi]}


@pytest.mark.parametrize("a_ns,b_ns,refused,why", [
    (ns("home", 0, 5000), ns("home", 5000, 10000), False, "one namespace, disjoint ranges"),
    (ns("home", 0, 5000), ns("home", 4999, 10000), True, "ranges share bucket 4999"),
    (ns("home", 0, 5000), ns("other", 5000, 10000), True, "different namespaces do not split anything"),
    (ns("home", 0, 5000), None, True, "only one of them in a namespace"),
    (None, None, True, "no namespaces"),
])
def test_namespaces_with_disjoint_ranges_may_share_a_surface(a_ns, b_ns, refused, why):
    state = fold(exp("a", status="running", namespace=a_ns))
    _, reason = apply(state, "b", exp("b", status="running", namespace=b_ns))
    assert (reason is not None) == refused, f"{why}: {reason}"
    if reason and a_ns and b_ns and a_ns["name"] == b_ns["name"]:
        assert "disjoint range" in reason


def test_propose_refuses_even_a_new_draft_that_overlaps_a_running_one():
    state = fold(RUNNING)
    with pytest.raises(RecordError, match="collision"):
        propose(state, exp("b"))
    assert "b" in propose(state, exp("b", population={"country": ["US"]})).experiments
    with pytest.raises(RecordError, match="planned_end"):
        propose(state, exp("c", planned_end=0))


def test_starting_a_draft_is_checked_when_it_starts():
    draft = exp("b")
    state = fold(draft)                       # created while nothing ran
    state = fold(*state.experiments.values(), RUNNING)
    with pytest.raises(RecordError, match="collision"):
        propose(state, start(draft, now=11 * DAY))
    state = propose(state, stop(RUNNING, now=12 * DAY))
    state = propose(state, start(draft, now=12 * DAY))
    assert state.experiments["b"]["status"] == "running" and state.experiments["b"]["start"] == 12 * DAY


@pytest.mark.parametrize("first,second,refused,why", [
    ({"status": "draft"}, {"status": "running"}, None, "start"),
    ({"status": "draft"}, {"status": "stopped", "ended": 11 * DAY}, None, "abandon a draft"),
    ({"status": "running"}, {"status": "stopped", "ended": 11 * DAY}, None, "stop"),
    ({"status": "running"}, {"status": "draft"}, "cannot go from running to draft", "no way back"),
    ({"status": "stopped", "ended": 11 * DAY}, {"status": "running"}, "final", "no restart"),
    ({"status": "stopped", "ended": 11 * DAY}, {"status": "stopped", "ended": 11 * DAY, "name": "x"},
     "final", "a stopped record is frozen"),
    ({"status": "draft"}, {"status": "draft", "arms": [{"name": "x", "weight": 1, "description": None},
                                                     {"name": "y", "weight": 3, "description": None}]},
     None, "drafts are editable"),
    ({"status": "running"}, {"status": "running", "planned_end": 30 * DAY, "hypothesis": "h2"}, None,
     "extend a running test, reword its hypothesis"),
    ({"status": "running"}, {"status": "running", "arms": [{"name": "popular", "weight": 0.2, "description": None},
                                                         {"name": "personalized", "weight": 0.8, "description": None}]},
     "arms cannot change", "reweighting a running A/B test breaks its analysis"),
    ({"status": "running"}, {"status": "running", "surface": "search.results"}, "surface cannot change",
     "moving a running test"),
    ({"status": "running"}, {"status": "stopped", "ended": 11 * DAY, "population": {"country": ["DE"]}},
     "population cannot change", "stopping does not rewrite who was in it"),
])
def test_state_machine(first, second, refused, why):
    state = fold(exp(**first))
    after, reason = apply(state, "home-1", exp(revision=2, **second))
    if refused is None:
        assert reason is None, f"{why}: {reason}"
        assert after.experiments["home-1"]["revision"] == 2
    else:
        assert reason is not None and refused in reason, f"{why}: {reason}"
        assert after is state


@pytest.mark.parametrize("key,record,refused,why", [
    ("home-1", exp(status="running"), None, "redelivery of the applied revision: no change, no refusal"),
    ("home-1", exp(status="running", name="other"), "stale revision", "same revision, other content"),
    ("other-key", exp(revision=3, status="running"), "differs from the experiment id", "key mismatch"),
])
def test_redelivery_and_keys(key, record, refused, why):
    state = fold(exp(status="running"))
    after, reason = apply(state, key, record)
    assert (reason is None) == (refused is None) and (refused is None or refused in reason), why
    assert after.experiments == state.experiments


def test_tombstone_forgets_and_running_lists():
    state = fold(exp("a", status="running"), exp("b", surface="search.results", status="running"), exp("c"))
    assert [e["id"] for e in state.running()] == ["a", "b"]
    assert [e["id"] for e in state.running("search.results")] == ["b"]
    state, reason = apply(state, "a", None)
    assert reason is None and "a" not in state.experiments


def test_rebuild_from_the_compacted_topic_equals_the_live_state():
    """Live: every record in order. Compacted: only each id's latest record, in
    the order of those records' offsets. Both folds agree, although compaction
    moves draft b's edit after a's start (where `propose` would refuse a new draft)."""
    a, b = exp("a", population={"country": ["DE"]}), exp("b")
    log = [a, b, start(a, now=11 * DAY)]
    c = exp("c", population={"country": ["US"]})
    log += [c, start(c, now=11 * DAY + 1)]
    log.append({**b, "revision": 2, "hypothesis": "edited while a runs", "updated": 12 * DAY})
    log.append(stop(log[4], now=13 * DAY))
    live = Registry()
    for r in log:
        live = propose(live, r)
    latest = {r["id"]: (offset, r) for offset, r in enumerate(log)}
    compacted = [r for _, r in sorted(latest.values(), key=lambda x: x[0])]
    assert [r["id"] for r in compacted] == ["a", "b", "c"] and compacted[0]["status"] == "running"
    assert fold(*compacted).experiments == live.experiments
    with pytest.raises(RecordError, match="collision"):
        propose(fold(compacted[0]), compacted[1])


def test_helpers_refuse_wrong_moves():
    with pytest.raises(RecordError, match="only a draft"):
        start(exp(status="running"), now=11 * DAY)
    with pytest.raises(RecordError, match="passed"):
        start(exp(), now=30 * DAY)
    with pytest.raises(RecordError, match="already stopped"):
        stop(exp(status="stopped", ended=11 * DAY), now=12 * DAY)
