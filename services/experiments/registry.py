"""The experiment registry: a fold over the records of the compacted
`experiments` topic, with the record rules, the state machine and the collision rule.

    state = Registry()
    for key, record in topic:               # record None: a tombstone
        state, refused = apply(state, key, record)

`apply` is what every consumer (recommender, bandits, the API on start-up) runs,
so they all agree on which experiments run where. The API calls `propose`
before it writes a record: the same rules plus one that only makes sense at the
moment of writing (a new draft may not overlap a running experiment either; a
rebuild cannot check that, because compaction reorders a draft's latest edit
after experiments that started later).

State machine: draft -> running -> stopped, and draft -> stopped (abandoned).
A stopped experiment is final. While running, what defines the experiment
(surface, population, unit, kind, arms, namespace, metric, start) is frozen:
only name, owner, hypothesis and planned_end may change.

Collision: a running experiment (and a new one, at `propose`) may not share a
surface with another running one whose population overlaps, unless both sit in
the same namespace on disjoint bucket ranges. Populations are conjunctions of
"attribute in values": two overlap unless some attribute they both constrain
has no value in common. The unit (user_id or anonymous_id) is ignored: the same
person can carry both, so different units still overlap.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import fastjsonschema

from schemas import json_schema
from schemas.experiments import SCHEMA_VERSION, Experiment
from services.experiments import ExperimentError
from services.experiments.allocation import boundaries

# Also in schemas/json/experiments.schema.json (arms maxItems, weight maximum); a unit
# test keeps the two equal. Results cost grows with the arms (every treatment against
# the control, P(best) over all), and a weight is a share, so 1e6 is ample; the cap
# keeps 10000 x the total finite for the allocation's boundaries.
MAX_ARMS = 20
MAX_WEIGHT = 1_000_000

_validate_schema = fastjsonschema.compile(json_schema("experiments"))

TRANSITIONS = {
    ("draft", "draft"), ("draft", "running"), ("draft", "stopped"),
    ("running", "running"), ("running", "stopped"),
}
# What may change while an experiment runs (or as it stops).
MUTABLE_WHILE_RUNNING = frozenset({"revision", "name", "owner", "hypothesis", "planned_end",
                                   "status", "ended", "updated"})


class RecordError(ExperimentError):
    """A record that breaks the schema or the record rules."""


def validate(record: object) -> Experiment:
    """The record, if it keeps the schema and the rules; else RecordError with every reason found."""
    try:
        _validate_schema(record)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise RecordError(f"invalid experiment record: {exc.message}") from None
    assert isinstance(record, dict)
    reasons = []
    names = [arm["name"] for arm in record["arms"]]
    if len(set(names)) != len(names):
        reasons.append(f"arm names must be unique, got {names}")
    try:  # the split every reader computes must exist (all zero, or too large, has none)
        boundaries([arm["weight"] for arm in record["arms"]])
    except ExperimentError as exc:
        reasons.append(str(exc))
    if record["planned_end"] <= record["start"]:
        reasons.append(f"planned_end ({record['planned_end']}) must be after start ({record['start']})")
    if (record["status"] == "stopped") != (record["ended"] is not None):
        reasons.append("ended must be set exactly when the status is stopped")
    if record["epsilon"] is not None and record["kind"] != "epsilon_greedy":
        reasons.append(f"epsilon applies to epsilon_greedy experiments only, not {record['kind']}")
    ns = record["namespace"]
    if ns is not None and not ns["range"][0] < ns["range"][1]:
        reasons.append(f"namespace range {ns['range']} must be [start, end) with start < end")
    if reasons:
        raise RecordError(f"invalid experiment {record['id']!r}: " + "; ".join(reasons))
    return record  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Registry:
    experiments: Mapping[str, Experiment] = field(default_factory=lambda: MappingProxyType({}))

    def running(self, surface: str | None = None) -> list[Experiment]:
        """Running experiments, on one surface or all, by id."""
        return [e for _, e in sorted(self.experiments.items())
                if e["status"] == "running" and (surface is None or e["surface"] == surface)]

    def _with(self, key: str, record: Experiment | None) -> Registry:
        copy = dict(self.experiments)
        if record is None:
            copy.pop(key, None)
        else:
            copy[key] = record
        return Registry(MappingProxyType(copy))


def populations_overlap(p: Mapping[str, list[str]], q: Mapping[str, list[str]]) -> bool:
    return all(set(p[attr]) & set(q[attr]) for attr in p.keys() & q.keys())


def collision(new: Experiment, other: Experiment) -> str | None:
    """Why `new` may not run alongside the running `other`, or None."""
    if new["id"] == other["id"] or new["surface"] != other["surface"]:
        return None
    if not populations_overlap(new["population"], other["population"]):
        return None
    a, b = new["namespace"], other["namespace"]
    if a is not None and b is not None and a["name"] == b["name"]:
        if a["range"][1] <= b["range"][0] or b["range"][1] <= a["range"][0]:
            return None
        return (f"experiment collision: {other['id']!r} is running on {new['surface']!r} for an "
                f"overlapping population, and its range {b['range']} in namespace {b['name']!r} "
                f"overlaps {a['range']}; choose a disjoint range")
    return (f"experiment collision: {other['id']!r} is running on {new['surface']!r} for an "
            f"overlapping population; narrow the population, or put both in one namespace "
            f"with disjoint ranges")


def _collisions(state: Registry, record: Experiment) -> str | None:
    for other in state.running(record["surface"]):
        reason = collision(record, other)
        if reason:
            return reason
    return None


def apply(state: Registry, key: str | None, record: object | None) -> tuple[Registry, str | None]:
    """Fold one record into the registry: (new state, None), or (the same state, why
    it was refused). A tombstone (record None) forgets the key; a redelivered
    record (same revision, same content) changes nothing and is not refused."""
    if record is None:
        if key is None:
            return state, "a tombstone needs a key"
        return state._with(key, None), None
    try:
        exp = validate(record)
    except RecordError as exc:
        return state, str(exc)
    if key is not None and key != exp["id"]:
        return state, f"record key {key!r} differs from the experiment id {exp['id']!r}"
    current = state.experiments.get(exp["id"])
    if current is not None:
        if exp["revision"] <= current["revision"]:
            if exp == current:
                return state, None
            return state, (f"stale revision {exp['revision']} of {exp['id']!r}: "
                           f"revision {current['revision']} is already applied")
        move = (current["status"], exp["status"])
        if move not in TRANSITIONS:
            return state, (f"{exp['id']!r} cannot go from {move[0]} to {move[1]}"
                           + (" (a stopped experiment is final; create a new one)"
                              if move[0] == "stopped" else ""))
        if current["status"] == "running":
            changed = sorted(k for k in exp if k not in MUTABLE_WHILE_RUNNING and exp[k] != current[k])
            if changed:
                return state, (f"{exp['id']!r} is running: {', '.join(changed)} cannot change "
                               "(stop it and create a new experiment)")
    if exp["status"] == "running":
        reason = _collisions(state, exp)
        if reason:
            return state, reason
    return state._with(exp["id"], exp), None


def propose(state: Registry, record: object) -> Registry:
    """What the API checks before writing a record: `apply`'s rules, and a new
    experiment may not overlap a running one even as a draft. RecordError if refused."""
    if isinstance(record, dict) and record.get("id") not in state.experiments:
        try:
            exp = validate(record)
        except RecordError:
            pass  # apply reports it
        else:
            reason = _collisions(state, exp)
            if reason:
                raise RecordError(reason)
    new, refused = apply(state, record.get("id") if isinstance(record, dict) else None, record)
    if refused:
        raise RecordError(refused)
    return new


def revise(current: Experiment, now: int, **changes) -> Experiment:
    """The next revision of `current` with `changes`, written at `now` (epoch ms)."""
    return {**current, **changes, "v": SCHEMA_VERSION,  # type: ignore[typeddict-item]
            "revision": current["revision"] + 1, "updated": now}


def start(current: Experiment, now: int) -> Experiment:
    """The running revision of a draft: its start becomes now, the actual start."""
    if current["status"] != "draft":
        raise RecordError(f"{current['id']!r} is {current['status']}: only a draft can start")
    if current["planned_end"] <= now:
        raise RecordError(f"{current['id']!r} was planned to end at {current['planned_end']}, "
                          "which has passed; set a later planned_end first")
    return revise(current, now, status="running", start=now)


def stop(current: Experiment, now: int) -> Experiment:
    if current["status"] == "stopped":
        raise RecordError(f"{current['id']!r} is already stopped")
    return revise(current, now, status="stopped", ended=now)
