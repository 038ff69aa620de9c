"""An experiment's results from its latest `bandit.posteriors` snapshot: pure.

    snap = read_snapshot(record_from_topic, arm_names)     # the one place the wire shape is read
    body = results(experiment, snap, alpha=0.05, seed=7)   # JSON-ready dict

Everything in the statistics modules, per experiment: per arm the counts
(rewarded exposures and clicks), rate, Wilson interval and one-sided lower
bound, Beta posterior and credible interval; per treatment against the first
arm (the control) the pooled z-test, both p-values, the difference and its
interval, the sample size, P(B > A) exact and by Monte Carlo, expected losses
and the expected-loss decision; across arms the sample-ratio-mismatch test
against the planned weights (A/B only: a bandit moves traffic on purpose, so
its split is not a plan to check against), P(best), value remaining and the
stop flag. The daily history is cumulative per UTC day and carries what the
dashboard plots over time: allocation share, p-values and intervals, the SRM
p-value and a cumulative regret estimate.

Regret estimate: exposures that went to an arm other than the one that looks
best now cost (best posterior mean - that arm's posterior mean) each; summed
over days. It uses today's posterior means for every past day (the best
estimate of the true rates we have), so it is an estimate, revised as the
posteriors sharpen.

Bayesian figures use the snapshot's alpha and beta when it has them (the
bandits processor's posterior, prior included), else `prior` updated with the
counts; the expected-loss decision and the Monte Carlo values come from the
same posteriors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from schemas.experiments import Experiment
from services.experiments import ExperimentError, bandit, bayesian, frequentist
from services.experiments.inputs import Arm

DEFAULT_DRAWS = 20_000          # Monte Carlo draws per request: ~10 ms for two arms
# Monte Carlo cost is arms x draws (each treatment against the control, P(best) over all
# arms): 1,000,000 is ~0.3 s and ~100 MB (20 arms x 50,000 draws, 2 arms x 200,000 would be
# 0.4 M); 20 arms x 200,000 draws took 1.2 s, 5,000 x 200,000 tried to allocate 7.45 GiB.
MAX_DRAW_CELLS = 1_000_000


class SnapshotError(ExperimentError):
    """A `bandit.posteriors` record that cannot be read."""


@dataclass(frozen=True, slots=True)
class ArmState:
    exposures: int = 0          # rewarded exposures (the arm's units)
    clicks: int = 0
    alpha: float | None = None  # the posterior, when the snapshot carries it
    beta: float | None = None
    prob_best: float | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What results need from a posterior snapshot, by arm name; days in order,
    each day's own counts (not cumulative)."""
    arms: Mapping[str, ArmState]
    days: Sequence[tuple[str, Mapping[str, Arm]]] = ()
    value_remaining: float | None = None
    stop: bool | None = None
    version: int | None = None
    seed: int | None = None
    updated: int | None = None
    raw_keys: tuple[str, ...] = field(default=())


EMPTY = Snapshot(arms={})

_EXPOSURES = ("exposures", "rewarded", "n", "trials", "users")
_CLICKS = ("clicks", "rewards", "successes", "conversions")


def _first(d: Mapping, names: Sequence[str], default=None):
    for name in names:
        if name in d and d[name] is not None:
            return d[name]
    return default


def _by_name(value, what: str) -> dict[str, Mapping]:
    """Per-arm entries given as {name: {...}} or [{"name"|"arm": name, ...}]."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list):
        out = {}
        for entry in value:
            if not isinstance(entry, Mapping) or _first(entry, ("name", "arm")) is None:
                raise SnapshotError(f"{what}: every arm entry needs a name, got {entry!r}")
            out[str(_first(entry, ("name", "arm")))] = entry
        return out
    raise SnapshotError(f"{what}: expected arms as an object or a list, got {type(value).__name__}")


def _counts(entry: Mapping, what: str) -> tuple[int, int]:
    counts = entry.get("counts") if isinstance(entry.get("counts"), Mapping) else entry
    n, c = int(_first(counts, _EXPOSURES, 0)), int(_first(counts, _CLICKS, 0))
    if n < 0 or c < 0 or c > n:
        raise SnapshotError(f"{what}: {c} clicks out of {n} rewarded exposures")
    return n, c


def _parallel(record: Mapping) -> dict[str, Mapping]:
    """schemas/posteriors.py's shape: `arms` a list of names, per-arm arrays beside it."""
    names = record["arms"]
    out: dict[str, dict] = {str(n): {} for n in names}
    for key in ("alpha", "beta", "exposures", "clicks", "prob_best"):
        values = record.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != len(names):
            raise SnapshotError(f"{key}: expected one value per arm ({len(names)}), got {values!r}")
        for name, value in zip(names, values):
            out[str(name)][key] = value
    return out


