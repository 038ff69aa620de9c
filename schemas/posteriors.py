"""The `bandit.posteriors` topic (compacted): the latest posterior snapshot of each
experiment, keyed by experiment id.

Written by the bandits processor (streams/bandits.py) at most every
`posterior_publish_ms` per experiment and as soon as the stop flag changes;
read by the recommender (Thompson allocation) and the experiments service
(results, dashboard). Arrays are per arm, in the order of `arms` (sorted arm
names; an arm without rewards yet is absent and has the prior Beta(1, 1)).
`version` grows by one per published snapshot of an experiment; `seed` is the
seed of the Monte Carlo behind `prob_best` / `value_remaining`, derived from
(experiment, version), so a replay publishes the same numbers. `daily` maps a
UTC day (`YYYY-MM-DD`, by exposure time) to per-arm exposures rewarded and
clicks. Times are epoch milliseconds, UTC.
"""
from __future__ import annotations

from typing import TypedDict

SCHEMA_VERSION = 1


class DailyArm(TypedDict):
    exposures: int
    clicks: int


class Posterior(TypedDict):
    v: int                      # SCHEMA_VERSION
    experiment: str             # the record key
    version: int                # 1, 2, ... per experiment
    arms: list[str]
    alpha: list[float]          # 1 + clicks (prior Beta(1, 1))
    beta: list[float]           # 1 + exposures without a click
    exposures: list[int]        # rewards folded in, per arm
    clicks: list[int]           # rewards of 1, per arm
    prob_best: list[float]
    champion: str
    value_remaining: float
    stop: bool                  # value remaining < 1 % (never with fewer than two arms seen)
    draws: int
    seed: int
    as_of: int                  # the largest reward_ts folded in
    daily: dict[str, dict[str, DailyArm]]
