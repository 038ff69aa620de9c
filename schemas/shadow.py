"""The `shadow` topic: both rankings of a request scored by the shadow model, keyed by visitor.

Written by the recommender for a deterministic sample of requests
(CLICKLOOP_SHADOW_FRACTION, by a hash of the request id); the served ranking is
always the current model's, the shadow one is only logged. `overlap` is the
share of items both lists hold; `shadow_us` what scoring the shadow cost.
"""
from __future__ import annotations

from typing import TypedDict

SCHEMA_VERSION = 1


class ShadowRanking(TypedDict):
    model: str | None
    model_version: str | None
    path: str                   # model | fallback | cold_start
    items: list[str]
    scores: list[float]


class ShadowRecord(TypedDict):
    v: int                      # SCHEMA_VERSION
    request_id: str             # the exposure's request id
    ts: int                     # epoch ms
    visitor: str
    k: int
    served: ShadowRanking
    shadow: ShadowRanking
    overlap: float              # |served ∩ shadow| / max(len)
    shadow_us: int
