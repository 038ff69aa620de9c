"""Ranking items for one request: pure, no I/O.

Model scores are the dot products of a user vector with every item vector
(`Catalogue.factors`); ties break by catalogue position, lower first, also at the
k-th place, so the same input always gives the same list. Seen and excluded items
are never returned.

Cold users: with few interactions a user's vector says little, so the model's
scores (min-max scaled to [0, 1]) are blended with the items' popularity prior
(log-scaled to [0, 1]) with weight `shrink / (shrink + n)` on popularity for a
user with n interactions: 1 for a user with none, 1/2 at n = shrink, towards 0
for heavy users. A user without a vector is ranked by popularity alone
(`cold_start`); when the model or features are unavailable the service ranks
the live popular list it keeps in memory (`fallback`).

`rank` runs natively (`streams._native.ScoreIndex`, native/src/score.rs, built once
per model by `Catalogue`): the factors are also kept as int8 with a per-row scale
(640 KB for 10,000 x 64 items, which stays in the core's L2 between requests where
the 2.56 MB float32 matrix is evicted to DRAM), one integer pass bounds every score,
and only the rows whose bound can reach the top k (and the min/max for the blend) are
rescored in float32. It is exact, not approximate: the same items as a float32 pass
over all rows, in a fraction of the memory traffic and in one call with the GIL
released. `rank_numpy` is the same formula in numpy (`factors @ v`, blend, `top_k`),
kept as the documented reference for tests and the benchmark; the two agree up to
float32 summation order (the native dot sums in 8 lanes, BLAS in its own order).
"""
from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from streams._native import ScoreIndex

Path = Literal["model", "fallback", "cold_start"]
DEFAULT_SHRINK = 2.0
SAMPLE_STEP, SAMPLE_MIN = 16, 4   # top_k's sampled threshold, for arrays >= 64 k


@dataclass(frozen=True, slots=True)
class Ranking:
    """Ranked item ids with their scores, best first, and the path that produced them."""

    items: list[str]
    scores: list[float]
    path: Path


def popularity_prior(counts: np.ndarray) -> np.ndarray:
    """Counts to [0, 1] on a log scale (float32); all zeros stays all zeros."""
    logs = np.log1p(np.maximum(np.asarray(counts, np.float64), 0.0))
    top = logs.max(initial=0.0)
    return (logs / top if top > 0 else logs).astype(np.float32)


