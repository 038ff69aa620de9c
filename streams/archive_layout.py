"""Where archived records go and how a restart resumes: pure functions, no I/O.

Layout (hive partitioning, readable as-is by DuckDB, pandas and Spark):

    <root>/topic=<topic>/date=YYYY-MM-DD/hour=HH/<partition>-<first>-<last>.parquet

One *flush* of a partition archives a contiguous range of its Kafka offsets
[first, last]; its rows are split by the hour of their event time (UTC) into one
file per hour, and every file of that flush carries the flush's range in its
name. Ranges of different flushes never overlap, so a name says which offsets a
file may hold, and a reader (or a replay) never sees a record twice.

A file is written under a temporary name (`.<p>-<first>-<last>.<token>.parquet.tmp`: a leading dot and no
`.parquet` suffix, so Spark, Hadoop and `*.parquet` globs skip it), made
durable, renamed, and only then are the flush's offsets acked to Faust. After a
crash, `plan_recovery` decides from the files on disk and the group's committed
offset what to delete and which offsets are already archived.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

HOUR_MS = 3_600_000
SUFFIX = ".parquet"
TEMP_SUFFIX = ".parquet.tmp"
_NAME = re.compile(r"^(\.?)(\d+)-(\d+)-(\d+)((?:\.[0-9a-z]+)?)(\.parquet|\.parquet\.tmp)$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def hour_of(ms: int) -> int:
    """Hours since the epoch (UTC) of an epoch-ms time; floor, also before 1970."""
    return ms // HOUR_MS


def hour_dir(hour: int) -> str:
    """`date=YYYY-MM-DD/hour=HH` of an hour since the epoch."""
    t = _EPOCH + dt.timedelta(hours=hour)
    return f"date={t:%Y-%m-%d}/hour={t:%H}"


def topic_dir(topic: str) -> str:
    return f"topic={topic}"


@dataclass(frozen=True, order=True)
class FileRange:
    """The offsets [first, last] of one partition that one flush archived."""

    partition: int
    first: int
    last: int

    @property
    def name(self) -> str:
        return f"{self.partition}-{self.first}-{self.last}{SUFFIX}"

    def temp_name(self, token: str) -> str:
        """A temporary name unique to one writer (`token`): a writer that outlived its
        process (a zombie) never writes into a file its successor is writing."""
        return f".{self.partition}-{self.first}-{self.last}.{token}{TEMP_SUFFIX}"


@dataclass(frozen=True)
class ArchivedFile:
    path: str
    range: FileRange
    temp: bool


def parse(path: str) -> ArchivedFile | None:
    """The archive file at `path`, or None when the name is not one of ours."""
    base = path.rsplit("/", 1)[-1]
    m = _NAME.match(base)
    if m is None:
        return None
    dot, partition, first, last, token, suffix = m.groups()
    temp = suffix == TEMP_SUFFIX
    if temp != (dot == ".") or temp != bool(token):
        return None
    return ArchivedFile(path, FileRange(int(partition), int(first), int(last)), temp)


@dataclass(frozen=True)
class Recovery:
    delete: tuple[str, ...]     # temp leftovers and files of flushes never committed
    archived_through: int       # records at or below this offset are archived: skip them (-1: none)


def plan_recovery(partition: int, paths: list[str], committed: int) -> Recovery:
    """What to do with one partition's files when its first record arrives after a (re)start.

    `committed` is the group's committed offset for the partition (the next offset
    it will read; the partition's beginning offset when nothing was committed).
    Offsets are acked only after every file of a flush is renamed, and Faust
    commits only acked offsets, so:

    - a flush whose first offset is >= committed was never committed: its files
      (possibly only some of them, renamed before a crash) are deleted, and its
      records, which Kafka redelivers, are written again;
    - a flush whose first offset is below committed is complete and stays;
      records up to its last offset are skipped if redelivered (Faust may have
      committed late, or the group's offset was moved back by hand);
    - temporary files are leftovers of an unfinished flush: deleted.

    Files of other partitions and names that are not ours are left alone.
    """
    delete: list[str] = []
    through = -1
    for path in paths:
        f = parse(path)
        if f is None or f.range.partition != partition:
            continue
        if f.temp or f.range.first >= committed:
            delete.append(path)
        else:
            through = max(through, f.range.last)
    return Recovery(tuple(sorted(delete)), through)


@dataclass(frozen=True)
class FlushPolicy:
    """When a partition's buffer becomes files: enough rows or bytes, or old enough.

    The age is that of the oldest buffered record, so an idle partition still
    flushes once the interval has passed since it last received something new.
    """

    max_rows: int
    max_bytes: int
    interval_ms: int

    def full(self, rows: int, nbytes: int) -> bool:
        return rows >= self.max_rows or nbytes >= self.max_bytes

    def due(self, rows: int, nbytes: int, records: int, age_ms: float) -> bool:
        return records > 0 and (self.full(rows, nbytes) or age_ms >= self.interval_ms)


RECORD_TIME = "record"
EVENT_TIME = "event"


def parse_time_rules(spec: str) -> dict[str, str]:
    """`CLICKLOOP_ARCHIVE_TIME`: which time the hour partition follows.

    A comma-separated list of `event` or `record` (for every topic) and
    `<topic>=event|record|<field>` (for one topic; a field must be an epoch-ms
    column of that topic). Returns {topic or "*": rule}; raises ValueError.
    """
    rules: dict[str, str] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        topic, sep, rule = item.partition("=")
        if not sep:
            topic, rule = "*", topic
        topic, rule = topic.strip(), rule.strip()
        if not topic or not rule or (topic == "*" and rule not in (EVENT_TIME, RECORD_TIME)):
            raise ValueError(f"{item!r}: use event, record or <topic>=event|record|<field>")
        rules[topic] = rule
    return rules


def time_field(rules: dict[str, str], topic: str, event_field: str, record_field: str) -> str:
    """The column whose hour places a row of `topic`, given the parsed rules."""
    rule = rules.get(topic, rules.get("*", EVENT_TIME))
    if rule == EVENT_TIME:
        return event_field
    if rule == RECORD_TIME:
        return record_field
    return rule


_HOUR_DIR = re.compile(r"/date=(\d{4})-(\d{2})-(\d{2})/hour=(\d{2})/[^/]*$")


def hour_of_path(path: str) -> int | None:
    """The hour (since the epoch) of the `date=/hour=` folder holding `path`, or None."""
    m = _HOUR_DIR.search(path)
    if m is None:
        return None
    y, mo, d, h = map(int, m.groups())
    return hour_of(int((dt.datetime(y, mo, d, h, tzinfo=dt.timezone.utc) - _EPOCH).total_seconds()
                       * 1000))


@dataclass(frozen=True)
class Selection:
    """What a replay takes from the archive: rows of `partitions` whose Kafka offset
    is in [from_offset, to_offset) and whose time (`time_field`, the column the
    hour folders follow; record time where it is null) is in [from_ms, to_ms).
    None: unbounded on that side."""

    time_field: str
    from_ms: int | None = None
    to_ms: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    partitions: frozenset[int] | None = None

    def keeps(self, frange: FileRange, hour: int | None) -> bool:
        """Whether a file may hold selected rows: its name's offsets, its folder's hour."""
        if self.partitions is not None and frange.partition not in self.partitions:
            return False
        if self.from_offset is not None and frange.last < self.from_offset:
            return False
        if self.to_offset is not None and frange.first >= self.to_offset:
            return False
        if hour is None:
            return True
        if self.from_ms is not None and hour < hour_of(self.from_ms):
            return False
        return self.to_ms is None or hour <= hour_of(self.to_ms - 1)


def flushes(paths: list[str], selection: Selection) -> list[tuple[FileRange, tuple[str, ...]]]:
    """The published files that may hold selected rows, by flush, in (partition, offset) order.

    A flush's records are split over one file per hour, and one record's events
    may sit in several of them: a flush is the unit a record is rebuilt from.
    Temporary files and names that are not ours are left out."""
    by_range: dict[FileRange, list[str]] = {}
    for path in paths:
        f = parse(path)
        if f is not None and not f.temp and selection.keeps(f.range, hour_of_path(path)):
            by_range.setdefault(f.range, []).append(path)
    return [(r, tuple(sorted(by_range[r]))) for r in sorted(by_range)]


def committed_only(units: list[tuple[FileRange, tuple[str, ...]]], committed: dict[int, int]
                   ) -> tuple[list[tuple[FileRange, tuple[str, ...]]], int]:
    """The flushes the archive worker has committed, and how many files were left out.

    A flush is committed (its offsets acked) only once every file of it is renamed
    into place; before that a reader may see some of its hour files and not the
    others, and a crash has the worker's recovery delete them. So a flush whose
    first offset is at or past the group's committed offset is not read. A
    partition without a committed offset (`committed` lacks it: the worker never
    committed, or its group's offsets expired) has nothing to compare with: all
    of its files are read."""
    kept, left_out = [], 0
    for frange, paths in units:
        if frange.first < committed.get(frange.partition, frange.first + 1):
            kept.append((frange, paths))
        else:
            left_out += len(paths)
    return kept, left_out
