"""Bayesian results for two binary arms: Beta-Binomial posteriors, P(B > A),
expected loss, credible intervals and the stopping rule.

P(B > A) is exact (Evan Miller's sum, evaluated in log space so 10⁵
conversions neither overflow nor underflow). The sum needs one of the four
Beta parameters to be an integer, which they are under the default Beta(1, 1)
prior with counts; with a fractional prior on every side (Jeffreys), or past
10⁵ terms, it falls back to numerical integration. Expected loss is exact too: E[θ 1{θ > θ'}] is
the mean of θ times P(θ⁺ > θ') where θ⁺ has one more success, so it reuses the
same sum. Monte Carlo versions of both are in `simulate`, seeded, the seed
returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import integrate, special, stats

from services.experiments import ExperimentError, seeding
from services.experiments.inputs import Arm

# Optimizely declares no winner before this many units in every arm.
MIN_UNITS_PER_ARM = 100
# Stop when the smaller expected loss is below this share of A's posterior mean.
DEFAULT_LOSS_THRESHOLD = 0.01
# Beyond this many terms (about 15 ms) the exact sum gives way to quadrature,
# which agrees to ~1e-7 at these sizes and costs the same at any size.
MAX_SUM_TERMS = 100_000


@dataclass(frozen=True, slots=True)
class Beta:
    alpha: float = 1.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        if not (self.alpha > 0 and self.beta > 0 and math.isfinite(self.alpha) and math.isfinite(self.beta)):
            raise ExperimentError(f"Beta parameters must be positive and finite, got ({self.alpha}, {self.beta})")

    def update(self, arm: Arm) -> Beta:
        """The posterior after `arm`'s conversions and non-conversions."""
        return Beta(self.alpha + arm.conversions, self.beta + arm.users - arm.conversions)

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Equal-tailed credible interval holding `level` of the posterior."""
        if not 0.0 < level < 1.0:
            raise ExperimentError(f"a credible level must be between 0 and 1, got {level}")
        tail = (1.0 - level) / 2
        lo, hi = stats.beta.ppf([tail, 1.0 - tail], self.alpha, self.beta)
        return float(lo), float(hi)


UNIFORM = Beta(1.0, 1.0)


def _is_int(x: float) -> bool:
    return float(x).is_integer()


def _miller(a1: float, b1: float, a2: int, b2: float) -> float:
    """P(X2 > X1), X1 ~ Beta(a1, b1), X2 ~ Beta(a2, b2), a2 a positive integer:
    sum over i < a2 of B(a1 + i, b1 + b2) / ((b2 + i) B(1 + i, b2) B(a1, b1))."""
    i = np.arange(int(a2), dtype=float)
    log_terms = (special.betaln(a1 + i, b1 + b2) - np.log(b2 + i)
                 - special.betaln(1.0 + i, b2) - special.betaln(a1, b1))
    return float(np.exp(special.logsumexp(log_terms)))


def _integrate(a: Beta, b: Beta) -> float:
    """P(B > A) = ∫ f_B(x) F_A(x) dx, on the region where B has mass."""
    lo, hi = stats.beta.ppf([1e-15, 1.0 - 1e-15], b.alpha, b.beta)
    value, _ = integrate.quad(lambda x: stats.beta.pdf(x, b.alpha, b.beta) * stats.beta.cdf(x, a.alpha, a.beta),
                              float(lo), float(hi), points=[a.mean, b.mean], limit=400,
                              epsabs=1e-13, epsrel=1e-11)
    return value


def prob_b_beats_a(a: Beta, b: Beta) -> float:
    """P(θ_B > θ_A) for independent Beta posteriors, exactly.

    Of the four equivalent sums (over B's alpha; 1 - the one over A's alpha; by
    θ -> 1 - θ, over A's beta; 1 - the one over B's beta) the shortest one with
    an integer bound is used; quadrature when there is none, or when even the
    shortest has more than MAX_SUM_TERMS terms (tens of millions of users)."""
    options = []
    if _is_int(b.alpha):
        options.append((b.alpha, lambda: _miller(a.alpha, a.beta, int(b.alpha), b.beta)))
    if _is_int(a.alpha):
        options.append((a.alpha, lambda: 1.0 - _miller(b.alpha, b.beta, int(a.alpha), a.beta)))
    if _is_int(a.beta):  # θ_B > θ_A  <=>  1 - θ_A > 1 - θ_B, with 1 - θ ~ Beta(beta, alpha)
        options.append((a.beta, lambda: _miller(b.beta, b.alpha, int(a.beta), a.alpha)))
    if _is_int(b.beta):
        options.append((b.beta, lambda: 1.0 - _miller(a.beta, a.alpha, int(b.beta), b.alpha)))
    if not options or min(o[0] for o in options) > MAX_SUM_TERMS:
        p = _integrate(a, b)
    else:
        p = min(options, key=lambda o: o[0])[1]()
    return min(1.0, max(0.0, p))


def expected_loss(a: Beta, b: Beta) -> tuple[float, float]:
    """(E[max(θ_B - θ_A, 0)], E[max(θ_A - θ_B, 0)]): what choosing A, resp. B, costs
    in expectation when the other arm is in fact better, in rate units."""
    a_up, b_up = Beta(a.alpha + 1, a.beta), Beta(b.alpha + 1, b.beta)
    loss_a = b.mean * prob_b_beats_a(a, b_up) - a.mean * prob_b_beats_a(a_up, b)
    loss_b = a.mean * prob_b_beats_a(b, a_up) - b.mean * prob_b_beats_a(b_up, a)
    # The difference of two close numbers can dip a rounding error below zero.
    return max(0.0, loss_a), max(0.0, loss_b)


@dataclass(frozen=True, slots=True)
class MonteCarlo:
    prob_b_beats_a: float
    expected_loss_a: float
    expected_loss_b: float
    draws: int
    seed: int


def simulate(a: Beta, b: Beta, draws: int = 100_000, seed: int | None = None) -> MonteCarlo:
    """P(B > A) and both expected losses from `draws` posterior draws."""
    if draws < 1:
        raise ExperimentError(f"draws must be at least 1, got {draws}")
    seed, rng = seeding.resolve(seed)
    ta = rng.beta(a.alpha, a.beta, draws)
    tb = rng.beta(b.alpha, b.beta, draws)
    diff = tb - ta
    return MonteCarlo(float(np.mean(diff > 0)), float(np.mean(np.maximum(diff, 0.0))),
                      float(np.mean(np.maximum(-diff, 0.0))), draws, seed)


@dataclass(frozen=True, slots=True)
class Decision:
    winner: Literal["A", "B"] | None
    stop: bool
    reason: str


def decide(a_arm: Arm, b_arm: Arm, prior: Beta = UNIFORM,
           threshold: float = DEFAULT_LOSS_THRESHOLD, min_units: int = MIN_UNITS_PER_ARM) -> Decision:
    """Stop and pick the arm whose expected loss is below `threshold` x A's posterior
    mean; never before `min_units` units in every arm."""
    if threshold <= 0:
        raise ExperimentError(f"the loss threshold must be positive, got {threshold}")
    short = [name for name, arm in (("A", a_arm), ("B", b_arm)) if arm.users < min_units]
    if short:
        return Decision(None, False, f"fewer than {min_units} units in arm {' and '.join(short)}")
    a, b = prior.update(a_arm), prior.update(b_arm)
    loss_a, loss_b = expected_loss(a, b)
    limit = threshold * a.mean
    name, loss = ("A", loss_a) if loss_a <= loss_b else ("B", loss_b)
    if loss < limit:
        return Decision(name, True, f"expected loss of choosing {name} is {loss:.3g}, "
                                    f"below {threshold:.3g} x A's rate ({limit:.3g})")
    return Decision(None, False, f"smallest expected loss {loss:.3g} (arm {name}) is not below "
                                 f"{threshold:.3g} x A's rate ({limit:.3g})")
