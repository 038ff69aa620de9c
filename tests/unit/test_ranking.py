"""Ranking: top-k against a brute-force sort, exclusion, tie-breaking, cold-user blending, fallback."""
from __future__ import annotations

import numpy as np
import pytest

from services.recommender.ranking import (Catalogue, benchmark, cold_weight, fallback, popularity_prior,
                                          rank, rank_numpy, top_k)


def reference(scores, k, exclude=()):
    """Brute force: sort every allowed finite position by (-score, position)."""
    allowed = [i for i in range(len(scores)) if i not in set(exclude) and not np.isnan(scores[i])]
    return sorted(allowed, key=lambda i: (-scores[i], i))[:k]


@pytest.mark.parametrize("scores,k,exclude,expected,why", [
    ([0.1, 0.9, 0.5], 2, None, [1, 2], "best first"),
    ([1, 1, 1, 1], 2, None, [0, 1], "all tied: lowest positions"),
    ([0, 2, 1, 2, 1, 2], 2, None, [1, 3], "three tied for the top two places"),
    ([0, 2, 1, 2, 1, 1], 3, None, [1, 3, 2], "a tie at the k-th place takes the lowest position"),
    ([3, 2, 1], 5, None, [0, 1, 2], "k above the item count returns all"),
    ([3, 2, 1], 0, None, [], "k = 0"),
    ([3, 2, 1], 2, [0], [1, 2], "excluded never returned"),
    ([3, 2, 1], 3, [0, 1, 2], [], "everything excluded: empty, not padded"),
    ([np.nan, 1.0, np.nan, 0.5], 3, None, [1, 3], "NaN scores are never returned"),
    ([-np.inf, -1.0], 2, None, [1], "minus infinity counts as excluded"),
    ([], 3, None, [], "empty catalogue"),
])
def test_top_k_cases(scores, k, exclude, expected, why):
    ex = None if exclude is None else np.asarray(exclude, np.int64)
    idx, vals = top_k(np.asarray(scores, np.float64), k, ex)
    assert idx.tolist() == expected, why
    assert vals.tolist() == [scores[i] for i in expected]


@pytest.mark.parametrize("seed", range(20))
def test_top_k_matches_a_full_sort_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    scores = rng.integers(0, 8, n).astype(np.float32)  # small range: ties everywhere
    exclude = rng.choice(n, int(rng.integers(0, n)), replace=False)
    k = int(rng.integers(1, n + 2))
    assert top_k(scores, k, exclude)[0].tolist() == reference(scores, k, exclude.tolist())


def test_top_k_leaves_the_callers_scores_alone():
    scores = np.array([1.0, np.nan, 3.0], np.float32)
    top_k(scores, 1, np.array([2]))
    assert np.isnan(scores[1]) and scores[2] == 3.0


@pytest.mark.parametrize("n,shrink,expected", [
    (0, 2.0, 1.0), (2, 2.0, 0.5), (6, 2.0, 0.25), (-3, 2.0, 1.0), (5, 0.0, 0.0),
])
def test_cold_weight(n, shrink, expected):
    assert cold_weight(n, shrink) == expected


