"""The `models` topic: announcements of trained model artifacts (compacted, keyed by model name).

Written by `clickloop train` (services/model/train.py) once an artifact is
durable under CLICKLOOP_MODEL_DIR; read by the recommender, which loads the
newest announcement that loads and verifies of the name it serves (and of its
shadow model) at start-up and hot-swaps on a new one; the record key must be the
announced model's name. Compaction keeps the last announcement per name,
so a consumer reading the topic from the beginning sees the current model of
every name. The record says where the artifact is and how to check it; the
arrays themselves never travel through Kafka.

Built by services.model.artifact.announcement(); times are epoch milliseconds, UTC.
"""
from __future__ import annotations

from typing import TypedDict

SCHEMA_VERSION = 1


class ModelMetrics(TypedDict, total=False):
    """What `clickloop train` measured on its time-based hold-out (services/model/metrics.py)."""
    k: int                      # the k of recall@k and NDCG@k
    users: int                  # hold-out users evaluated
    cutoff_ms: int              # train < cutoff <= test (event time)
    train_interactions: int
    test_interactions: int
    model: dict[str, float]     # {"recall@<k>": ..., "ndcg@<k>": ...} of the model
    popularity: dict[str, float]  # the same for the popularity baseline


class ModelAnnouncement(TypedDict):
    v: int                      # SCHEMA_VERSION
    name: str                   # the model name: also the record key (UTF-8)
    version: str                # sortable and unique: <UTC time>-<short hash of the arrays>
    path: str                   # the artifact: <model dir>/<name>/<version>, an absolute path or a URI
    content_sha256: str         # services.model.artifact.content_hash: verify before serving
    created_ms: int
    data_range: list[int] | None  # [first, last] event time of the training data
    metrics: ModelMetrics