def check_draws(n_arms: int, draws: int) -> None:
    """ExperimentError when a results request would draw more than MAX_DRAW_CELLS."""
    if n_arms * draws > MAX_DRAW_CELLS:
        raise ExperimentError(f"{draws} draws for {n_arms} arms is {n_arms * draws:,} Monte Carlo "
                              f"cells, above {MAX_DRAW_CELLS:,}: use at most "
                              f"{MAX_DRAW_CELLS // n_arms} draws")


def _param(value, what: str) -> float | None:
    """A Beta parameter from the snapshot: None, or positive and finite."""
    if value is None:
        return None
    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise SnapshotError(f"{what} must be positive and finite, got {value!r}")
    return x


def _share(value, what: str) -> float | None:
    if value is None:
        return None
    x = float(value)
    if not 0.0 <= x <= 1.0:  # also NaN
        raise SnapshotError(f"{what} must be a probability, got {value!r}")
    return x


def read_snapshot(record: Mapping | None, arm_names: Sequence[str]) -> Snapshot:
    """The snapshot's per-arm state for the experiment's arms (arms it lacks: empty,
    the prior). Reads schemas/posteriors.py's record (per-arm arrays in the order of
    `arms`, `daily` as day -> arm -> {exposures, clicks}); also arms given as
    objects, by name or in a list with a `name`. Anything unreadable in it (a string
    for a count, a list for a parameter, a non-positive parameter) is SnapshotError:
    the data is wrong, not the request."""
    try:
        return _read_snapshot(record, arm_names)
    except SnapshotError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, ArithmeticError) as exc:
        raise SnapshotError(f"{type(exc).__name__}: {exc}") from None


def _read_snapshot(record: Mapping | None, arm_names: Sequence[str]) -> Snapshot:
    if record is None:
        return EMPTY
    if not isinstance(record, Mapping):
        raise SnapshotError(f"a snapshot is a JSON object, got {type(record).__name__}")
    raw_arms = record.get("arms", {})
    if isinstance(raw_arms, list) and all(isinstance(a, str) for a in raw_arms):
        arms_in = _parallel(record)
    else:
        arms_in = _by_name(raw_arms, "arms")
    arms = {}
    for name in arm_names:
        entry = arms_in.get(name)
        if entry is None:
            arms[name] = ArmState()
            continue
        n, c = _counts(entry, f"arm {name!r}")
        arms[name] = ArmState(n, c, _param(entry.get("alpha"), f"arm {name!r} alpha"),
                              _param(entry.get("beta"), f"arm {name!r} beta"),
                              _share(entry.get("prob_best"), f"arm {name!r} prob_best"))
    history = record.get("daily") or record.get("history") or []
    if isinstance(history, Mapping):
        history = [{"day": day, "arms": v} for day, v in history.items()]
    days = []
    for entry in history:
        day = str(_first(entry, ("day", "date")))
        per_arm = _by_name(entry.get("arms", {}), f"daily {day}")
        days.append((day, {name: Arm(*reversed(_counts(per_arm[name], f"daily {day} arm {name!r}")))
                           for name in arm_names if name in per_arm}))
    days.sort(key=lambda d: d[0])
    stop = record.get("stop")
    vr = record.get("value_remaining")
    if vr is not None and not math.isfinite(vr := float(vr)):
        raise SnapshotError(f"value_remaining must be finite, got {record['value_remaining']!r}")
    return Snapshot(arms, tuple(days), vr,
                    None if stop is None else bool(stop), record.get("version"), record.get("seed"),
                    _first(record, ("as_of", "updated", "ts")), tuple(sorted(record)))


def _floats(values) -> list[float]:
    # scipy hands back numpy scalars; results are plain JSON numbers.
    return [float(v) for v in values]


def _posterior(state: ArmState, prior: bayesian.Beta) -> bayesian.Beta:
    if state.alpha is not None and state.beta is not None:
        return bayesian.Beta(state.alpha, state.beta)
    return prior.update(Arm(state.clicks, state.exposures))


def _weights(exp: Experiment) -> list[float]:
    return [float(a["weight"]) for a in exp["arms"]]


