"""Results from posterior snapshots (services/experiments/results.py) agree with the
pure statistics modules, flag sample-ratio mismatch, and build the daily history."""
from __future__ import annotations

import pytest

import orjson

from services.experiments import bandit, bayesian, frequentist, report
from services.experiments.inputs import Arm
from services.experiments.results import SnapshotError, read_snapshot, results

DAY_MS = 86_400_000


def experiment(arms=(("control", 0.5), ("treatment", 0.5)), kind="ab") -> dict:
    return {"v": 1, "revision": 2, "id": "exp-1", "name": "n", "owner": "o", "hypothesis": "h",
            "surface": "home.recommendations", "population": {}, "unit": "user_id",
            "arms": [{"name": n, "weight": w, "description": None} for n, w in arms], "kind": kind,
            "epsilon": None, "primary_metric": "click_through", "start": 0, "planned_end": DAY_MS,
            "ended": None, "status": "running", "namespace": None, "updated": 0}


def snapshot(counts: dict[str, tuple[int, int]], prior=(1.0, 1.0), days=(), **extra) -> dict:
    """A bandit.posteriors record (schemas/posteriors.py): per-arm arrays in the order of
    `arms`, alpha/beta = prior + counts, `daily` as day -> arm -> {exposures, clicks}."""
    names = list(counts)
    return {"v": 1, "experiment": "exp-1", "version": 3, "arms": names,
            "alpha": [prior[0] + c for e, c in counts.values()],
            "beta": [prior[1] + e - c for e, c in counts.values()],
            "exposures": [e for e, _ in counts.values()], "clicks": [c for _, c in counts.values()],
            "draws": 1000, "seed": 11, "as_of": 5,
            "daily": {d: {n: {"exposures": e, "clicks": c} for n, (e, c) in per.items()} for d, per in days},
            **extra}


@pytest.mark.parametrize("control,treatment,why", [
    ((1062, 74), (1058, 95), "the README's example: significant one-sided, not two-sided"),
    ((5000, 250), (5000, 250), "identical arms: z = 0, P(B>A) = 1/2"),
    ((150, 3), (160, 12), "small counts near 0"),
    ((40, 2), (45, 9), "fewer than 100 units per arm: no decision"),
])
def test_two_arms_equal_the_ab_report(control, treatment, why):
    exp = experiment()
    snap = read_snapshot(snapshot({"control": control, "treatment": treatment}), ["control", "treatment"])
    r = results(exp, snap, seed=42, draws=20_000)
    a, b = Arm(control[1], control[0]), Arm(treatment[1], treatment[0])
    ref = report.ab_report(a, b, seed=42, draws=20_000)
    c = r["comparisons"][0]
    for key in ("z", "p_value_one_sided", "p_value_two_sided", "difference", "ci_difference",
                "sample_size_per_arm", "prob_b_beats_a", "expected_loss_a", "expected_loss_b",
                "prob_b_beats_a_mc", "expected_loss_a_mc", "expected_loss_b_mc", "stop"):
        if ref[key] is None:  # no observed difference: no sample size to quote
            assert c[key] is None and c["sample_size_note"] == ref["sample_size_note"], why
        else:
            assert c[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), (key, why)
    assert c["winner"] == {"A": "control", "B": "treatment", None: None}[ref["winner"]], why
    assert r["arms"][0]["ci"] == pytest.approx(ref["ci_control"])
    assert r["arms"][1]["ci_lower"] == pytest.approx(ref["ci_lower_treatment"])
    assert r["arms"][1]["credible"] == pytest.approx(ref["credible_treatment"])
    assert r["srm"]["p_value"] == pytest.approx(ref["srm_p_value"])
    expected = bandit.assess([1 + control[1], 1 + treatment[1]],
                             [1 + control[0] - control[1], 1 + treatment[0] - treatment[1]], 20_000, 44)
    assert r["bandit"]["prob_best"] == list(expected.prob_best)
    assert r["bandit"]["value_remaining"] == expected.value_remaining
    assert r["bandit"]["source"] == "computed"


def test_each_treatment_is_compared_with_the_first_arm():
    exp = experiment((("a", 1), ("b", 1), ("c", 2)))
    counts = {"a": (1000, 50), "b": (980, 61), "c": (2050, 140)}
    r = results(exp, read_snapshot(snapshot(counts), ["a", "b", "c"]), seed=1, draws=1000)
    assert [(c["control"], c["treatment"]) for c in r["comparisons"]] == [("a", "b"), ("a", "c")]
    base = Arm(50, 1000)
    for comp, (name, (n, k)) in zip(r["comparisons"], list(counts.items())[1:]):
        t = frequentist.z_test(base, Arm(k, n))
        assert comp["z"] == pytest.approx(t.z) and comp["p_value_two_sided"] == pytest.approx(t.p_value_two_sided)
        assert comp["prob_b_beats_a"] == pytest.approx(
            bayesian.prob_b_beats_a(bayesian.Beta(51, 951), bayesian.Beta(1 + k, 1 + n - k)))
    srm = frequentist.srm_test([1000, 980, 2050], [1, 1, 2])
    assert r["srm"]["p_value"] == pytest.approx(srm.p_value) and not r["srm"]["warning"]