class Catalogue:
    """A model's items, aligned: ids, factor matrix and popularity prior."""

    def __init__(self, item_ids: Sequence[str], factors: np.ndarray,
                 popularity: np.ndarray | None = None) -> None:
        if len(item_ids) != factors.shape[0]:
            raise ValueError(f"{len(item_ids)} item ids for {factors.shape[0]} factor rows")
        self.ids = list(item_ids)
        self.index = {item: i for i, item in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise ValueError("item ids must be unique")
        self.factors = np.ascontiguousarray(factors, np.float32)
        counts = np.zeros(len(self.ids)) if popularity is None else popularity
        if len(counts) != len(self.ids):
            raise ValueError(f"{len(counts)} popularity counts for {len(self.ids)} items")
        self.prior = popularity_prior(counts)
        self.native = ScoreIndex(self.factors, self.prior)

    def position_list(self, items: Iterable[str]) -> list[int]:
        """Catalogue positions of the items it holds (others ignored): what the native
        index takes."""
        index = self.index
        return [index[i] for i in items if i in index]

    def positions(self, items: Iterable[str]) -> np.ndarray:
        """`position_list` as an int64 array (for numpy indexing)."""
        return np.asarray(self.position_list(items), np.int64)


def cold_weight(n_interactions: int, shrink: float = DEFAULT_SHRINK) -> float:
    """Weight on popularity for a user with n interactions: shrink / (shrink + n)."""
    return shrink / (shrink + max(n_interactions, 0)) if shrink > 0 else 0.0


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions and scores of the k best, best first; ties by lower position; excluded
    positions and NaN scores are never returned (fewer than k when too few remain)."""
    s = np.asarray(scores)
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    bad = np.isnan(s)
    if bad.any() or (exclude is not None and exclude.size):
        s = np.where(bad, -np.inf, s)
        if exclude is not None and exclude.size:
            s[exclude] = -np.inf
    k = min(k, s.size)
    if k <= 0:
        return np.empty(0, np.int64), np.empty(0, s.dtype)
    if k < s.size and s.size >= SAMPLE_STEP * SAMPLE_MIN * k:
        # The k-th best of every SAMPLE_STEP-th score is a threshold at most the k-th best
        # of all (k sampled scores reach it), so every top-k score is >= it: exact, and a
        # few hundred candidates to sort instead of an argpartition of all (~5x faster).
        sample = s[::SAMPLE_STEP]
        threshold = np.partition(sample, sample.size - k)[sample.size - k]
        cand = np.flatnonzero(s >= threshold)
    elif k < s.size:
        part = np.argpartition(s, s.size - k)[s.size - k:]
        kth = s[part].min()
        # argpartition picks any of equal scores at the k-th place; take the lowest positions.
        above = np.flatnonzero(s > kth)
        ties = np.flatnonzero(s == kth)[:k - above.size]
        cand = np.concatenate([above, ties])
    else:
        cand = np.arange(s.size)
    cand = cand[np.lexsort((cand, -s[cand]))][:k]
    cand = cand[s[cand] > -np.inf]
    return cand, s[cand]


def _unit_range(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x  # an empty catalogue: nothing to scale
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def rank(catalogue: Catalogue, user_vector: np.ndarray | None, k: int,
         seen: Collection[str] = (), n_interactions: int = 0,
         shrink: float = DEFAULT_SHRINK) -> Ranking:
    """The top k for a user: model scores blended with popularity by `cold_weight`, seen
    items excluded; popularity alone (`cold_start`) without a user vector."""
    exclude = catalogue.position_list(seen) if seen else []
    if user_vector is None:
        idx, scores = catalogue.native.top_k(None, k, 0.0, exclude)
        path: Path = "cold_start"
    else:
        vector = np.ascontiguousarray(user_vector, np.float32)
        idx, scores = catalogue.native.top_k(vector, k, cold_weight(n_interactions, shrink), exclude)
        path = "model"
    ids = catalogue.ids
    return Ranking([ids[i] for i in idx], scores, path)


def rank_numpy(catalogue: Catalogue, user_vector: np.ndarray | None, k: int,
               seen: Collection[str] = (), n_interactions: int = 0,
               shrink: float = DEFAULT_SHRINK) -> Ranking:
    """`rank` as the numpy formula: the reference (float32 throughout, BLAS's summation order)."""
    exclude = catalogue.positions(seen) if seen else None
    if user_vector is None:
        idx, scores = top_k(catalogue.prior, k, exclude)
        path: Path = "cold_start"
    else:
        scores = catalogue.factors @ np.asarray(user_vector, np.float32)
        w = cold_weight(n_interactions, shrink)
        if w > 0.0:
            scores = (1.0 - w) * _unit_range(scores) + w * catalogue.prior
        idx, scores = top_k(scores, k, exclude)
        path = "model"
    ids = catalogue.ids
    return Ranking([ids[i] for i in idx], scores.tolist(), path)


def fallback(popular: Sequence[tuple[str, float]], k: int, exclude: Collection[str] = ()) -> Ranking:
    """The first k of a ranked popular list (best first) that are not excluded."""
    items: list[str] = []
    scores: list[float] = []
    for item, score in popular:  # stops at k: the list may hold thousands
        if len(items) >= k:
            break
        if item not in exclude:
            items.append(item)
            scores.append(float(score))
    return Ranking(items, scores, "fallback")


def _evict(scratch: np.ndarray | None, gap_s: float) -> None:
    """What happens between two requests of a real service: other requests and processes
    use the caches. Write a buffer larger than the L3 and/or spin for a gap (spinning, not
    sleeping: the core stays awake, only the other processes' work reaches the caches)."""
    if scratch is not None:
        scratch += 1
    end = time.perf_counter() + gap_s
    while time.perf_counter() < end:
        pass


def benchmark(n_items: int = 10_000, factors: int = 64, k: int = 10, rounds: int = 2_000,
              seed: int = 0, cold_rounds: int | None = None, evict_mb: int = 64,
              gap_ms: float = 0.0) -> dict[str, float]:
    """Per-call latency (µs: mean, p50, p99) of `top_k` alone, of the native index's query
    alone (`index`), and of `rank` (native) and `rank_numpy` (the reference) for a warm user
    with 20 seen items, on random float32 factors: warm (back to back) and cold (a
    `evict_mb` buffer written and/or `gap_ms` spun between calls); plus the native fast
    path's share of calls and mean rescored rows per call. For bench/, not tests' timing."""
    rng = np.random.default_rng(seed)
    catalogue = Catalogue([f"i{j}" for j in range(n_items)],
                          rng.standard_normal((n_items, factors)).astype(np.float32),
                          rng.poisson(5.0, n_items))
    users = rng.standard_normal((rounds, factors)).astype(np.float32)
    seen = [f"i{j}" for j in rng.choice(n_items, 20, replace=False)]
    seen_positions = catalogue.position_list(seen)
    scores = catalogue.factors @ users[0]
    cold_rounds = max(1, rounds // 4) if cold_rounds is None else cold_rounds
    scratch = np.zeros(evict_mb << 18, np.float32) if evict_mb > 0 else None
    out: dict[str, float] = {"n_items": n_items, "factors": factors, "k": k, "rounds": rounds,
                             "cold_rounds": cold_rounds, "evict_mb": evict_mb, "gap_ms": gap_ms}
    w = cold_weight(20)
    native = catalogue.native

    def rank_native(u):
        return rank(catalogue, u, k, seen, n_interactions=20)

    def rank_reference(u):
        return rank_numpy(catalogue, u, k, seen, n_interactions=20)

    calls = (("top_k", lambda u: top_k(scores, k), False),
             ("index", lambda u: native.top_k(u, k, w, seen_positions), False),
             ("index_cold", lambda u: native.top_k(u, k, w, seen_positions), True),
             ("rank", rank_native, False), ("rank_cold", rank_native, True),
             ("numpy", rank_reference, False), ("numpy_cold", rank_reference, True))
    fast0, _, rescored0 = native.stats()
    for name, call, cold in calls:
        n = cold_rounds if cold else rounds
        times = np.empty(n)
        for r in range(n):
            if cold:
                _evict(scratch, gap_ms / 1e3)
            t0 = time.perf_counter()
            call(users[r])
            times[r] = time.perf_counter() - t0
        times *= 1e6
        out.update({f"{name}_mean_us": float(times.mean()),
                    f"{name}_p50_us": float(np.percentile(times, 50)),
                    f"{name}_p99_us": float(np.percentile(times, 99))})
    fast, _, rescored = native.stats()
    out["rank_fast_share"] = (fast - fast0) / (2 * (rounds + cold_rounds))
    out["rank_rescored_mean"] = (rescored - rescored0) / max(fast - fast0, 1)
    return out
