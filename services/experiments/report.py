"""The two-arm summary behind `clickloop stats ab`: every statistic of the
package for a control (A) and a treatment (B), as one JSON-ready dict, and its
text rendering.

Conventions: one-sided tests and bounds are at level alpha (the one-sided 95 %
lower bound for alpha 0.05), two-sided intervals at 1 - alpha; P(B > A) and the
expected losses are exact, their Monte Carlo counterparts are drawn with
`seed`, which is returned. Without --mde the sample size is the one needed to
detect the observed difference (absolute) from the control's rate.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from services.experiments import ExperimentError, bandit, bayesian, frequentist
from services.experiments.inputs import Arm, InputError

DEFAULT_DRAWS = 200_000


def parse_mde(text: str) -> tuple[float, bool]:
    """`0.01` -> (0.01, absolute); `10%` -> (0.10, relative to the baseline)."""
    raw = text.strip()
    relative = raw.endswith("%")
    try:
        value = float(raw[:-1] if relative else raw)
    except ValueError:
        raise InputError(f"--mde {text!r}: expected an absolute change (0.01) or a relative one (10%)") from None
    if not math.isfinite(value) or value == 0:
        raise InputError(f"--mde {text!r}: the change must be a non-zero number")
    return (value / 100.0, True) if relative else (value, False)


def parse_split(text: str) -> tuple[float, ...]:
    """`50:50`, `1:1` or `0.2:0.8` -> planned weights of control and treatment."""
    parts = text.split(":")
    try:
        weights = tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(f"--split {text!r}: expected two weights such as 50:50") from None
    if len(weights) != 2 or any(not math.isfinite(w) or w <= 0 for w in weights):
        raise InputError(f"--split {text!r}: expected two positive weights such as 50:50")
    return weights


def ab_report(control: Arm, treatment: Arm, *, alpha: float = 0.05, power: float = 0.8,
              mde: tuple[float, bool] | None = None, split: Sequence[float] = (1.0, 1.0),
              prior: bayesian.Beta = bayesian.UNIFORM, draws: int = DEFAULT_DRAWS,
              seed: int | None = None,
              loss_threshold: float = bayesian.DEFAULT_LOSS_THRESHOLD,
              min_units: int = bayesian.MIN_UNITS_PER_ARM) -> dict:
    if not 0.0 < power < 1.0:
        raise InputError(f"power must be between 0 and 1, got {power}")
    test = frequentist.z_test(control, treatment, alpha)
    srm = frequentist.srm_test([control.users, treatment.users], list(split))
    if mde is None:
        mde_value, relative = abs(test.difference), False
    else:
        mde_value, relative = mde
    try:
        n, n_reason = frequentist.sample_size_per_arm(control.rate, mde_value, alpha, power,
                                                      relative=relative), None
    except ExperimentError as exc:  # no difference to size for, or a 0 % / 100 % baseline
        n, n_reason = None, str(exc)
    post_a, post_b = prior.update(control), prior.update(treatment)
    loss_a, loss_b = bayesian.expected_loss(post_a, post_b)
    mc = bayesian.simulate(post_a, post_b, draws, seed)
    band = bandit.assess([post_a.alpha, post_b.alpha], [post_a.beta, post_b.beta], draws, mc.seed)
    decision = bayesian.decide(control, treatment, prior, loss_threshold, min_units)
    level = 1.0 - alpha
    return {
        "control": _arm(control), "treatment": _arm(treatment),
        "difference": test.difference,
        "relative_lift": test.difference / control.rate if control.rate else None,
        "alpha": alpha, "power": power,
        "z": test.z,
        "p_value_one_sided": test.p_value_one_sided,
        "p_value_two_sided": test.p_value_two_sided,
        "significant": test.significant(alpha),
        "ci_control": list(frequentist.wilson_interval(control, alpha)),
        "ci_treatment": list(frequentist.wilson_interval(treatment, alpha)),
        "ci_lower_control": frequentist.wilson_lower_bound(control, alpha),
        "ci_lower_treatment": frequentist.wilson_lower_bound(treatment, alpha),
        "ci_difference": list(test.ci_difference),
        "sample_size_per_arm": n,
        "sample_size_note": n_reason,
        "mde": mde_value, "mde_relative": relative,
        "srm_chi2": srm.chi2, "srm_p_value": srm.p_value, "srm_level": srm.level,
        "planned_split": list(split),
        "prior": [prior.alpha, prior.beta],
        "prob_b_beats_a": bayesian.prob_b_beats_a(post_a, post_b),
        "prob_b_beats_a_mc": mc.prob_b_beats_a,
        "expected_loss_a": loss_a, "expected_loss_b": loss_b,
        "expected_loss_a_mc": mc.expected_loss_a, "expected_loss_b_mc": mc.expected_loss_b,
        "credible_level": level,
        "credible_control": list(post_a.interval(level)),
        "credible_treatment": list(post_b.interval(level)),
        "loss_threshold": loss_threshold,
        "winner": decision.winner, "stop": decision.stop, "decision": decision.reason,
        "prob_best": list(band.prob_best),
        "value_remaining": band.value_remaining, "bandit_stop": band.stop,
        "draws": draws, "seed": mc.seed,
    }


def _arm(arm: Arm) -> dict:
    return {"conversions": arm.conversions, "users": arm.users, "rate": arm.rate}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _pp(x: float) -> str:
    return f"{100 * x:+.2f} pp"


def render(r: dict) -> str:
    """The report as text (what `clickloop stats ab` prints without --json)."""
    conf = f"{100 * (1 - r['alpha']):g}%"
    lines = [f"A/B: control (A) vs treatment (B), alpha {r['alpha']:g}, power {r['power']:g}",
             f"  {'':10} {'users':>9} {'conv.':>7} {'rate':>7}   {conf + ' CI':<18} {conf} lower bound"]
    for name, key in (("control", "control"), ("treatment", "treatment")):
        arm, ci = r[key], r[f"ci_{key}"]
        lines.append(f"  {name:10} {arm['users']:>9,} {arm['conversions']:>7,} {_pct(arm['rate']):>7}   "
                     f"{'[' + _pct(ci[0]) + ', ' + _pct(ci[1]) + ']':<18} {_pct(r[f'ci_lower_{key}'])}")
    lift = f" ({100 * r['relative_lift']:+.1f}% relative)" if r["relative_lift"] is not None else ""
    lo, hi = r["ci_difference"]
    lines.append(f"  difference {_pp(r['difference'])}{lift}, {conf} CI [{_pp(lo)}, {_pp(hi)}]")
    lines += ["", "Frequentist (two-proportion z-test, pooled variance)",
              f"  z = {r['z']:.3f}   p one-sided (B > A) = {r['p_value_one_sided']:.4g}   "
              f"p two-sided = {r['p_value_two_sided']:.4g}   "
              f"{'significant' if r['significant'] else 'not significant'} at alpha {r['alpha']:g}"]
    mde = f"{100 * r['mde']:g}% relative" if r["mde_relative"] else _pp(r["mde"])
    if r["sample_size_per_arm"] is not None:
        lines.append(f"  sample size: {r['sample_size_per_arm']:,} users per arm to detect {mde} from "
                     f"{_pct(r['control']['rate'])} (power {r['power']:g}, two-sided)")
    else:
        lines.append(f"  sample size: none ({r['sample_size_note']})")
    split = ":".join(f"{w:g}" for w in r["planned_split"])
    lines.append(f"  sample ratio: chi-square {r['srm_chi2']:.3f}, p = {r['srm_p_value']:.4g} against "
                 f"{split} -> {r['srm_level']} (warn below 0.01, alert below 0.001)")
    a, b = r["prior"]
    lines += ["", f"Bayesian (Beta({a:g}, {b:g}) prior)",
              f"  P(B > A) = {r['prob_b_beats_a']:.4f} exact, {r['prob_b_beats_a_mc']:.4f} Monte Carlo",
              f"  expected loss: choosing A {r['expected_loss_a']:.3g}, choosing B {r['expected_loss_b']:.3g} "
              f"(rate units; Monte Carlo {r['expected_loss_a_mc']:.3g}, {r['expected_loss_b_mc']:.3g})",
              f"  {100 * r['credible_level']:g}% credible: control [{_pct(r['credible_control'][0])}, "
              f"{_pct(r['credible_control'][1])}], treatment [{_pct(r['credible_treatment'][0])}, "
              f"{_pct(r['credible_treatment'][1])}]",
              f"  decision: {'stop, choose ' + r['winner'] if r['stop'] else 'continue'} ({r['decision']})",
              "", "Bandit view (Thompson sampling)",
              f"  P(best): control {r['prob_best'][0]:.4f}, treatment {r['prob_best'][1]:.4f}; "
              f"value remaining {100 * r['value_remaining']:.2f}% (95th percentile) -> "
              f"{'stop' if r['bandit_stop'] else 'continue'} (stops below 1%)",
              "", f"Monte Carlo: {r['draws']:,} draws, seed {r['seed']}"]
    return "\n".join(lines)