def _srm(exp: Experiment, users: Sequence[int]) -> dict:
    if exp["kind"] != "ab":
        return {"checked": False, "chi2": None, "p_value": None, "level": None, "warning": False,
                "note": f"{exp['kind']} moves traffic on purpose: no planned split to check"}
    s = frequentist.srm_test(list(users), _weights(exp))
    return {"checked": True, "chi2": s.chi2 if math.isfinite(s.chi2) else None, "p_value": s.p_value,
            "level": s.level, "warning": s.p_value < frequentist.SRM_WARN,
            "expected": list(s.expected), "planned_weights": _weights(exp), "note": None}


def _comparison(name_a: str, a: Arm, post_a: bayesian.Beta, name_b: str, b: Arm,
                post_b: bayesian.Beta, *, alpha: float, power: float, mde: tuple[float, bool] | None,
                prior: bayesian.Beta, draws: int, seed: int | None, loss_threshold: float,
                min_units: int) -> dict:
    test = frequentist.z_test(a, b, alpha)
    mde_value, relative = (abs(test.difference), False) if mde is None else mde
    try:
        n, n_note = frequentist.sample_size_per_arm(a.rate, mde_value, alpha, power,
                                                    relative=relative), None
    except ExperimentError as exc:
        n, n_note = None, str(exc)
    loss_a, loss_b = bayesian.expected_loss(post_a, post_b)
    mc = bayesian.simulate(post_a, post_b, draws, seed)
    decision = _decide(a, b, post_a, post_b, loss_a, loss_b, loss_threshold, min_units)
    return {
        "control": name_a, "treatment": name_b,
        "difference": test.difference,
        "relative_lift": test.difference / a.rate if a.rate else None,
        "z": test.z, "p_value_one_sided": test.p_value_one_sided,
        "p_value_two_sided": test.p_value_two_sided, "significant": test.significant(alpha),
        "ci_difference": _floats(test.ci_difference),
        "sample_size_per_arm": n, "sample_size_note": n_note, "mde": mde_value,
        "mde_relative": relative,
        "prob_b_beats_a": bayesian.prob_b_beats_a(post_a, post_b),
        "prob_b_beats_a_mc": mc.prob_b_beats_a,
        "expected_loss_a": loss_a, "expected_loss_b": loss_b,
        "expected_loss_a_mc": mc.expected_loss_a, "expected_loss_b_mc": mc.expected_loss_b,
        "winner": {"A": name_a, "B": name_b}.get(decision.winner) if decision.winner else None,
        "stop": decision.stop, "decision": decision.reason, "seed": mc.seed,
    }


def _decide(a: Arm, b: Arm, post_a: bayesian.Beta, post_b: bayesian.Beta, loss_a: float,
            loss_b: float, threshold: float, min_units: int) -> bayesian.Decision:
    """bayesian.decide's rule on the given posteriors (which may carry the bandits'
    prior): never before min_units per arm; stop when the smaller expected loss is
    below threshold x A's posterior mean."""
    short = [n for n, arm in (("A", a), ("B", b)) if arm.users < min_units]
    if short:
        return bayesian.Decision(None, False, f"fewer than {min_units} units in arm {' and '.join(short)}")
    limit = threshold * post_a.mean
    name, loss = ("A", loss_a) if loss_a <= loss_b else ("B", loss_b)
    if loss < limit:
        return bayesian.Decision(name, True, f"expected loss of choosing {name} is {loss:.3g}, "
                                             f"below {threshold:.3g} x A's rate ({limit:.3g})")
    return bayesian.Decision(None, False, f"smallest expected loss {loss:.3g} (arm {name}) is not "
                                          f"below {threshold:.3g} x A's rate ({limit:.3g})")


