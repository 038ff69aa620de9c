"""Deterministic allocation against the published test vectors
(schemas/allocation_vectors.json) and FNV-1a's reference values."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from services.experiments import ExperimentError
from services.experiments.allocation import (BUCKETS, Allocator, assign, boundaries, bucket,
                                             fnv1a_32)

VECTORS = json.loads((Path(__file__).parents[2] / "schemas" / "allocation_vectors.json").read_text())


@pytest.mark.parametrize("data,expected,why", [
    (b"", 0x811C9DC5, "the offset basis"),
    (b"a", 0xE40C292C, "FNV reference suite"),
    (b"foobar", 0xBF9CF968, "FNV reference suite"),
])
def test_fnv1a_32_reference_values(data, expected, why):
    assert fnv1a_32(data) == expected, why


def test_published_fnv_values_are_the_reference_ones():
    assert {v["input"]: v["hash"] for v in VECTORS["fnv1a_32"]} == {
        "": 0x811C9DC5, "a": 0xE40C292C, "foobar": 0xBF9CF968}


@pytest.mark.parametrize("case", VECTORS["boundaries"], ids=lambda c: str(c["weights"]))
def test_published_boundaries(case):
    assert boundaries(case["weights"]) == case["ends"]


@pytest.mark.parametrize("case", VECTORS["vectors"], ids=lambda c: f"{c['experiment']}:{c['unit']}")
def test_published_vectors(case):
    h = fnv1a_32(f"{case['experiment']}:{case['unit']}".encode("utf-8"))
    assert (h, h % BUCKETS) == (case["hash"], case["bucket"]), case["why"]
    ns = case["namespace"]
    namespace = None if ns is None else (ns["name"], *ns["range"])
    assert assign(case["experiment"], case["unit"], case["weights"], namespace) == case["arm"], case["why"]
    assert Allocator(case["experiment"], case["weights"], namespace)(case["unit"]) == case["arm"], case["why"]
    if ns is not None:
        assert bucket(ns["name"], case["unit"]) == case["namespace_bucket"]


def test_vectors_cover_the_edges_they_promise():
    units = [c["unit"] for c in VECTORS["vectors"]]
    assert any(ord(ch) > 0xFFFF for u in units for ch in u), "a character outside the BMP"
    assert any(any(w == 0 for w in c["weights"]) for c in VECTORS["vectors"]), "a zero weight"
    assert any(c["arm"] is None for c in VECTORS["vectors"]), "a unit outside its namespace range"
    assert {"jos\u00e9", "jose\u0301"} <= set(units), "NFC and NFD spellings, deliberately not normalized"


def test_sticky_across_processes():
    """Same arm in a fresh interpreter with another PYTHONHASHSEED: nothing depends on hash()."""
    units = [f"user-{i}" for i in range(50)]
    here = [assign("sticky", u, [0.3, 0.7]) for u in units]
    code = ("import json,sys; from services.experiments.allocation import assign; "
            f"print(json.dumps([assign('sticky', u, [0.3, 0.7]) for u in {units!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}, cwd=Path(__file__).parents[2])
    assert json.loads(out.stdout) == here


@pytest.mark.parametrize("weights,why", [
    ([0.5, 0.5], "even"),
    ([0.1, 0.2, 0.7], "uneven, three arms"),
])
def test_shares_follow_the_weights(weights, why):
    n = 20_000
    counts = np.bincount([assign("share-test", f"visitor-{i}", weights) for i in range(n)], minlength=len(weights))
    expected = np.array(weights) / sum(weights) * n
    assert stats.chisquare(counts, expected).pvalue > 0.001, f"{why}: {counts}"


def test_experiments_reshuffle_units_independently():
    units = [f"u{i}" for i in range(10_000)]
    first = np.array([assign("exp-one", u, [1, 1]) for u in units])
    second = np.array([assign("exp-two", u, [1, 1]) for u in units])
    table = [[np.sum((first == i) & (second == j)) for j in (0, 1)] for i in (0, 1)]
    assert stats.chi2_contingency(table).pvalue > 0.001, "arm in one test says nothing about the next"


def test_namespace_ranges_partition_units():
    units = [f"u{i}" for i in range(5_000)]
    a = [assign("layout-a", u, [1, 1], ("home", 0, 3000)) for u in units]
    b = [assign("layout-b", u, [1, 1], ("home", 3000, 10_000)) for u in units]
    assert all((x is None) != (y is None) for x, y in zip(a, b)), "each unit in exactly one of the two"
    share = sum(x is not None for x in a) / len(units)
    assert abs(share - 0.3) < 0.03


@pytest.mark.parametrize("weights,why", [
    ([0, 0], "all zero"),
    ([1, -1], "negative"),
    ([1, float("nan")], "not a number"),
    ([], "no arms"),
])
def test_bad_weights(weights, why):
    with pytest.raises(ExperimentError):
        boundaries(weights)


def test_bad_namespace_range():
    with pytest.raises(ExperimentError, match="range"):
        Allocator("x", [1, 1], ("ns", 5000, 5000))
