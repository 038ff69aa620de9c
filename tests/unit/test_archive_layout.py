"""Archive layout: names, hour folders, the recovery plan and the flush policy, as tables."""
from __future__ import annotations

import pytest

from streams.archive_layout import (ArchivedFile, FileRange, FlushPolicy, Selection, committed_only,
                                    flushes,
                                    hour_dir, hour_of, hour_of_path, parse, parse_time_rules,
                                    plan_recovery, time_field)

H = 3_600_000


@pytest.mark.parametrize("ms,expected,why", [
    (0, "date=1970-01-01/hour=00", "the epoch"),
    (H - 1, "date=1970-01-01/hour=00", "last ms of an hour stays in it (half-open)"),
    (H, "date=1970-01-01/hour=01", "first ms of the next hour"),
    (1_795_528_800_000, "date=2026-11-24/hour=14", "a recent hour"),
    (1_795_528_800_000 + 10 * H - 1, "date=2026-11-24/hour=23", "end of the day"),
    (1_795_528_800_000 + 10 * H, "date=2026-11-25/hour=00", "midnight starts the next date"),
    (-1, "date=1969-12-31/hour=23", "before the epoch: floor, not truncation"),
])
def test_hour_folder_of_an_event_time(ms, expected, why):
    assert hour_dir(hour_of(ms)) == expected, why
    assert hour_of_path(f"s3://b/topic=t/{expected}/0-1-2.parquet") == hour_of(ms), why


def test_a_path_outside_hour_folders_has_no_hour():
    assert hour_of_path("/a/topic=t/0-1-2.parquet") is None
    assert hour_of_path("/a/date=2026-11-24/hour=14/x/0-1-2.parquet") is None


@pytest.mark.parametrize("path,expected,why", [
    ("/a/topic=clicks/date=2026-11-24/hour=14/3-100-199.parquet",
     ArchivedFile("/a/topic=clicks/date=2026-11-24/hour=14/3-100-199.parquet",
                  FileRange(3, 100, 199), False), "a final file"),
    ("/a/h/.3-100-199.k2x9.parquet.tmp", ArchivedFile("/a/h/.3-100-199.k2x9.parquet.tmp",
                                                      FileRange(3, 100, 199), True), "a temporary file"),
    ("3-100-199.k2x9.parquet.tmp", None, "a temp name must start with a dot"),
    (".3-100-199.parquet.tmp", None, "and carry its writer's token"),
    (".3-100-199.parquet", None, "a final name must not start with a dot"),
    ("3-100-199.k2x9.parquet", None, "nor carry a token"),
    ("/a/h/part-0000.parquet", None, "someone else's file"),
    ("/a/h/3-100.parquet", None, "no last offset"),
    ("/a/h/_SUCCESS", None, "Spark's marker"),
])
def test_parse(path, expected, why):
    assert parse(path) == expected, why


def test_names_round_trip():
    r = FileRange(2, 0, 41)
    assert (r.name, r.temp_name("ab12")) == ("2-0-41.parquet", ".2-0-41.ab12.parquet.tmp")
    assert parse(f"x/{r.name}").range == parse(f"x/{r.temp_name('ab12')}").range == r


def d(name: str) -> str:
    return f"/root/topic=clicks/date=2026-11-24/hour=14/{name}"


@pytest.mark.parametrize("files,committed,delete,through,why", [
    ([], 0, [], -1, "nothing archived yet"),
    ([d("0-0-99.parquet"), d("0-100-199.parquet")], 200, [], 199,
     "every flush committed: keep all, skip what they hold if redelivered"),
    ([d("0-0-99.parquet"), d("0-100-199.parquet")], 100, [d("0-100-199.parquet")], 99,
     "crash after the rename, before Faust committed: that flush is written again"),
    ([d("0-0-99.parquet"), d(".0-100-199.t0.parquet.tmp")], 100, [d(".0-100-199.t0.parquet.tmp")], 99,
     "crash before the rename: the temporary leftover goes"),
    ([d("0-0-99.parquet"), d("0-100-199.parquet"), d(".0-100-199.t0.parquet.tmp")], 100,
     [d(".0-100-199.t0.parquet.tmp"), d("0-100-199.parquet")], 99,
     "crash between renames of one flush (one hour renamed, one not): the whole flush goes"),
    ([d("0-0-99.parquet"), d("0-100-199.parquet")], 50, [d("0-100-199.parquet")], 99,
     "offset moved back inside a complete flush: keep it, skip its records, no loss"),
    ([d("0-0-99.parquet")], 0, [d("0-0-99.parquet")], -1,
     "nothing ever committed (or offsets expired; committed = beginning): rewrite all"),
    ([d("1-0-99.parquet"), d(".1-100-120.t0.parquet.tmp")], 0, [], -1,
     "other partitions' files are not ours to touch"),
    ([d("0-0-99.parquet"), d("part-1.parquet")], 100, [], 99, "foreign names are left alone"),
    ([d("0-0-99.parquet"), d("0-150-199.parquet")], 250, [], 199,
     "a gap (bad records only, transaction markers) is fine"),
])
def test_plan_recovery(files, committed, delete, through, why):
    plan = plan_recovery(0, files, committed)
    assert (sorted(plan.delete), plan.archived_through) == (sorted(delete), through), why


