"""The native top-k (streams._native.ScoreIndex): the quantized fast path gives exactly the
full float32 pass's positions and bits, and both match the numpy reference formula."""
from __future__ import annotations

import numpy as np
import pytest

from services.recommender.ranking import Catalogue, cold_weight, popularity_prior, rank, rank_numpy, top_k
from streams._native import ScoreIndex


def gaussian(rng, n, d):
    return rng.standard_normal((n, d)).astype(np.float32)


def near_ties(rng, n, d):
    # Few distinct small integers: thousands of exactly equal scores at the cut.
    return rng.integers(-2, 3, (n, d)).astype(np.float32)


def scaled_copies(rng, n, d):
    # Rows are multiples of a handful of base rows: scores proportional, bounds overlapping.
    base = rng.standard_normal((4, d)).astype(np.float32)
    return (base[rng.integers(0, 4, n)] * rng.choice([0.5, 1.0, 1.0 + 2**-20, 2.0, -1.0], (n, 1))).astype(np.float32)


def tiny(rng, n, d):
    return (rng.standard_normal((n, d)) * 1e-18).astype(np.float32)


def huge(rng, n, d):
    return (rng.standard_normal((n, d)) * 1e12).astype(np.float32)


def mixed_magnitudes(rng, n, d):
    return (rng.standard_normal((n, d)) * 10.0 ** rng.integers(-30, 10, (n, 1))).astype(np.float32)


def with_zero_rows(rng, n, d):
    y = gaussian(rng, n, d)
    y[rng.random(n) < 0.3] = 0.0
    return y


def one_hot(rng, n, d):
    # One non-zero factor per row: quantization is exact, scores tie across rows.
    y = np.zeros((n, d), np.float32)
    y[np.arange(n), rng.integers(0, d, n)] = rng.choice([1.0, 2.0, 3.0], n)
    return y


def rounding_edge(rng, n, d):
    # Every factor sits just off a quantization midpoint, the same side for a whole row: with
    # v = ones (see `vector`) the coarse errors add up to nearly the full bound, up or down.
    m = rng.integers(-120, 121, (n, d)) + 0.49 * rng.choice([-1.0, 1.0], (n, 1))
    m[:, 0] = 127.0
    return (m / 128).astype(np.float32)


FAMILIES = [gaussian, rounding_edge, near_ties, scaled_copies, tiny, huge, mixed_magnitudes, with_zero_rows, one_hot]


def index_for(rng, family, n, d):
    y = family(rng, n, d)
    prior = popularity_prior(rng.poisson(3.0, n))
    return ScoreIndex(y, prior), y, prior


def vector(rng, d, family):
    v = rng.standard_normal(d).astype(np.float32)
    if family is rounding_edge:
        v = np.ones(d, np.float32)
    if family is near_ties:
        v = rng.integers(-2, 3, d).astype(np.float32)  # integer scores, exact ties
    return v


