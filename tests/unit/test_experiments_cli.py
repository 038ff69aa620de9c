"""`clickloop stats ab`: JSON keys and values for a known case (checked against
independent scipy computations), the text report, and bad input (exit 2, one line)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from services.cli import main

KEYS = {"z", "p_value_one_sided", "p_value_two_sided", "ci_lower_control", "ci_lower_treatment",
        "prob_b_beats_a", "expected_loss_a", "expected_loss_b", "sample_size_per_arm", "srm_p_value", "seed"}


def run_json(capsys, *args) -> dict:
    assert main(["stats", "ab", *args, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "one JSON object on one line"
    return json.loads(out)


def test_json_for_a_known_case(capsys):
    r = run_json(capsys, "--control", "0.07:1062", "--treatment", "96:1058", "--seed", "7", "--draws", "400000")
    assert KEYS <= r.keys()
    ca, na, cb, nb = 74, 1062, 96, 1058  # 0.07 x 1062 = 74.3 -> 74
    assert (r["control"]["conversions"], r["treatment"]["conversions"]) == (ca, cb)
    chi2, p, _, _ = stats.chi2_contingency([[ca, na - ca], [cb, nb - cb]], correction=False)
    assert r["z"] > 0 and r["z"] ** 2 == pytest.approx(chi2) and r["p_value_two_sided"] == pytest.approx(p)
    assert r["p_value_one_sided"] == pytest.approx(p / 2), "z > 0: one-sided is half the two-sided"
    # One-sided 95 % Wilson lower bound from its definition: the smallest q with
    # (rate - q) / sqrt(q (1 - q) / n) <= z_0.95.
    for key, c, n in (("ci_lower_control", ca, na), ("ci_lower_treatment", cb, nb)):
        z, rate = stats.norm.isf(0.05), c / n
        qs = np.linspace(0.0005, rate, 200_000)
        inside = (rate - qs) / np.sqrt(qs * (1 - qs) / n) <= z
        assert r[key] == pytest.approx(qs[inside.argmax()], abs=1e-5), key
    draws = np.random.default_rng(1).beta([ca + 1, cb + 1], [na - ca + 1, nb - cb + 1], size=(2_000_000, 2))
    assert r["prob_b_beats_a"] == pytest.approx(np.mean(draws[:, 1] > draws[:, 0]), abs=1.5e-3)
    assert r["expected_loss_a"] == pytest.approx(np.maximum(draws[:, 1] - draws[:, 0], 0).mean(), rel=0.02)
    assert r["expected_loss_b"] == pytest.approx(np.maximum(draws[:, 0] - draws[:, 1], 0).mean(), rel=0.05)
    assert r["srm_p_value"] == pytest.approx(stats.chisquare([na, nb]).pvalue)
    # Sample size: the observed difference at alpha 0.05, power 0.8, from the formula's terms.
    p1, p2 = ca / na, cb / nb
    za, zb = stats.norm.isf(0.025), stats.norm.ppf(0.8)
    pbar = (p1 + p2) / 2
    n = (za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / (p2 - p1) ** 2
    assert r["sample_size_per_arm"] == math.ceil(n)
    assert r["seed"] == 7 and r["draws"] == 400_000
    again = run_json(capsys, "--control", "0.07:1062", "--treatment", "96:1058", "--seed", "7", "--draws", "400000")
    assert again == r, "same seed, same report"


@pytest.mark.parametrize("args,check,why", [
    (["--mde", "10%"], lambda r: r["mde_relative"] and r["mde"] == pytest.approx(0.1), "relative MDE"),
    (["--mde", "0.01", "--power", "0.9"], lambda r: not r["mde_relative"] and r["power"] == 0.9, "absolute MDE"),
    (["--split", "20:80"], lambda r: r["srm_level"] == "alert", "planned 20/80, observed 50/50"),
    (["--alpha", "0.1"], lambda r: r["significant"], "p 0.074 is significant at 0.1"),
    (["--prior", "0.5:0.5"], lambda r: r["prior"] == [0.5, 0.5], "Jeffreys prior"),
])
def test_options(capsys, args, check, why):
    r = run_json(capsys, "--control", "74:1062", "--treatment", "96:1058", "--seed", "1", "--draws", "1000", *args)
    assert check(r), why


def test_no_difference_gives_no_sample_size_rather_than_an_error(capsys):
    r = run_json(capsys, "--control", "50:1000", "--treatment", "50:1000", "--seed", "1", "--draws", "1000")
    assert r["sample_size_per_arm"] is None and "non-zero" in r["sample_size_note"]
    assert (r["z"], r["p_value_two_sided"], r["prob_b_beats_a"]) == (0.0, 1.0, pytest.approx(0.5))


def test_text_report_names_every_section(capsys):
    assert main(["stats", "ab", "--control", "0.07:1062", "--treatment", "96:1058", "--seed", "3",
                 "--draws", "1000"]) == 0
    out = capsys.readouterr().out
    for part in ("z = ", "p one-sided", "sample size", "sample ratio", "P(B > A)", "expected loss",
                 "credible", "decision", "P(best)", "value remaining", "seed 3"):
        assert part in out, part


@pytest.mark.parametrize("args,reason,why", [
    (["--control", "0.07", "--treatment", "96:1058"], "expected RATE_OR_CONVERSIONS:USERS", "no users"),
    (["--control", "75:74", "--treatment", "96:1058"], "cannot exceed", "more conversions than users"),
    (["--control", "7%:100", "--treatment", "96:1058"], "neither a count", "percent sign"),
    (["--control", "74:1062", "--treatment", "96:1058", "--alpha", "1.5"], "alpha", "alpha out of range"),
    (["--control", "74:1062", "--treatment", "96:1058", "--mde", "x"], "--mde", "unreadable MDE"),
    (["--control", "74:1062", "--treatment", "96:1058", "--seed", "-4"], "seed", "negative seed"),
])
def test_bad_input_exits_2_with_one_line(capsys, args, reason, why):
    assert main(["stats", "ab", *args]) == 2, why
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("clickloop stats ab: ") and reason in err, why


def test_bad_input_from_the_shell_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "services.cli", "stats", "ab", "--control", "abc",
                           "--treatment", "1:2"], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
