"""The `experiments` topic (compacted): the current record of each experiment,
keyed by experiment id.

Written by the experiments API; read by the recommender and the bandits
processor, which rebuild the registry by folding these records
(services.experiments.registry.apply). Every change is a whole new record with
`revision` one higher; compaction keeps the latest. The record answers who is
affected (surface, population, unit), what (arms, kind, hypothesis, primary
metric), where (surface, namespace range) and for how long (start,
planned_end, ended). Times are epoch milliseconds, UTC.
"""
from __future__ import annotations

from typing import Literal, TypedDict

SCHEMA_VERSION = 1

Kind = Literal["ab", "thompson", "epsilon_greedy"]
Status = Literal["draft", "running", "stopped"]
Unit = Literal["user_id", "anonymous_id"]


class ArmSpec(TypedDict):
    name: str                   # unique within the experiment, e.g. "popular", "personalized"
    weight: float               # share of traffic (A/B), initial share (bandits); 0 <= weight <= 1e6 (registry.MAX_WEIGHT)
    description: str | None


class Namespace(TypedDict):
    name: str                   # experiments in one namespace split its 10,000 buckets
    range: list[int]            # [start, end), 0 <= start < end <= 10000


class Experiment(TypedDict):
    v: int                      # SCHEMA_VERSION
    revision: int               # 1 for the first record of an id, higher for every change
    id: str                     # [A-Za-z0-9][A-Za-z0-9._-]*, no ':' (it salts the allocation hash)
    name: str
    owner: str
    hypothesis: str
    surface: str                # where it is served, e.g. "home.recommendations"
    population: dict[str, list[str]]  # attribute -> allowed values, all must hold; {} = everyone
    unit: Unit                  # what is randomized
    arms: list[ArmSpec]         # 2 to 20 (registry.MAX_ARMS)
    kind: Kind
    epsilon: float | None       # epsilon_greedy's exploration share (null: 0.05)
    primary_metric: str         # e.g. "click_through"
    start: int                  # planned (or actual) start, epoch ms
    planned_end: int            # epoch ms, after start
    ended: int | None           # when it was stopped; set exactly when status is "stopped"
    status: Status              # draft -> running -> stopped (or draft -> stopped)
    namespace: Namespace | None
    updated: int                # when this revision was written, epoch ms