def excludes(rng, n, kind):
    if kind == "none":
        return []
    if kind == "all":
        return list(range(n))
    return rng.integers(0, n, int(rng.integers(1, max(n // 2, 2)))).tolist()  # duplicates too


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_fast_path_equals_the_full_pass(family):
    rng = np.random.default_rng(hash(family.__name__) % 2**32)
    fast_calls = 0
    for trial in range(30):
        n = int(rng.choice([1, 7, 100, 1000, 3000]))
        d = int(rng.choice([1, 5, 8, 16, 64, 70]))
        index, _, _ = index_for(rng, family, n, d)
        v = None if trial % 10 == 9 else vector(rng, d, family)
        for k in (0, 1, 10, n + 3):
            for w in (0.0, 0.3, 1.0):
                for kind in ("none", "some", "all"):
                    ex = excludes(rng, n, kind)
                    fast = index.top_k(v, k, w, ex)
                    full = index.top_k(v, k, w, ex, exact=True)
                    assert fast[0] == full[0], (family.__name__, n, d, k, w, kind)
                    assert np.array_equal(np.array(fast[1], np.float32).view(np.uint32),
                                          np.array(full[1], np.float32).view(np.uint32))
                    allowed = n - len(set(ex))
                    assert len(fast[0]) == min(k, allowed) and not set(fast[0]) & set(ex)
        fast_calls += index.stats()[0]
    assert fast_calls > 0, "the fast path must actually be exercised"



def test_the_fast_path_is_taken_and_rescores_few_rows():
    rng = np.random.default_rng(1)
    index, _, _ = index_for(rng, gaussian, 10_000, 64)
    for _ in range(50):
        index.top_k(vector(rng, 64, gaussian), 10, 0.3, rng.integers(0, 10_000, 20).tolist())
    fast, full, rescored = index.stats()
    assert (fast, full) == (50, 0)
    assert rescored / fast < 200, "the bound should leave tens of candidates, not thousands"


def adversarial(n_fill=2_000, seed=0):
    """Rows whose coarse scores are off by almost the full bound, in opposite directions.

    d = 64, v = ones, every row's max factor 127/128, so scale = 1/128 exactly. "low" rows hold
    (m + 0.49) / 128 (rounded down: coarse under the exact score by 63 * 0.49 / 128 = 0.241),
    "high" rows (m' - 0.49) / 128 with Σm' = Σm + 60 (rounded up: coarse over by 0.241). So
    the high rows look 60/128 better to the coarse pass but are 1.74/128 worse exactly: a bound
    short of 63 * 0.49 / (0.52 * 64) = 93% of ours lets the fast path return the high rows."""
    rng = np.random.default_rng(seed)
    d, S = 64, 1.0 / 128
    m = rng.integers(20, 60, d - 1)
    low = np.concatenate([[127.0], m + 0.49]) * S
    bump = np.zeros(d - 1)
    bump[rng.choice(d - 1, 60, replace=False)] = 1
    high = np.concatenate([[127.0], m + bump - 0.49]) * S
    fill = rng.standard_normal((n_fill, d)) * 0.05
    y = np.concatenate([np.tile(low, (10, 1)), np.tile(high, (10, 1)), fill]).astype(np.float32)
    order = rng.permutation(len(y))
    return y[order], np.argsort(order)[:10], np.ones(d, np.float32)


@pytest.mark.parametrize("w", [0.0, 0.3])
def test_the_bound_holds_where_a_smaller_one_fails(w):
    y, low_rows, v = adversarial()
    index = ScoreIndex(y, np.zeros(len(y), np.float32))
    exact = index.top_k(v, 10, w, exact=True)
    assert sorted(exact[0]) == sorted(low_rows.tolist())
    assert index.top_k(v, 10, w) == exact
    # The case is adversarial: 90% of the bound is not enough.
    assert index.top_k(v, 10, w, bound_scale=0.9) != exact


def near_tie_at_cut(ref64, k, exclude):
    s = np.array(ref64, np.float64)
    s[list(exclude)] = -np.inf
    top = np.sort(s[np.isfinite(s)])[::-1][:k + 1]
    gaps = np.abs(np.diff(top)) / np.maximum(np.abs(top[1:]), 1e-30)
    return bool((gaps <= 1e-5).any())


@pytest.mark.parametrize("seed", range(12))
def test_rank_matches_the_numpy_formula(seed):
    rng = np.random.default_rng(100 + seed)
    n, d = int(rng.choice([50, 1000, 10_000])), int(rng.choice([8, 32, 64]))
    ids = [f"i{j}" for j in range(n)]
    cat = Catalogue(ids, gaussian(rng, n, d), rng.poisson(5.0, n))
    compared = 0
    for trial in range(20):
        v = vector(rng, d, gaussian)
        seen = [f"i{j}" for j in rng.integers(0, n, int(rng.integers(0, 30)))]
        k = int(rng.choice([1, 10, 100]))
        n_int = int(rng.choice([0, 2, 5, 1000]))
        got, want = rank(cat, v, k, seen, n_int), rank_numpy(cat, v, k, seen, n_int)
        assert got.path == want.path == "model"
        assert got.scores == pytest.approx(want.scores, rel=1e-5, abs=1e-5)
        # Same positions when the float64 truth has no near-tie at the cut.
        s64 = cat.factors.astype(np.float64) @ v.astype(np.float64)
        w = cold_weight(n_int)
        if w > 0:
            s64 = (1 - w) * (s64 - s64.min()) / (s64.max() - s64.min()) + w * cat.prior
        if not near_tie_at_cut(s64, k, cat.positions(seen)):
            assert got.items == want.items
            compared += 1
    assert compared > 0
    assert rank(cat, None, 10, seen=ids[:5]) == rank_numpy(cat, None, 10, seen=ids[:5])


@pytest.mark.parametrize("poison,w", [("nan_row", 0.0), ("nan_row", 0.5), ("inf_row", 0.0), ("inf_row", 0.5),
                                      ("nan_vector", 0.5), ("inf_vector", 0.0)])
def test_non_finite_inputs_follow_numpy(poison, w):
    rng = np.random.default_rng(7)
    n, d = 300, 16
    y, v = gaussian(rng, n, d), vector(rng, d, gaussian)
    if poison == "nan_row":
        y[[3, 77]] = np.nan
    elif poison == "inf_row":
        y[5, 0] = np.inf
    elif poison == "nan_vector":
        v[2] = np.nan
    else:
        v[0] = np.inf
    prior = popularity_prior(rng.poisson(3.0, n))
    index = ScoreIndex(y, prior)
    assert index.exact_only == poison.endswith("row")
    got = index.top_k(v, 20, w, [1, 2])
    s = y @ v
    if w > 0:
        lo, hi = float(s.min()), float(s.max())
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, as the service would get
            unit = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
        s = (1.0 - w) * unit + w * prior
    want_idx, want_scores = top_k(s, 20, np.array([1, 2]))
    assert got[0] == want_idx.tolist()
    assert got[1] == pytest.approx(want_scores.tolist(), rel=1e-5)


@pytest.mark.parametrize("factors,prior,why", [
    (np.zeros((3, 2), np.float64), np.zeros(3, np.float32), "float64 factors"),
    (np.zeros(6, np.float32), np.zeros(3, np.float32), "1-D factors"),
    (np.zeros((2, 3), np.float32).T, np.zeros(3, np.float32), "not C-contiguous"),
    (np.zeros((3, 2), np.float32), np.zeros(4, np.float32), "prior of another length"),
])
def test_index_refuses_bad_buffers(factors, prior, why):
    with pytest.raises(ValueError):
        ScoreIndex(factors, prior)


@pytest.mark.parametrize("vec,exclude,why", [
    (np.zeros(3, np.float32), [], "vector of another length"),
    (np.zeros(2, np.float64), [], "float64 vector"),
    (np.zeros(2, np.float32), [5], "exclude past the end"),
    (np.zeros(2, np.float32), [-1], "negative exclude"),
])
def test_query_refuses_bad_arguments(vec, exclude, why):
    index = ScoreIndex(np.ones((3, 2), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        index.top_k(vec, 2, 0.0, exclude)


def test_queries_run_concurrently_without_the_gil():
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(3)
    index, _, _ = index_for(rng, gaussian, 5_000, 64)
    vs = [vector(rng, 64, gaussian) for _ in range(64)]
    serial = [index.top_k(v, 10, 0.3) for v in vs]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda v: index.top_k(v, 10, 0.3), vs)) == serial


@pytest.mark.parametrize("n,d,k,n_interactions,why", [
    (3, 0, 3, 1, "zero factors: every score 0, the prior decides"),
    (3, 2, -1, 1, "negative k: nothing"),
    (5, 3, 10, 0, "popularity weight 1: the prior alone"),
])
def test_edge_shapes_match_the_reference(n, d, k, n_interactions, why):
    rng = np.random.default_rng(n + d)
    cat = Catalogue([f"i{j}" for j in range(n)], np.ones((n, d), np.float32), rng.poisson(3.0, n))
    v = np.ones(d, np.float32)
    assert rank(cat, v, k, n_interactions=n_interactions) == \
        rank_numpy(cat, v, k, n_interactions=n_interactions), why
    assert rank(cat, None, k) == rank_numpy(cat, None, k), why


def test_an_empty_catalogue_ranks_nothing():
    cat = Catalogue([], np.ones((0, 4), np.float32))
    assert rank(cat, np.ones(4, np.float32), 3).items == []
    assert rank(cat, None, 3) == rank_numpy(cat, None, 3)
    for n in (0, 5):   # the blend on (n = 0: popularity weight 1) and the reference agrees
        assert rank(cat, np.ones(4, np.float32), 3, n_interactions=n) == \
            rank_numpy(cat, np.ones(4, np.float32), 3, n_interactions=n)


@pytest.mark.parametrize("prior,k,exclude,why", [
    ([0.5, 0.5, 1.0, 0.0, 0.5], 3, [], "ties by position"),
    ([0.5, np.nan, 1.0, -np.inf, 0.5], 5, [], "NaN and -inf never ranked: fewer than k"),
    ([0.5, 0.5, 1.0, 0.0, 0.5], 2, [2, 2, 0], "excluded (repeated) skipped"),
    ([0.1] * 4, 4, [0, 1, 2, 3], "all excluded"),
])
def test_cold_start_walks_the_prior_order(prior, k, exclude, why):
    p = np.asarray(prior, np.float32)
    index = ScoreIndex(np.ones((len(p), 2), np.float32), p)
    want_idx, want_scores = top_k(p, k, np.asarray(sorted(set(exclude)), np.int64))
    for exact in (False, True):
        got = index.top_k(None, k, 0.0, exclude, exact=exact)
        assert got == (want_idx.tolist(), want_scores.tolist()), why


def test_every_kernel_gives_the_same_bounds_and_results():
    # Integer sums are exact, so the AVX-512 VNNI, AVX2 and portable kernels must agree on
    # every result bit and on the candidates (the rescored count).
    kernels = ScoreIndex.kernels()
    assert kernels[0] == "portable"
    rng = np.random.default_rng(11)
    for family in FAMILIES:
        n, d = int(rng.choice([1, 17, 300, 2000])), int(rng.choice([1, 5, 16, 64, 70, 200]))
        y = family(rng, n, d)
        prior = popularity_prior(rng.poisson(3.0, n))
        indexes = [ScoreIndex(y, prior, kernel=name) for name in kernels]
        assert [ix.kernel for ix in indexes] == kernels
        assert ScoreIndex(y, prior).kernel == kernels[-1], "the default is the best kernel"
        for _ in range(6):
            v = vector(rng, d, family)
            k, w = int(rng.choice([1, 10, n + 1])), float(rng.choice([0.0, 0.3, 1.0]))
            ex = excludes(rng, n, str(rng.choice(["none", "some"])))
            want = indexes[0].top_k(v, k, w, ex, exact=True)
            for ix in indexes:
                got = ix.top_k(v, k, w, ex)
                assert got[0] == want[0], (family.__name__, ix.kernel)
                assert np.array_equal(np.array(got[1], np.float32).view(np.uint32),
                                      np.array(want[1], np.float32).view(np.uint32))
        # Fast-path calls and rescored rows (the first index also ran the full passes).
        assert len({(ix.stats()[0], ix.stats()[2]) for ix in indexes}) == 1, [ix.stats() for ix in indexes]


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError):
        ScoreIndex(np.ones((3, 2), np.float32), np.zeros(3, np.float32), kernel="sse9")


@pytest.mark.parametrize("w", [1e-12, 1e-6, 0.5, 1 - 2**-20, 1 - 1e-12])
@pytest.mark.parametrize("prior_kind", ["unit", "negative", "huge", "tiny", "ties"])
def test_the_blend_enclosure_is_exact_at_extreme_weights_and_priors(w, prior_kind):
    # The fast path bounds the blended scores by (s - lo) * (a / den) + b * prior ∓ a margin
    # instead of the blend itself: extreme weights (a or b near 0) and priors (large, negative,
    # tiny, tied) must still give the full pass's positions and bits.
    rng = np.random.default_rng(int(w * 1e6) % 2**32 + len(prior_kind))
    for family in (gaussian, near_ties, rounding_edge, scaled_copies):
        n, d = 3000, 64
        y = family(rng, n, d)
        prior = {"unit": lambda: popularity_prior(rng.poisson(3.0, n)),
                 "negative": lambda: rng.standard_normal(n).astype(np.float32),
                 "huge": lambda: (rng.standard_normal(n) * 1e20).astype(np.float32),
                 "tiny": lambda: (rng.random(n) * 1e-30).astype(np.float32),
                 "ties": lambda: rng.integers(0, 3, n).astype(np.float32)}[prior_kind]()
        index = ScoreIndex(y, prior)
        for _ in range(4):
            v = vector(rng, d, family)
            ex = excludes(rng, n, "some")
            for k in (1, 10, 100):
                fast, full = index.top_k(v, k, w, ex), index.top_k(v, k, w, ex, exact=True)
                assert fast[0] == full[0], (family.__name__, k)
                assert np.array_equal(np.array(fast[1], np.float32).view(np.uint32),
                                      np.array(full[1], np.float32).view(np.uint32))
        assert index.stats()[0] > 0
