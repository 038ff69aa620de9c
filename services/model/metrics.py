"""Offline evaluation: recall@k, NDCG@k (binary relevance) and the popularity baseline.

Models are evaluated through the serving ranker (`services.recommender.ranking.rank`),
so the figures describe what the service would return: seen items excluded,
popularity blended for light users, popularity alone for users without a
vector. The popularity baseline is that same ranker without user vectors.

Definitions, per user with at least one relevant item, averaged over users:
- recall@k = |top k ∩ relevant| / |relevant|
- NDCG@k = DCG / IDCG with DCG = Σ over hits at rank r (1-based, r ≤ k) of
  1 / log2(r + 1), IDCG the same for min(k, |relevant|) hits at the top.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.model.transform import InteractionMatrix
from services.recommender.ranking import DEFAULT_SHRINK, Catalogue, rank

Recommender = Callable[[str, int], Sequence[str]]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Mean recall@k and NDCG@k over the evaluated users."""

    k: int
    users: int                  # users with relevant items that were evaluated
    recall: float
    ndcg: float

    def as_dict(self) -> dict:
        """For the artifact's manifest, keys like `recall@10`."""
        return {"k": self.k, "users": self.users, f"recall@{self.k}": self.recall,
                f"ndcg@{self.k}": self.ndcg}


def recall_at_k(recommended: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Share of the relevant items found in the first k (0.0 when nothing is relevant)."""
    if not relevant:
        return 0.0
    return len(set(recommended[:k]) & set(relevant)) / len(relevant)


def ndcg_at_k(recommended: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Normalized discounted cumulative gain of the first k, binary relevance."""
    if not relevant:
        return 0.0
    rel = set(relevant)
    dcg = sum(1.0 / math.log2(r + 2) for r, item in enumerate(recommended[:k]) if item in rel)
    idcg = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(rel))))
    return dcg / idcg


def evaluate(recommend: Recommender, truth: Mapping[str, Collection[str]], k: int) -> Evaluation:
    """Mean recall@k and NDCG@k of a recommender over the users of the hold-out truth."""
    users = [u for u in sorted(truth) if truth[u]]
    if not users:
        return Evaluation(k, 0, 0.0, 0.0)
    recall = ndcg = 0.0
    for user in users:
        items = list(recommend(user, k))
        recall += recall_at_k(items, truth[user], k)
        ndcg += ndcg_at_k(items, truth[user], k)
    return Evaluation(k, len(users), recall / len(users), ndcg / len(users))


def catalogue_of(train: InteractionMatrix, item_factors: np.ndarray) -> Catalogue:
    """The serving catalogue of a trained model: its items, factors and train popularity."""
    popularity = np.asarray(train.matrix.sum(axis=0), np.float64).ravel()
    return Catalogue(train.items, item_factors, popularity)


def ranker(catalogue: Catalogue, train: InteractionMatrix, user_factors: np.ndarray | None,
           shrink: float = DEFAULT_SHRINK) -> Recommender:
    """Top-k as the service ranks it: train items excluded, a user's train count as their
    interactions; `user_factors=None` gives the popularity baseline."""
    rows = {u: r for r, u in enumerate(train.users)}
    m = train.matrix
    ids = train.items

    def recommend(user: str, k: int) -> list[str]:
        """The top k item ids for a user."""
        r = rows.get(user)
        seen = [ids[j] for j in m.indices[m.indptr[r]:m.indptr[r + 1]]] if r is not None else []
        vector = user_factors[r] if user_factors is not None and r is not None else None
        return rank(catalogue, vector, k, seen=seen, n_interactions=len(seen), shrink=shrink).items

    return recommend