@pytest.mark.parametrize("rows,nbytes,records,age_ms,due,why", [
    (0, 0, 0, 10_000, False, "nothing buffered: nothing to flush, however long"),
    (10, 100, 1, 999, False, "young and small"),
    (10, 100, 1, 1000, True, "the interval passed (an idle partition flushes too)"),
    (100, 100, 2, 0, True, "max rows"),
    (1, 5000, 1, 0, True, "max bytes"),
    (0, 100, 3, 1000, True, "only bad records: flushed so they are acked and dead-lettered"),
])
def test_flush_policy(rows, nbytes, records, age_ms, due, why):
    assert FlushPolicy(max_rows=100, max_bytes=5000, interval_ms=1000).due(
        rows, nbytes, records, age_ms) is due, why


@pytest.mark.parametrize("spec,topic,expected", [
    ("event", "clicks", "timestamp"),
    ("record", "clicks", "_timestamp"),
    ("event,sessions=record", "sessions", "_timestamp"),
    ("event,sessions=record", "clicks", "timestamp"),
    ("record, clicks=event", "clicks", "timestamp"),
    ("sessions=end", "sessions", "end"),
    ("", "clicks", "timestamp"),
])
def test_time_rules(spec, topic, expected):
    event_field = {"clicks": "timestamp", "sessions": "start"}[topic]
    assert time_field(parse_time_rules(spec), topic, event_field, "_timestamp") == expected


@pytest.mark.parametrize("spec", ["wallclock", "clicks=", "=event", "event,bogus"])
def test_time_rules_refuse(spec):
    with pytest.raises(ValueError, match="use event, record or <topic>="):
        parse_time_rules(spec)


T = 1_795_528_800_000   # 2026-11-24T14:00Z
HOUR = hour_of(T)


@pytest.mark.parametrize("selection,frange,hour,keeps,why", [
    (Selection("timestamp"), FileRange(0, 0, 9), HOUR, True, "unbounded"),
    (Selection("timestamp", partitions=frozenset({1})), FileRange(0, 0, 9), HOUR, False, "partition"),
    (Selection("timestamp", from_offset=10), FileRange(0, 0, 9), HOUR, False, "ends before from"),
    (Selection("timestamp", from_offset=9), FileRange(0, 0, 9), HOUR, True, "last offset is from"),
    (Selection("timestamp", to_offset=10), FileRange(0, 10, 19), HOUR, False, "to is exclusive"),
    (Selection("timestamp", from_ms=T + H), FileRange(0, 0, 9), HOUR, False, "hour before from"),
    (Selection("timestamp", from_ms=T + H - 1), FileRange(0, 0, 9), HOUR, True, "from in the hour"),
    (Selection("timestamp", to_ms=T), FileRange(0, 0, 9), HOUR, False, "to at the hour: exclusive"),
    (Selection("timestamp", to_ms=T + 1), FileRange(0, 0, 9), HOUR, True, "to just inside"),
    (Selection("timestamp", to_ms=T), FileRange(0, 0, 9), None, True, "no hour folder: read it"),
])
def test_selection_keeps_files(selection, frange, hour, keeps, why):
    assert selection.keeps(frange, hour) is keeps, why


def test_flushes_group_the_hour_files_of_one_flush_in_offset_order():
    at = lambda hour, name: f"/r/topic=c/{hour_dir(hour)}/{name}"  # noqa: E731
    paths = [at(HOUR + 1, "0-10-19.parquet"), at(HOUR, "0-10-19.parquet"), at(HOUR, "1-0-4.parquet"),
             at(HOUR, "0-0-9.parquet"), at(HOUR, ".0-20-29.k1.parquet.tmp"), at(HOUR, "notes.txt"),
             at(HOUR + 2, "0-10-19.parquet")]
    got = flushes(paths, Selection("timestamp", to_ms=T + 2 * H))
    assert got == [(FileRange(0, 0, 9), (at(HOUR, "0-0-9.parquet"),)),
                   (FileRange(0, 10, 19), (at(HOUR, "0-10-19.parquet"), at(HOUR + 1, "0-10-19.parquet"))),
                   (FileRange(1, 0, 4), (at(HOUR, "1-0-4.parquet"),))]


def test_only_committed_flushes_are_read():
    units = [(FileRange(0, 0, 9), ("a", "b")), (FileRange(0, 10, 19), ("c",)),
             (FileRange(1, 0, 4), ("d",)), (FileRange(2, 0, 4), ("e",))]
    kept, left_out = committed_only(units, {0: 10, 1: 0})
    assert kept == [units[0], units[3]], "partition 2 has no committed offset: read it all"
    assert left_out == 2, "0-10-19 is not committed yet, nor is anything of partition 1"