def test_popularity_prior_is_log_scaled_to_unit():
    prior = popularity_prior(np.array([0, 1, 3, 7]))
    np.testing.assert_allclose(prior, np.log1p([0, 1, 3, 7]) / np.log(8), rtol=1e-6)
    assert popularity_prior(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def catalogue() -> Catalogue:
    # Two tastes: items a* on axis 0, b* on axis 1; "pop" is popular and fits neither.
    ids = ["a1", "a2", "b1", "b2", "pop"]
    factors = np.array([[1.0, 0.0], [0.9, 0.0], [0.0, 1.0], [0.0, 0.8], [0.1, 0.1]], np.float32)
    return Catalogue(ids, factors, np.array([5, 1, 5, 1, 1000]))


@pytest.mark.parametrize("vector,n,seen,k,items,path,why", [
    (None, 0, (), 3, ["pop", "a1", "b1"], "cold_start", "no vector: popularity, ties by position"),
    (None, 0, ("pop",), 2, ["a1", "b1"], "cold_start", "cold start still drops seen items"),
    ([1.0, 0.0], 1_000, (), 2, ["a1", "a2"], "model", "heavy user: the model decides"),
    ([1.0, 0.0], 1_000, ("a1",), 2, ["a2", "pop"], "model", "seen items filtered"),
    ([1.0, 0.0], 0, (), 1, ["pop"], "model", "no interactions: popularity weight 1"),
    ([0.0, 1.0], 2, (), 2, ["b1", "pop"], "model", "light user: half model, half popularity"),
    ([0.0, 1.0], 1_000, ("zz", "b1"), 1, ["b2"], "model", "unknown seen ids are ignored"),
])
def test_rank(vector, n, seen, k, items, path, why):
    vec = None if vector is None else np.asarray(vector, np.float32)
    got = rank(catalogue(), vec, k, seen=seen, n_interactions=n)
    assert (got.items, got.path) == (items, path), why
    assert got.scores == sorted(got.scores, reverse=True)


def test_blended_scores_mix_unit_scaled_model_and_prior():
    cat = catalogue()
    got = rank(cat, np.array([0.0, 1.0], np.float32), 5, n_interactions=2)
    model = cat.factors @ np.array([0.0, 1.0], np.float32)
    unit = (model - model.min()) / (model.max() - model.min())
    expected = 0.5 * unit + 0.5 * cat.prior
    assert got.scores == pytest.approx(sorted(expected.tolist(), reverse=True))


@pytest.mark.parametrize("popular,k,exclude,items,why", [
    ([("x", 9.0), ("y", 5.0), ("z", 1.0)], 2, (), ["x", "y"], "first k of the live list"),
    ([("x", 9.0), ("y", 5.0), ("z", 1.0)], 2, ("x",), ["y", "z"], "excluded skipped, still k"),
    ([("x", 9.0)], 3, (), ["x"], "short list: what there is"),
    ([], 3, (), [], "empty list"),
])
def test_fallback(popular, k, exclude, items, why):
    got = fallback(popular, k, exclude)
    assert (got.items, got.path) == (items, "fallback"), why


@pytest.mark.parametrize("ids,rows,counts", [(["a", "b"], 3, None), (["a", "a"], 2, None),
                                             (["a", "b"], 2, np.ones(3))])
def test_catalogue_refuses_misaligned_inputs(ids, rows, counts):
    with pytest.raises(ValueError):
        Catalogue(ids, np.zeros((rows, 2), np.float32), counts)


def test_benchmark_reports_figures():
    out = benchmark(n_items=200, factors=8, k=5, rounds=20, cold_rounds=4, evict_mb=1)
    assert out["n_items"] == 200 and out["rounds"] == 20
    for name in ("top_k", "rank", "rank_cold", "numpy", "numpy_cold"):
        assert 0 < out[f"{name}_p50_us"] <= out[f"{name}_p99_us"]
    assert out["rank_fast_share"] == 1.0 and 5 <= out["rank_rescored_mean"] <= 200


@pytest.mark.parametrize("vector,n,seen,k,items,path,why", [
    (None, 0, ("pop",), 2, ["a1", "b1"], "cold_start", "popularity alone"),
    ([1.0, 0.0], 1_000, ("a1",), 2, ["a2", "pop"], "model", "heavy user"),
    ([0.0, 1.0], 2, (), 5, ["b1", "pop", "b2", "a1", "a2"], "model", "blend, every item"),
])
def test_rank_equals_the_numpy_reference(vector, n, seen, k, items, path, why):
    vec = None if vector is None else np.asarray(vector, np.float32)
    got = rank(catalogue(), vec, k, seen=seen, n_interactions=n)
    assert got == rank_numpy(catalogue(), vec, k, seen=seen, n_interactions=n), why
    assert (got.items, got.path) == (items, path), why


@pytest.mark.parametrize("n,k,levels,nan_share,n_excluded,why", [
    (10_000, 10, None, 0.0, 0, "the serving shape: 10,000 scores, top 10"),
    (10_000, 100, None, 0.0, 50, "the largest k, with a full recent list excluded"),
    (5_000, 10, 3, 0.0, 0, "three distinct values: thousands tied at the threshold"),
    (5_000, 20, 40, 0.1, 20, "ties, NaN and exclusions together"),
    (640, 10, None, 0.0, 0, "exactly 64 k: the smallest array sampled"),
    (639, 10, None, 0.0, 0, "just under: the argpartition path"),
    (10_000, 10, 1, 0.0, 9_995, "all but five excluded: fewer than k come back"),
])
def test_sampled_threshold_top_k_is_exact(n, k, levels, nan_share, n_excluded, why):
    rng = np.random.default_rng(n + k)
    scores = (rng.integers(0, levels, n) if levels else rng.standard_normal(n)).astype(np.float32)
    scores[rng.random(n) < nan_share] = np.nan
    exclude = rng.choice(n, n_excluded, replace=False) if n_excluded else None
    got, got_scores = top_k(scores, k, exclude)
    want = reference(scores, k, exclude if exclude is not None else ())
    assert got.tolist() == want, why
    assert np.array_equal(got_scores, scores[want]), why
