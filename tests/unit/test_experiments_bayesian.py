"""Beta-Binomial results: the closed form against Monte Carlo and numerical
integration, expected loss against raw posterior draws, the stopping rule."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from services.experiments import ExperimentError
from services.experiments.bayesian import (MIN_UNITS_PER_ARM, UNIFORM, Beta, decide, expected_loss,
                                           prob_b_beats_a, simulate)
from services.experiments.inputs import Arm


def by_quadrature(a: Beta, b: Beta) -> float:
    lo, hi = stats.beta.ppf([1e-15, 1 - 1e-15], b.alpha, b.beta)
    return integrate.quad(lambda x: stats.beta.pdf(x, b.alpha, b.beta) * stats.beta.cdf(x, a.alpha, a.beta),
                          lo, hi, points=[a.mean, b.mean], limit=400, epsabs=1e-13)[0]


CASES = [
    (Beta(75, 989), Beta(97, 963), "the README example under Beta(1, 1)"),
    (Beta(1, 1), Beta(1, 1), "no data: exactly one half"),
    (Beta(3, 50), Beta(2, 51), "tiny counts"),
    (Beta(2.5, 40.5), Beta(4, 39.5), "fractional prior on A: the sum runs over B's alpha"),
    (Beta(3.5, 40), Beta(4.5, 39.5), "integer beta only: the sum runs over A's beta"),
    (Beta(0.5, 10.5), Beta(3.5, 8.5), "no integer parameter (Jeffreys): numerical integration"),
    (Beta(40_001, 960_001), Beta(40_301, 959_701), "a million users per arm: 40,001 terms in log space"),
    (Beta(5_000_001, 95_000_001), Beta(5_003_001, 94_997_001), "10⁸ users per arm: past MAX_SUM_TERMS, quadrature"),
]


@pytest.mark.parametrize("a,b,why", CASES)
def test_closed_form_matches_integration(a, b, why):
    exact = prob_b_beats_a(a, b)
    assert exact == pytest.approx(by_quadrature(a, b), abs=1e-8), why
    assert prob_b_beats_a(b, a) == pytest.approx(1 - exact, abs=1e-9), "symmetry"


@pytest.mark.parametrize("a,b,why", [CASES[0], CASES[2], CASES[5], CASES[7]])
def test_closed_form_matches_monte_carlo(a, b, why):
    """4M draws: the Monte Carlo standard error is at most 0.00025, a quarter of the tolerance."""
    exact = prob_b_beats_a(a, b)
    mc = simulate(a, b, draws=4_000_000, seed=20261126)
    assert abs(exact - mc.prob_b_beats_a) < 1e-3, f"{why}: exact {exact}, Monte Carlo {mc.prob_b_beats_a}"


@pytest.mark.parametrize("a,b,why", CASES)
def test_expected_loss_matches_raw_posterior_draws(a, b, why):
    loss_a, loss_b = expected_loss(a, b)
    rng = np.random.default_rng(3)
    ta, tb = rng.beta(a.alpha, a.beta, 500_000), rng.beta(b.alpha, b.beta, 500_000)
    ref_a, ref_b = np.maximum(tb - ta, 0).mean(), np.maximum(ta - tb, 0).mean()
    scale = max(ref_a, ref_b)
    assert loss_a == pytest.approx(ref_a, abs=0.01 * scale), why
    assert loss_b == pytest.approx(ref_b, abs=0.01 * scale), why
    assert loss_a - loss_b == pytest.approx(b.mean - a.mean, abs=1e-9), "E[θB - θA] = loss(A) - loss(B)"


def test_extreme_probabilities_stay_in_range():
    assert prob_b_beats_a(Beta(10_001, 90_001), Beta(12_001, 88_001)) == pytest.approx(1.0, abs=1e-12)
    assert prob_b_beats_a(Beta(12_001, 88_001), Beta(10_001, 90_001)) == pytest.approx(0.0, abs=1e-12)
    la, lb = expected_loss(Beta(10_001, 90_001), Beta(12_001, 88_001))
    assert lb == pytest.approx(0.0, abs=1e-12) and la == pytest.approx(0.02, rel=1e-3)


def test_monte_carlo_is_seeded_and_returns_its_seed():
    a, b = Beta(10, 90), Beta(12, 88)
    first, again = simulate(a, b, 10_000, seed=42), simulate(a, b, 10_000, seed=42)
    assert first == again and first.seed == 42, "same seed, same answer"
    fresh = simulate(a, b, 10_000)
    assert simulate(a, b, 10_000, seed=fresh.seed) == fresh, "a fresh seed is returned and redraws it"


def test_posterior_and_credible_interval():
    post = UNIFORM.update(Arm(74, 1062))
    assert (post.alpha, post.beta) == (75, 989)
    lo, hi = post.interval(0.95)
    draws = np.random.default_rng(1).beta(75, 989, 1_000_000)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(draws, [0.025, 0.975])), rel=5e-3)
    assert Beta(2, 3).update(Arm(0, 0)) == Beta(2, 3), "no data: the prior"
    with pytest.raises(ExperimentError, match="positive"):
        Beta(0, 1)


@pytest.mark.parametrize("a,b,winner,stop,why", [
    (Arm(5, 99), Arm(50, 100), None, False, "a huge lift, but fewer than 100 units in A"),
    (Arm(5, 100), Arm(50, 100), "B", True, "the same lift with 100 units each"),
    (Arm(700, 10_000), Arm(700, 10_000), None, False, "equal arms: neither loss is small yet"),
    (Arm(7_000, 100_000), Arm(7_000, 100_000), "A", True,
     "equal arms with 100k units: choosing either costs < 1 % of the rate; A on ties"),
    (Arm(900, 10_000), Arm(700, 10_000), "A", True, "A clearly better"),
])
def test_stopping_rule(a, b, winner, stop, why):
    d = decide(a, b)
    assert (d.winner, d.stop) == (winner, stop), f"{why}: {d.reason}"
    if a.users < MIN_UNITS_PER_ARM:
        assert "fewer than 100 units" in d.reason
