"""The records the recommender writes to Kafka: exposures and shadow rankings. Pure.

One `exposures` record per response (schemas/exposures.py), keyed by visitor,
so attribution and bandits (issue 6) see every item shown, at which position,
by which model version and path, and in which experiment arm (null outside
experiments; see experiments.py). One `shadow` record per sampled request
(schemas/shadow.py): both rankings of the same request, the served one and the
shadow model's, for offline comparison.
"""
from __future__ import annotations

from collections.abc import Sequence

from schemas.exposures import SCHEMA_VERSION as EXPOSURE_VERSION
from schemas.exposures import Exposure, ExposedItem
from schemas.shadow import SCHEMA_VERSION as SHADOW_VERSION
from schemas.shadow import ShadowRanking, ShadowRecord
from services.recommender.request import Query


def exposed_items(items: Sequence[str], scores: Sequence[float]) -> list[ExposedItem]:
    """Items with their 0-based positions and scores."""
    return [{"item_id": item, "position": pos, "score": float(score)}
            for pos, (item, score) in enumerate(zip(items, scores))]


def exposure(request_id: str, ts: int, query: Query, items: Sequence[str], scores: Sequence[float],
             path: str, reason: str | None, source: str, model: str | None,
             model_version: str | None, experiment: str | None = None,
             arm: str | None = None, posterior_version: int | None = None,
             seed: int | None = None, draw: int | None = None) -> Exposure:
    """The exposure of one response (experiment and arm when in an experiment; for a
    bandit arm also the posterior version, sampler seed and draw index that replay it)."""
    return {"v": EXPOSURE_VERSION, "request_id": request_id, "ts": ts, "visitor": query.visitor,
            "user_id": query.user_id, "anonymous_id": query.anonymous_id, "k": query.k,
            "items": exposed_items(items, scores), "model": model,
            "model_version": model_version, "path": path, "reason": reason, "source": source,
            "experiment": experiment, "arm": arm, "posterior_version": posterior_version,
            "seed": seed, "draw": draw}


def ranking(model: str | None, version: str | None, path: str, items: Sequence[str],
            scores: Sequence[float]) -> ShadowRanking:
    """One side of a shadow record."""
    return {"model": model, "model_version": version, "path": path, "items": list(items),
            "scores": [float(s) for s in scores]}


def overlap(a: Sequence[str], b: Sequence[str]) -> float:
    """|a ∩ b| / max(|a|, |b|): 1.0 for the same items in any order, 0.0 for none shared."""
    n = max(len(a), len(b))
    return len(set(a) & set(b)) / n if n else 1.0


def shadow(request_id: str, ts: int, query: Query, served: ShadowRanking,
           shadowed: ShadowRanking, shadow_us: int) -> ShadowRecord:
    """Both rankings of one request."""
    return {"v": SHADOW_VERSION, "request_id": request_id, "ts": ts, "visitor": query.visitor,
            "k": query.k, "served": served, "shadow": shadowed,
            "overlap": overlap(served["items"], shadowed["items"]), "shadow_us": shadow_us}
