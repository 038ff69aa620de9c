"""Frequentist results for two binary arms: the two-proportion z-test, intervals,
sample size per arm and the sample-ratio-mismatch check.

The test pools the two arms' variance (under the null hypothesis both rates are
equal); the interval for the difference does not (it is centred on the observed
difference, not on the null). Per-arm intervals are Wilson score intervals:
unlike the textbook Wald interval they keep their coverage near 0 and 1 and
never leave [0, 1] (a 1-in-50 arm is common in click data).

The array-level functions (`z_statistic`, `p_values`) take numpy arrays, so a
thousand simulated experiments are one call.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from services.experiments import ExperimentError
from services.experiments.inputs import Arm

# Statsig's sample-ratio-mismatch levels.
SRM_WARN = 0.01
SRM_ALERT = 0.001

SrmLevel = Literal["ok", "warn", "alert"]


def z_statistic(c_a, n_a, c_b, n_b):
    """Pooled two-proportion z of B against A; 0 where it is undefined (no users,
    or a pooled rate of 0 or 1: no evidence either way). Scalars or arrays."""
    c_a, n_a, c_b, n_b = (np.asarray(x, dtype=float) for x in (c_a, n_a, c_b, n_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = (c_a + c_b) / (n_a + n_b)
        se = np.sqrt(pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b))
        z = (c_b / n_b - c_a / n_a) / se
    return np.where(np.isfinite(z), z, 0.0)


def p_values(z):
    """(one-sided for B > A, two-sided) p-values of z; scalars or arrays."""
    return stats.norm.sf(z), 2.0 * stats.norm.sf(np.abs(z))


@dataclass(frozen=True, slots=True)
class ZTest:
    z: float
    p_value_one_sided: float    # H1: B's rate is greater than A's
    p_value_two_sided: float    # H1: the rates differ
    difference: float           # rate B - rate A
    ci_difference: tuple[float, float]  # two-sided, unpooled (Wald)

    def significant(self, alpha: float) -> bool:
        return self.p_value_two_sided < alpha


def z_test(a: Arm, b: Arm, alpha: float = 0.05) -> ZTest:
    _check_alpha(alpha)
    z = float(z_statistic(a.conversions, a.users, b.conversions, b.users))
    one, two = (float(p) for p in p_values(z))
    diff = b.rate - a.rate
    var = _var(a) + _var(b)
    half = stats.norm.isf(alpha / 2) * math.sqrt(var)
    return ZTest(z, one, two, diff, (diff - half, diff + half))


def _var(arm: Arm) -> float:
    return arm.rate * (1.0 - arm.rate) / arm.users if arm.users else 0.0


def wilson_interval(arm: Arm, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided 1 - alpha Wilson interval of the arm's rate; (0, 1) for an empty arm."""
    _check_alpha(alpha)
    return _wilson(arm, stats.norm.isf(alpha / 2))


def wilson_lower_bound(arm: Arm, alpha: float = 0.05) -> float:
    """One-sided 1 - alpha lower bound: the rate is at least this with confidence 1 - alpha."""
    _check_alpha(alpha)
    return _wilson(arm, stats.norm.isf(alpha))[0]


def _wilson(arm: Arm, z: float) -> tuple[float, float]:
    n = arm.users
    if n == 0:
        return 0.0, 1.0
    p = arm.rate
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_arrays(c, n, z: float):
    """Vectorized Wilson bounds (lower, upper) for arrays of counts, at a given z."""
    c, n = np.asarray(c, dtype=float), np.asarray(n, dtype=float)
    p = c / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.maximum(0.0, centre - half), np.minimum(1.0, centre + half)


def sample_size_per_arm(baseline: float, mde: float, alpha: float = 0.05, power: float = 0.8,
                        relative: bool = False, two_sided: bool = True) -> int:
    """Users per arm for the pooled z-test to detect a change of `mde` (absolute, or
    relative to the baseline when `relative`) from `baseline` with the given power:

        n = (z_a * sqrt(2 p̄ (1 - p̄)) + z_b * sqrt(p1 (1 - p1) + p2 (1 - p2)))² / (p2 - p1)²

    with p̄ the mean of p1 and p2, z_a the critical value (alpha/2 when two-sided)
    and z_b = Φ⁻¹(power); rounded up."""
    _check_alpha(alpha)
    if not 0.0 < power < 1.0:
        raise ExperimentError(f"power must be between 0 and 1, got {power}")
    if not 0.0 < baseline < 1.0:
        raise ExperimentError(f"the baseline rate must be between 0 and 1 (exclusive), got {baseline}")
    delta = baseline * mde if relative else mde
    p2 = baseline + delta
    if delta == 0 or not 0.0 < p2 < 1.0:
        raise ExperimentError(f"a change of {mde}{' (relative)' if relative else ''} from "
                              f"{baseline} must be non-zero and stay inside (0, 1)")
    p1 = baseline
    z_a = stats.norm.isf(alpha / 2 if two_sided else alpha)
    z_b = stats.norm.ppf(power)
    pbar = (p1 + p2) / 2
    n = (z_a * math.sqrt(2 * pbar * (1 - pbar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2
    # 1e-9: a product that is an integer up to rounding error does not gain a user.
    return int(math.ceil(n / delta ** 2 - 1e-9))


@dataclass(frozen=True, slots=True)
class Srm:
    chi2: float
    p_value: float
    level: SrmLevel             # Statsig: warn below 0.01, alert below 0.001
    expected: tuple[float, ...]


def srm_test(users: Sequence[int], weights: Sequence[float]) -> Srm:
    """Chi-square goodness of fit of the users per arm against the planned split.
    With no users there is no evidence: p = 1, level ok."""
    if len(users) != len(weights) or len(users) < 2:
        raise ExperimentError(f"need one planned weight per arm and at least two arms "
                              f"(got {len(users)} arms, {len(weights)} weights)")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ExperimentError(f"planned weights must be non-negative with a positive sum, got {list(weights)}")
    total = sum(users)
    share = [w / sum(weights) for w in weights]
    expected = tuple(total * s for s in share)
    if total == 0:
        return Srm(0.0, 1.0, "ok", expected)
    if any(e == 0 and u > 0 for e, u in zip(expected, users)):
        # Users in an arm planned at 0 %: the split is certainly broken.
        return Srm(math.inf, 0.0, "alert", expected)
    obs = [u for u, e in zip(users, expected) if e > 0]
    exp = [e for e in expected if e > 0]
    if len(obs) < 2:
        return Srm(0.0, 1.0, "ok", expected)
    chi2, p = stats.chisquare(obs, exp)
    p = float(p)
    level: SrmLevel = "alert" if p < SRM_ALERT else "warn" if p < SRM_WARN else "ok"
    return Srm(float(chi2), p, level, expected)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ExperimentError(f"alpha must be between 0 and 1, got {alpha}")
