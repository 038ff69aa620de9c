"""Replay planning (services.replay.plan, services.replay.command.downstream): pure rules."""
from __future__ import annotations

import pytest

from services.replay.command import downstream
from services.replay.plan import (AT_TIME, BEGINNING, START_OF_RANGE, GroupStart, PartitionRange, Plan,
                                  ReplayError, check_processor_range, parse_time, ranges,
                                  refuse_archive_processor, refuse_if_active, start_rule)

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


@pytest.mark.parametrize("to_time,to_offset,parts,message,why", [
    (None, None, None, None, "open-ended, every partition: fine"),
    ("2026-11-25T10:00:00Z", None, None, "cannot stop at --to", "the processor goes on with live input"),
    (None, 500, None, "cannot stop at --to", "nor at an offset"),
    (None, None, {0}, "covers every partition", "state and outputs are reset on all"),
])
def test_a_processor_rebuild_has_a_start_but_no_end(to_time, to_offset, parts, message, why):
    if message is None:
        check_processor_range(to_time, to_offset, parts)
    else:
        with pytest.raises(ReplayError, match=message):
            check_processor_range(to_time, to_offset, parts)


TRUNCATED = {"sessions", "clicks.late"}


@pytest.mark.parametrize("topic,from_time,from_offset,rule,why", [
    ("clicks", "2026-11-25T10:00:00Z", None, START_OF_RANGE, "the replayed topic"),
    ("clicks", None, None, START_OF_RANGE, "a full rebuild: the range starts at retention"),
    ("sessions", "2026-11-25T10:00:00Z", None, BEGINNING, "truncated output: all of what is rebuilt"),
    ("orders", "2026-11-25T10:00:00Z", None, AT_TIME, "another input: the same time"),
    ("orders", None, None, BEGINNING, "no start given: everything"),
])
def test_where_a_reset_group_resumes_each_input(topic, from_time, from_offset, rule, why):
    assert start_rule(topic, "clicks", TRUNCATED, from_time, from_offset, "features") == rule, why


def test_an_offset_does_not_place_another_input():
    with pytest.raises(ReplayError, match="features also reads orders.*--from"):
        start_rule("orders", "clicks", TRUNCATED, None, 100, "features")


def test_the_archive_does_not_rebuild_a_processor_and_says_what_to_run():
    with pytest.raises(ReplayError) as refused:
        refuse_archive_processor("clicks", "sessionize", " --from 2026-11-25T10:00:00Z", "prod.")
    text = str(refused.value)
    assert "out of event-time order" in text
    assert "clickloop replay --topic clicks --from 2026-11-25T10:00:00Z --target processor:sessionize" in text
    assert "--source archive --from 2026-11-25T10:00:00Z --target topic:rebuild.clicks --execute" in text
    assert "CLICKLOOP_PREFIX=prod.rebuild. clickloop worker sessionize" in text


def test_an_archive_plan_renders_records_events_files_and_group_starts():
    plan = Plan("clicks", "archive", "topic:bf", (PartitionRange(1, 10, 60, 40, 4_000, 3),),
                notes=("archive /a/topic=clicks: 3 of 9 file(s)",),
                starts=(GroupStart("sessionize", "g", "clicks", START_OF_RANGE, ((0, 5), (1, 7))),
                        GroupStart("features", "g2", "sessions", BEGINNING)))
    text = plan.render(execute=True)
    assert "EXECUTE" in text and "3 of 9 file(s)" in text
    assert "partition 1: offsets [10, 60) = 40 records, 4000 events in 3 file(s)" in text
    assert "total 40 records, 4000 events" in text
    assert "- consumer group g: clicks from the start of the replayed range (offsets 0: 5, 1: 7)" in text
    assert "- consumer group g2: sessions from its beginning" in text
