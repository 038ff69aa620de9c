"""Replay planning (services.replay.plan, services.replay.command.downstream): pure rules."""
from __future__ import annotations

import pytest

from services.replay.command import downstream
from services.replay.plan import PartitionRange, Plan, ReplayError, parse_time, ranges, refuse_if_active

BEGIN = {0: 0, 1: 10}
END = {0: 100, 1: 50}


@pytest.mark.parametrize("reason,from_,to,parts,expected", [
    ("unbounded: everything retained", {}, {}, None, [(0, 0, 100), (1, 10, 50)]),
    ("from before retention is clamped", {0: 5, 1: 5}, {}, None, [(0, 5, 100), (1, 10, 50)]),
    ("to past the end is clamped", {}, {0: 500, 1: 40}, None, [(0, 0, 100), (1, 10, 40)]),
    ("from after to gives an empty range", {0: 80}, {0: 20}, None, [(0, 80, 80), (1, 10, 50)]),
    ("a partition subset", {}, {}, {1}, [(1, 10, 50)]),
])
def test_ranges(reason, from_, to, parts, expected):
    got = ranges(BEGIN, END, from_, to, parts)
    assert [(r.partition, r.start, r.end) for r in got] == expected, reason


def test_unknown_partitions_are_refused():
    with pytest.raises(ReplayError, match="no such partitions"):
        ranges(BEGIN, END, {}, {}, {7})


def test_parse_time():
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000_000
    with pytest.raises(ReplayError, match="ISO-8601"):
        parse_time("yesterday")


def test_refuses_an_active_group_with_what_to_do():
    refuse_if_active("g", 0, "sessionize")
    with pytest.raises(ReplayError, match="stop every `clickloop worker sessionize`"):
        refuse_if_active("g", 2, "sessionize")


def test_a_rebuild_cascades_to_processors_reading_its_outputs():
    assert downstream("sessionize") == ["sessionize", "features"]
    assert downstream("features") == ["features"]


def test_plan_renders_the_dry_run():
    plan = Plan("clicks", "live", "topic:bf", (PartitionRange(0, 5, 8),), ("x",))
    text = plan.render(execute=False)
    assert "dry run" in text and "offsets [5, 8) = 3 records" in text and "- x" in text
