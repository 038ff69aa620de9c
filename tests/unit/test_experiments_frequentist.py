"""Frequentist statistics against scipy and numpy on raw simulated 0/1 data."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from services.experiments import ExperimentError
from services.experiments.frequentist import (SRM_ALERT, SRM_WARN, p_values, sample_size_per_arm,
                                              srm_test, wilson_arrays, wilson_interval,
                                              wilson_lower_bound, z_statistic, z_test)
from services.experiments.inputs import Arm


def raw(rng, p, n):
    return (rng.random(n) < p).astype(float)


@pytest.mark.parametrize("pa,pb,na,nb,why", [
    (0.07, 0.09, 1062, 1058, "the README example's size"),
    (0.20, 0.20, 5000, 5000, "no true difference"),
    (0.02, 0.03, 20000, 18000, "low click-through rates, unequal arms"),
    (0.5, 0.45, 300, 320, "B worse: negative z"),
])
def test_z_test_matches_a_direct_computation_on_raw_data(pa, pb, na, nb, why):
    rng = np.random.default_rng(11)
    xa, xb = raw(rng, pa, na), raw(rng, pb, nb)
    pooled = np.concatenate([xa, xb]).mean()
    z_ref = (xb.mean() - xa.mean()) / math.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb))
    t = z_test(Arm(int(xa.sum()), na), Arm(int(xb.sum()), nb))
    assert t.z == pytest.approx(z_ref, rel=1e-12), why
    assert t.p_value_one_sided == pytest.approx(stats.norm.sf(z_ref), rel=1e-9)
    # The pooled z-test is the 2x2 chi-square test without continuity correction: z² = chi².
    table = [[xa.sum(), na - xa.sum()], [xb.sum(), nb - xb.sum()]]
    chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    assert t.z ** 2 == pytest.approx(chi2, rel=1e-9), why
    assert t.p_value_two_sided == pytest.approx(p, rel=1e-9), why
    # Unpooled interval for the difference, from the raw samples' variances.
    half = stats.norm.isf(0.025) * math.sqrt(xa.var() / na + xb.var() / nb)
    d = xb.mean() - xa.mean()
    assert t.ci_difference == pytest.approx((d - half, d + half), rel=1e-9)


@pytest.mark.parametrize("a,b,why", [
    (Arm(0, 0), Arm(0, 0), "empty arms: no evidence"),
    (Arm(0, 100), Arm(0, 100), "pooled rate 0: variance 0"),
    (Arm(50, 50), Arm(70, 70), "pooled rate 1"),
])
def test_degenerate_data_gets_neutral_answers(a, b, why):
    t = z_test(a, b)
    assert (t.z, t.p_value_one_sided, t.p_value_two_sided) == (0.0, 0.5, 1.0), why


def test_a_a_simulation_rejects_at_the_nominal_rate():
    """1,000 A/A experiments in one vectorized call: rejections ~ Binomial(1000, alpha)."""
    rng = np.random.default_rng(2026)
    n, p, experiments, alpha = 4000, 0.08, 1000, 0.05
    ca, cb = rng.binomial(n, p, experiments), rng.binomial(n, p, experiments)
    _, two = p_values(z_statistic(ca, n, cb, n))
    rejected = int((two < alpha).sum())
    lo, hi = stats.binom.ppf([0.0005, 0.9995], experiments, alpha)
    assert lo <= rejected <= hi, f"{rejected} rejections of {experiments} at alpha {alpha}"
    # Under the null the p-values are uniform (up to the binomial's discreteness).
    assert stats.kstest(two, "uniform").pvalue > 0.001


@pytest.mark.parametrize("p,n,why", [
    (0.07, 1000, "a typical conversion rate"),
    (0.02, 500, "a low click-through rate, ten successes expected"),
    (0.5, 200, "the middle, small sample"),
])
def test_wilson_intervals_cover(p, n, why):
    rng = np.random.default_rng(5)
    reps, alpha = 20_000, 0.05
    c = rng.binomial(n, p, reps)
    lo, hi = wilson_arrays(c, n, stats.norm.isf(alpha / 2))
    coverage = np.mean((lo <= p) & (p <= hi))
    assert abs(coverage - (1 - alpha)) < 0.02, f"{why}: two-sided coverage {coverage}"
    lower, _ = wilson_arrays(c, n, stats.norm.isf(alpha))
    one_sided = np.mean(lower <= p)
    assert abs(one_sided - (1 - alpha)) < 0.025, f"{why}: one-sided coverage {one_sided}"
    # The scalar functions agree with the vectorized ones.
    k = int(c[0])
    assert wilson_interval(Arm(k, n)) == pytest.approx((lo[0], hi[0]))
    assert wilson_lower_bound(Arm(k, n)) == pytest.approx(lower[0])


def test_difference_interval_covers():
    rng = np.random.default_rng(6)
    reps, n, pa, pb = 20_000, 3000, 0.10, 0.12
    ca, cb = rng.binomial(n, pa, reps), rng.binomial(n, pb, reps)
    ra, rb = ca / n, cb / n
    half = stats.norm.isf(0.025) * np.sqrt(ra * (1 - ra) / n + rb * (1 - rb) / n)
    cover = np.mean((rb - ra - half <= pb - pa) & (pb - pa <= rb - ra + half))
    assert abs(cover - 0.95) < 0.01, cover
    t = z_test(Arm(int(ca[0]), n), Arm(int(cb[0]), n))
    assert t.ci_difference == pytest.approx((rb[0] - ra[0] - half[0], rb[0] - ra[0] + half[0]))


@pytest.mark.parametrize("k,n,why", [
    (0, 50, "no conversions: the interval starts at 0, the Wald one would be [0, 0]"),
    (50, 50, "all converted: ends at 1"),
    (0, 0, "empty arm: the whole range"),
])
def test_wilson_edges(k, n, why):
    lo, hi = wilson_interval(Arm(k, n))
    assert 0.0 <= lo <= hi <= 1.0 and hi - lo > 0, why


@pytest.mark.parametrize("baseline,mde,relative,alpha,power,why", [
    (0.10, 0.02, False, 0.05, 0.8, "10 % -> 12 %, the common defaults"),
    (0.05, 0.20, True, 0.05, 0.9, "a 20 % relative lift at 90 % power"),
    (0.30, -0.03, False, 0.01, 0.8, "a decrease, strict alpha"),
])
def test_sample_size_gives_the_power_in_simulation(baseline, mde, relative, alpha, power, why):
    n = sample_size_per_arm(baseline, mde, alpha, power, relative=relative)
    p2 = baseline * (1 + mde) if relative else baseline + mde
    rng = np.random.default_rng(9)
    reps = 4000
    ca, cb = rng.binomial(n, baseline, reps), rng.binomial(n, p2, reps)
    _, two = p_values(z_statistic(ca, n, cb, n))
    achieved = np.mean(two < alpha)
    assert abs(achieved - power) < 0.03, f"{why}: n={n} gave power {achieved}"
    smaller = sample_size_per_arm(baseline, mde, alpha, power - 0.1, relative=relative)
    assert smaller < n, "less power needs fewer users"


@pytest.mark.parametrize("args,message,why", [
    ((0.0, 0.01), "baseline", "a 0 % baseline"),
    ((0.1, 0.0), "non-zero", "no change to detect"),
    ((0.95, 0.1), "inside", "the treatment rate would exceed 1"),
    ((0.1, 0.01, 0.0), "alpha", "alpha 0"),
])
def test_sample_size_refuses_nonsense(args, message, why):
    with pytest.raises(ExperimentError, match=message):
        sample_size_per_arm(*args)


@pytest.mark.parametrize("users,weights,level,why", [
    ([5000, 5000], [0.5, 0.5], "ok", "exactly as planned"),
    ([5000, 5130], [0.5, 0.5], "ok", "a 1.3 % imbalance on 10k users is noise"),
    ([5000, 5300], [0.5, 0.5], "warn", "p between 0.001 and 0.01"),
    ([5000, 5600], [0.5, 0.5], "alert", "p far below 0.001"),
    ([2000, 8000], [0.2, 0.8], "ok", "an uneven split as planned"),
    ([5000, 5000], [0.2, 0.8], "alert", "50/50 against a planned 20/80"),
    ([0, 0], [0.5, 0.5], "ok", "no users: no evidence"),
    ([10, 5000], [0.0, 1.0], "alert", "users in an arm planned at 0 %"),
])
def test_srm_levels(users, weights, level, why):
    srm = srm_test(users, weights)
    assert srm.level == level, f"{why}: p={srm.p_value}"
    if sum(users) and all(weights):
        ref = stats.chisquare(users, np.array(weights) / sum(weights) * sum(users))
        assert srm.p_value == pytest.approx(ref.pvalue) and srm.chi2 == pytest.approx(ref.statistic)
        assert (srm.p_value < SRM_WARN) == (level != "ok") and (srm.p_value < SRM_ALERT) == (level == "alert")