def results(exp: Experiment, snap: Snapshot = EMPTY, *, alpha: float = 0.05, power: float = 0.8,
            mde: tuple[float, bool] | None = None, prior: bayesian.Beta = bayesian.UNIFORM,
            draws: int = DEFAULT_DRAWS, seed: int | None = None,
            loss_threshold: float = bayesian.DEFAULT_LOSS_THRESHOLD,
            min_units: int = bayesian.MIN_UNITS_PER_ARM) -> dict:
    """The experiment's results (a JSON-ready dict); with no snapshot, neutral figures."""
    if not 0.0 < alpha < 1.0:
        raise ExperimentError(f"alpha must be between 0 and 1, got {alpha}")
    if not 0.0 < power < 1.0:
        raise ExperimentError(f"power must be between 0 and 1, got {power}")
    names = [a["name"] for a in exp["arms"]]
    check_draws(len(names), draws)
    states = [snap.arms.get(n, ArmState()) for n in names]
    counts = [Arm(s.clicks, s.exposures) for s in states]
    posts = [_posterior(s, prior) for s in states]
    level = 1.0 - alpha
    arms = []
    for name, spec, arm, post, state in zip(names, exp["arms"], counts, posts, states):
        arms.append({"name": name, "weight": spec["weight"], "exposures": arm.users,
                     "clicks": arm.conversions, "rate": arm.rate,
                     "ci": _floats(frequentist.wilson_interval(arm, alpha)),
                     "ci_lower": float(frequentist.wilson_lower_bound(arm, alpha)),
                     "posterior": {"alpha": post.alpha, "beta": post.beta, "mean": post.mean},
                     "credible": list(post.interval(level))})
    comparisons = []
    for i in range(1, len(names)):
        c = _comparison(names[0], counts[0], posts[0], names[i], counts[i], posts[i], alpha=alpha,
                        power=power, mde=mde, prior=prior, draws=draws,
                        seed=seed if seed is None else seed + i - 1,
                        loss_threshold=loss_threshold, min_units=min_units)
        comparisons.append(c)
    assessed = bandit.assess([p.alpha for p in posts], [p.beta for p in posts], draws,
                             seed if seed is None else seed + len(names))
    from_snapshot = all(s.prob_best is not None for s in states) and snap.value_remaining is not None
    band = {
        "prob_best": [s.prob_best for s in states] if from_snapshot else list(assessed.prob_best),
        "value_remaining": snap.value_remaining if from_snapshot else assessed.value_remaining,
        "stop": (snap.stop if snap.stop is not None else assessed.stop) if from_snapshot
        else assessed.stop,
        "source": "snapshot" if from_snapshot else "computed",
        "computed": {"prob_best": list(assessed.prob_best),
                     "value_remaining": assessed.value_remaining, "stop": assessed.stop,
                     "champion": names[assessed.champion], "draws": draws, "seed": assessed.seed},
        "threshold": bandit.VALUE_REMAINING_THRESHOLD,
        "quantile": bandit.VALUE_REMAINING_QUANTILE,
    }
    return {
        "experiment": exp["id"], "kind": exp["kind"], "status": exp["status"],
        "alpha": alpha, "power": power, "credible_level": level,
        "prior": [prior.alpha, prior.beta], "loss_threshold": loss_threshold,
        "min_units_per_arm": min_units,
        "snapshot": {"present": bool(snap.arms), "version": snap.version, "seed": snap.seed,
                     "updated": snap.updated},
        "arms": arms, "comparisons": comparisons,
        "srm": _srm(exp, [a.users for a in counts]),
        "bandit": band,
        "history": history(exp, snap, posts, alpha),
    }


def history(exp: Experiment, snap: Snapshot, posts: Sequence[bayesian.Beta], alpha: float) -> list[dict]:
    """Per UTC day, cumulative: counts, rates and Wilson intervals per arm, the day's
    allocation share, each treatment's z-test against the control, the SRM p-value
    (A/B) and the cumulative regret estimate."""
    names = [a["name"] for a in exp["arms"]]
    means = [p.mean for p in posts]
    best = max(means)
    total = [Arm(0, 0) for _ in names]
    regret = 0.0
    out = []
    for day, per_arm in snap.days:
        daily = [per_arm.get(n, Arm(0, 0)) for n in names]
        total = [t + d for t, d in zip(total, daily)]
        exposures_today = sum(d.users for d in daily)
        regret += sum(d.users * (best - m) for d, m in zip(daily, means))
        tests = []
        for i in range(1, len(names)):
            t = frequentist.z_test(total[0], total[i], alpha)
            tests.append({"treatment": names[i], "z": t.z, "p_value_two_sided": t.p_value_two_sided,
                          "p_value_one_sided": t.p_value_one_sided, "difference": t.difference,
                          "ci_difference": _floats(t.ci_difference)})
        srm_p = (frequentist.srm_test([t.users for t in total], _weights(exp)).p_value
                 if exp["kind"] == "ab" else None)
        out.append({
            "day": day,
            "arms": [{"name": n, "exposures": t.users, "clicks": t.conversions, "rate": t.rate,
                      "ci": _floats(frequentist.wilson_interval(t, alpha)),
                      "share": d.users / exposures_today if exposures_today else None}
                     for n, t, d in zip(names, total, daily)],
            "comparisons": tests, "srm_p_value": srm_p, "regret": regret,
        })
    return out