@pytest.mark.parametrize("users,weights,warning,level", [
    ((5000, 5000), (0.5, 0.5), False, "ok"),
    ((5000, 4800), (0.5, 0.5), False, "ok"),        # p ~ 0.04: noise, no warning below 0.01
    ((5000, 4700), (0.5, 0.5), True, "warn"),       # p ~ 0.0023
    ((5000, 4000), (0.5, 0.5), True, "alert"),
    ((2000, 8000), (0.2, 0.8), False, "ok"),        # an uneven plan that is kept
    ((5000, 5000), (0.2, 0.8), True, "alert"),      # the same counts against that plan
])
def test_srm_flag_against_planned_weights(users, weights, warning, level):
    exp = experiment((("a", weights[0]), ("b", weights[1])))
    snap = read_snapshot(snapshot({"a": (users[0], users[0] // 20), "b": (users[1], users[1] // 20)}), ["a", "b"])
    srm = results(exp, snap, seed=0, draws=100)["srm"]
    ref = frequentist.srm_test(list(users), list(weights))
    assert (srm["warning"], srm["level"], srm["checked"]) == (warning, level, True)
    assert srm["p_value"] == pytest.approx(ref.p_value)
    assert (ref.p_value < 0.01) == warning


def test_bandits_are_not_checked_for_srm_and_use_the_snapshots_bandit_figures():
    exp = experiment(kind="thompson")
    rec = snapshot({"control": (200, 10), "treatment": (5000, 400)}, value_remaining=0.004, stop=True,
                   prob_best=[0.001, 0.999], champion="treatment")
    r = results(exp, read_snapshot(rec, ["control", "treatment"]), seed=3, draws=500)
    assert r["srm"]["checked"] is False and r["srm"]["warning"] is False
    assert r["bandit"] | {"computed": None} == r["bandit"] | {
        "prob_best": [0.001, 0.999], "value_remaining": 0.004, "stop": True, "source": "snapshot",
        "computed": None}


def test_posteriors_come_from_the_snapshot_else_from_the_prior_and_counts():
    exp = experiment()
    with_prior = snapshot({"control": (100, 10), "treatment": (100, 20)}, prior=(2.0, 8.0))
    r = results(exp, read_snapshot(with_prior, ["control", "treatment"]), seed=0, draws=100)
    assert r["arms"][0]["posterior"] | {"mean": 0} == {"alpha": 12.0, "beta": 98.0, "mean": 0}
    bare = {"arms": {"control": {"counts": {"exposures": 100, "clicks": 10}},
                     "treatment": {"counts": {"exposures": 100, "clicks": 20}}}}
    r2 = results(exp, read_snapshot(bare, ["control", "treatment"]), seed=0, draws=100)
    assert r2["arms"][1]["posterior"]["alpha"] == 21.0 and r2["arms"][1]["posterior"]["beta"] == 81.0
    assert r2["comparisons"][0]["prob_b_beats_a"] == pytest.approx(
        bayesian.prob_b_beats_a(bayesian.Beta(11, 91), bayesian.Beta(21, 81)))


def test_no_snapshot_gives_neutral_results():
    r = results(experiment(), read_snapshot(None, ["control", "treatment"]), seed=0, draws=100)
    assert [a["exposures"] for a in r["arms"]] == [0, 0]
    assert r["comparisons"][0]["p_value_two_sided"] == 1.0
    assert r["comparisons"][0]["prob_b_beats_a"] == pytest.approx(0.5)
    assert r["srm"]["warning"] is False and r["history"] == [] and r["snapshot"]["present"] is False


def test_history_is_cumulative_per_day_with_shares_p_values_and_regret():
    days = [("2026-11-24", {"control": (100, 5), "treatment": (300, 30)}),
            ("2026-11-23", {"control": (200, 10), "treatment": (200, 16)}),   # out of order
            ("2026-11-25", {"treatment": (50, 6)})]                           # an arm with no traffic
    total = {"control": (300, 15), "treatment": (550, 52)}
    exp = experiment()
    r = results(exp, read_snapshot(snapshot(total, days=days), ["control", "treatment"]), seed=0, draws=100)
    h = r["history"]
    assert [d["day"] for d in h] == ["2026-11-23", "2026-11-24", "2026-11-25"]
    assert [[(a["exposures"], a["clicks"]) for a in d["arms"]] for d in h] == [
        [(200, 10), (200, 16)], [(300, 15), (500, 46)], [(300, 15), (550, 52)]]
    assert [[a["share"] for a in d["arms"]] for d in h] == [[0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]
    mean_c, mean_t = 16 / 302, 53 / 552           # posterior means with Beta(1, 1)
    best = max(mean_c, mean_t)
    regret, expected = 0.0, []
    for _, per in sorted(days):
        regret += sum(n * (best - m) for (n, _), m in
                      ((per.get("control", (0, 0)), mean_c), (per.get("treatment", (0, 0)), mean_t)))
        expected.append(regret)
    assert [d["regret"] for d in h] == pytest.approx(expected)
    last = frequentist.z_test(Arm(15, 300), Arm(52, 550))
    assert h[-1]["comparisons"][0]["p_value_two_sided"] == pytest.approx(last.p_value_two_sided)
    assert h[-1]["comparisons"][0]["p_value_two_sided"] == pytest.approx(r["comparisons"][0]["p_value_two_sided"])
    assert h[0]["srm_p_value"] == pytest.approx(1.0)
    assert h[-1]["srm_p_value"] == pytest.approx(frequentist.srm_test([300, 550], [0.5, 0.5]).p_value)


@pytest.mark.parametrize("record,reason", [
    ({"arms": ["control"], "exposures": [5], "clicks": [6]}, "6 clicks out of 5"),
    ({"arms": ["control", "treatment"], "alpha": [1.0]}, "one value per arm"),
    ({"arms": [{"name": "control", "exposures": 5, "clicks": 6}]}, "6 clicks out of 5"),
    ({"arms": [{"exposures": 5, "clicks": 1}]}, "needs a name"),
    ({"arms": "control"}, "expected arms as an object or a list"),
    ([1, 2], "a snapshot is a JSON object"),
])
def test_unreadable_snapshots_are_named(record, reason):
    with pytest.raises(SnapshotError, match=reason):
        read_snapshot(record, ["control", "treatment"])


def test_results_are_plain_json():
    days = [("2026-11-24", {"control": (100, 5), "treatment": (120, 9)})]
    rec = snapshot({"control": (100, 5), "treatment": (120, 9)}, days=days)
    r = results(experiment(), read_snapshot(rec, ["control", "treatment"]), seed=1, draws=100)
    assert orjson.loads(orjson.dumps(r)) == r  # no numpy scalars: orjson refuses them


def test_an_arm_the_snapshot_lacks_has_the_prior_and_p_best_is_then_computed():
    rec = snapshot({"treatment": (300, 30)}, prob_best=[1.0], value_remaining=0.0, stop=True)
    r = results(experiment(), read_snapshot(rec, ["control", "treatment"]), seed=2, draws=500)
    assert r["arms"][0]["posterior"] | {"mean": 0} == {"alpha": 1.0, "beta": 1.0, "mean": 0}
    assert r["arms"][1]["posterior"]["alpha"] == 31.0
    assert r["bandit"]["source"] == "computed" and len(r["bandit"]["prob_best"]) == 2


def test_reads_the_bandits_processors_own_snapshot():
    """The record streams/bandits_core.py publishes, folded from rewards over two days."""
    from streams.bandits_core import ExperimentPosterior, snapshot as publish

    post = ExperimentPosterior()
    day1, day2 = 1_795_000_000_000, 1_795_000_000_000 + DAY_MS
    for i in range(300):
        arm, ts = ("control", day1) if i % 3 else ("treatment", day2 if i % 2 else day1)
        post.add({"v": 1, "request_id": f"r{i}", "experiment": "exp-1", "arm": arm,
                  "reward": int(i % 7 == 0), "exposure_ts": ts, "reward_ts": ts + 1})
    rec = orjson.loads(orjson.dumps(publish("exp-1", post, version=5, draws=2000)))
    r = results(experiment(), read_snapshot(rec, ["control", "treatment"]), seed=0, draws=500)
    for i, arm in enumerate(r["arms"]):
        j = rec["arms"].index(arm["name"])
        assert (arm["exposures"], arm["clicks"]) == (rec["exposures"][j], rec["clicks"][j])
        assert (arm["posterior"]["alpha"], arm["posterior"]["beta"]) == (rec["alpha"][j], rec["beta"][j])
        assert r["bandit"]["prob_best"][i] == rec["prob_best"][j]
    assert r["bandit"]["source"] == "snapshot" and r["snapshot"]["version"] == 5
    assert r["bandit"]["value_remaining"] == rec["value_remaining"]
    assert [d["day"] for d in r["history"]] == sorted(rec["daily"])
    last = r["history"][-1]["arms"]
    assert [(a["exposures"], a["clicks"]) for a in last] == [(a["exposures"], a["clicks"]) for a in r["arms"]]
