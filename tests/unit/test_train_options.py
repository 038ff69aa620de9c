"""`clickloop train` options, time ranges and version names: pure, as tables of cases."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from services.cli import main
from services.model.als import AlsParams
from services.model.train import (TrainError, TrainOptions, arrays_digest, in_range, item_counts,
                                  parse_when, version_for)
from services.model.transform import Interaction

NOV25 = 1_795_564_800_000     # 2026-11-25T00:00:00Z


def args(**over) -> argparse.Namespace:
    """The parsed command line with the CLI's defaults."""
    base = dict(name=None, since=None, until=None, test_fraction=0.2, factors=32, iterations=15,
                regularization=0.1, alpha=10.0, backend="auto", k=10, no_announce=False,
                precompute=False, precompute_k=None, active_days=7.0, json=False)
    return argparse.Namespace(**{**base, **over})


@pytest.mark.parametrize("text,ms,why", [
    ("2026-11-25T00:00:00Z", NOV25, "ISO with Z"),
    ("2026-11-25", NOV25, "a date is its midnight, UTC"),
    ("2026-11-25T01:00:00+01:00", NOV25, "an offset"),
    ("2026-11-25T00:00:00", NOV25, "naive means UTC"),
    (str(NOV25), NOV25, "epoch ms"),
    (" 1795564800000 ", NOV25, "spaces around"),
    ("0", 0, "the epoch itself"),
    ("-1000", -1000, "before the epoch"),
])
def test_parse_when(text, ms, why):
    assert parse_when(text, "--since") == ms, why


@pytest.mark.parametrize("text,message", [
    ("1795564800", "looks like epoch seconds; give epoch milliseconds (1795564800000)"),
    ("yesterday", "give an ISO-8601 time"),
    ("2026-13-01", "give an ISO-8601 time"),
    ("", "give an ISO-8601 time"),
])
def test_parse_when_refuses(text, message):
    with pytest.raises(TrainError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_when(text, "--until")


def test_defaults():
    o = TrainOptions.from_args(args(), "als")
    assert (o.name, o.since_ms, o.until_ms, o.test_fraction, o.k) == ("als", None, None, 0.2, 10)
    assert o.params == AlsParams(factors=32, regularization=0.1, alpha=10.0, iterations=15)
    assert (o.announce, o.precompute, o.precompute_k, o.active_days, o.json) == (True, False, 10, 7.0, False)
    assert o.range_text() == "from the beginning to the end"


def test_options_are_carried():
    o = TrainOptions.from_args(args(name="als2", since="2026-11-25", until=str(NOV25 + 1000),
                                    test_fraction=0.3, factors=8, iterations=4, regularization=0.5,
                                    alpha=2.0, backend="numpy", k=5, no_announce=True,
                                    precompute=True, precompute_k=20, active_days=0.5, json=True),
                               "als")
    assert (o.name, o.since_ms, o.until_ms, o.test_fraction) == ("als2", NOV25, NOV25 + 1000, 0.3)
    assert o.params == AlsParams(factors=8, iterations=4, regularization=0.5, alpha=2.0)
    assert (o.backend, o.k, o.announce, o.precompute, o.precompute_k, o.active_days, o.json) == \
        ("numpy", 5, False, True, 20, 0.5, True)
    assert o.range_text() == "from 2026-11-25T00:00:00.000+00:00 to 2026-11-25T00:00:01.000+00:00"


def test_precompute_k_defaults_to_k():
    assert TrainOptions.from_args(args(k=3), "als").precompute_k == 3


@pytest.mark.parametrize("over,message", [
    ({"since": "2026-11-26", "until": "2026-11-25"}, "is not before --until"),
    ({"since": "2026-11-25", "until": "2026-11-25"}, "is not before --until"),
    ({"test_fraction": 0.0}, "--test-fraction 0.0"),
    ({"test_fraction": 1.0}, "--test-fraction 1.0"),
    ({"k": 0}, "--k 0: must be at least 1"),
    ({"precompute_k": 0}, "--precompute-k 0"),
    ({"active_days": 0.0}, "--active-days 0.0"),
    ({"active_days": float("inf")}, "--active-days inf: must be more than 0 and at most"),
    ({"active_days": float("nan")}, "--active-days nan"),
    ({"factors": 0}, "factors, iterations and threads must be >= 1"),
    ({"iterations": 0}, "factors, iterations and threads must be >= 1"),
    ({"alpha": 0.5}, "alpha=0.5 must be >= 1"),
    ({"regularization": 0.0}, "regularization > 0"),
    ({"name": "../x"}, "plain folder name"),
    ({"name": ".hidden"}, "plain folder name"),
])
def test_bad_options_are_refused_with_the_option_named(over, message):
    with pytest.raises(TrainError, match=message.replace("(", r"\(")):
        TrainOptions.from_args(args(**over), "als")


def test_the_cli_prints_the_error_and_exits_2(capsys):
    assert main(["train", "--test-fraction", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clickloop train: --test-fraction 1.5") and "Traceback" not in err


def it(user: str, item: str, ts: int, action: str = "view") -> Interaction:
    return Interaction(user, item, action, ts)  # type: ignore[arg-type]


ROWS = [it("u", "a", 10), it("u", "b", 20), it("v", "a", 30), it("v", "c", 40, "click")]


@pytest.mark.parametrize("since,until,times,why", [
    (None, None, [10, 20, 30, 40], "unbounded"),
    (20, None, [20, 30, 40], "since is inclusive"),
    (None, 30, [10, 20], "until is exclusive"),
    (20, 40, [20, 30], "half-open [since, until)"),
    (41, None, [], "nothing after the data"),
])
def test_in_range(since, until, times, why):
    assert [r.ts for r in in_range(ROWS, since, until)] == times, why


def test_item_counts_count_interactions_aligned_with_items():
    rows = ROWS + [it("u", "a", 50), it("w", "z", 60)]
    counts = item_counts(rows, ("a", "b", "c"))
    assert counts.dtype == np.float32 and counts.tolist() == [3.0, 1.0, 1.0], "z is not an item"


def test_version_names_sort_by_time_and_differ_by_content():
    a = {"item_factors": np.ones((2, 2), np.float32)}
    b = {"item_factors": np.zeros((2, 2), np.float32)}
    v = version_for(NOV25 + 5, a)
    assert v == f"20261125T000000.005Z-{arrays_digest(a)[:8]}"
    assert version_for(NOV25 + 5, b) != v, "same time, other arrays"
    times = [NOV25 + d for d in (0, 1, 999, 1000, 59_999, 3_600_000, 86_400_000 * 40)]
    names = [version_for(t, a) for t in times]
    assert sorted(names) == names and len(set(names)) == len(names)
    assert "/" not in v and not v.startswith("."), "a plain folder name"


def test_arrays_digest_sees_names_dtypes_and_shapes():
    x = np.arange(4, dtype=np.float32)
    digests = {arrays_digest({"a": x}), arrays_digest({"b": x}), arrays_digest({"a": x.view(np.int32)}),
               arrays_digest({"a": x.reshape(2, 2)})}
    assert len(digests) == 4
    assert arrays_digest({"a": x, "b": x[:2]}) == arrays_digest({"b": x[:2], "a": x}), "order-free"
