"""The `exposures` topic: one record per recommendation response, keyed by visitor.

Written by the recommender from a background producer (never awaited on the
request path); read by attribution and bandits (issue 6) and the archive.
`items` are what the client was shown, best first, with their 0-based
positions and the scores they were ranked by. `experiment` and `arm` are null
unless the response was served inside an experiment. For a bandit arm
(thompson, epsilon_greedy) `posterior_version`, `seed` and `draw` record the
decision so it replays: the snapshot of that version on `bandit.posteriors`
(version 0: no snapshot yet, every arm Beta(1, 1)), the sampler's seed and the
decision's index (services/recommender/experiments.py); null for A/B arms
(the hash decides) and outside experiments. These three fields were added in
issue 6 without a version bump: they are additive, and records written before
them (no such keys) read as null. Times are epoch milliseconds, UTC.
"""
from __future__ import annotations

from typing import Literal, TypedDict

SCHEMA_VERSION = 1

ServePath = Literal["model", "fallback", "cold_start"]
# Why a fallback was served (null on the other paths).
FallbackReason = Literal["no_model", "redis_error", "redis_timeout", "redis_open", "model_error",
                         "model_open", "budget"]
# Where the items came from: online scoring, the precomputed top-k, the live
# popular list kept in memory, or the model's training popularity.
Source = Literal["online", "precomputed", "popular", "prior"]


class ExposedItem(TypedDict):
    item_id: str
    position: int               # 0-based
    score: float


class Exposure(TypedDict):
    v: int                      # SCHEMA_VERSION
    request_id: str
    ts: int                     # when the response was built (epoch ms)
    visitor: str                # user_id, else anonymous_id (the record key)
    user_id: str | None
    anonymous_id: str | None
    k: int                      # items asked for (items may hold fewer)
    items: list[ExposedItem]
    model: str | None           # model name, null when no model was loaded
    model_version: str | None
    path: ServePath
    reason: FallbackReason | None
    source: Source
    experiment: str | None      # issue 6
    arm: str | None
    posterior_version: int | None   # bandit arms: the snapshot version decided on
    seed: int | None                # bandit arms: the sampler's seed
    draw: int | None                # bandit arms: the decision's index for that seed
