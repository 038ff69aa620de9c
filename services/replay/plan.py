"""Replay plans: which offsets of which partitions, how many records, what gets reset.

Pure: the shell (services/replay/command.py, services/replay/archive.py) asks
Kafka and the archive for offsets, counts and group state and passes them in;
the plan decides and renders. Ranges are half-open, `[start, end)` per
partition, like every window in clickloop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from schemas.times import iso_to_ms


class ReplayError(ValueError):
    """The replay cannot be planned or run; the message says what to change."""


@dataclass(frozen=True, slots=True)
class PartitionRange:
    partition: int
    start: int          # first offset to replay
    end: int            # one past the last
    # From the archive: what the selection holds in [start, end), where offsets
    # may have gaps (records outside a time range, transaction markers). None on
    # the live topic, where every offset of the range is a record.
    count: int | None = None
    events: int | None = None
    files: int | None = None

    @property
    def records(self) -> int:
        return max(0, self.end - self.start) if self.count is None else self.count

    def render(self) -> str:
        text = f"  partition {self.partition}: offsets [{self.start}, {self.end}) = {self.records} records"
        if self.events is not None:
            text += f", {self.events} events in {self.files} file(s)"
        return text


# Where a reset processor's consumer group resumes an input topic.
START_OF_RANGE = "range"        # the replayed topic: the first offset of the planned range
AT_TIME = "time"                # another input: its first record at or after --from
BEGINNING = "beginning"         # an output of a processor being reset: truncated, read it all


@dataclass(frozen=True, slots=True)
class GroupStart:
    processor: str
    group: str
    topic: str
    rule: str
    offsets: tuple[tuple[int, int], ...] = ()   # (partition, offset); BEGINNING: resolved after truncation

    def render(self) -> str:
        where = {START_OF_RANGE: "the start of the replayed range", AT_TIME: "--from",
                 BEGINNING: "its beginning"}[self.rule]
        at = f" (offsets {', '.join(f'{p}: {o}' for p, o in self.offsets)})" if self.offsets else ""
        return f"consumer group {self.group}: {self.topic} from {where}{at}"


@dataclass(frozen=True, slots=True)
class Plan:
    topic: str
    source: str                         # "live" | "archive"
    target: str                         # "topic:<name>" | "processor:<name>"
    ranges: tuple[PartitionRange, ...]
    resets: tuple[str, ...] = field(default=())
    starts: tuple[GroupStart, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())

    @property
    def records(self) -> int:
        return sum(r.records for r in self.ranges)

    @property
    def events(self) -> int | None:
        counts = [r.events for r in self.ranges if r.events is not None]
        return sum(counts) if counts else None

    def render(self, execute: bool) -> str:
        lines = [f"replay {self.topic} from {self.source} into {self.target}"
                 f" ({'EXECUTE' if execute else 'dry run: nothing is changed; add --execute'})"]
        lines += [f"  {note}" for note in self.notes]
        lines += [r.render() for r in self.ranges]
        events = "" if self.events is None else f", {self.events} events"
        lines.append(f"  total {self.records} records{events}")
        if self.resets or self.starts:
            lines.append("  will reset:")
            lines += [f"    - {item}" for item in (*(s.render() for s in self.starts), *self.resets)]
        return "\n".join(lines)


def parse_time(text: str) -> int:
    """ISO-8601 (naive = UTC) to epoch ms; a clear error otherwise."""
    try:
        return iso_to_ms(text)
    except ValueError:
        raise ReplayError(f"{text!r} is not an ISO-8601 time (e.g. 2026-11-25T10:00:00Z)") from None


def ranges(beginnings: dict[int, int], ends: dict[int, int],
           from_offsets: dict[int, int | None], to_offsets: dict[int, int | None],
           partitions: set[int] | None = None) -> tuple[PartitionRange, ...]:
    """Clamp the requested [from, to) of each partition to what the topic retains.

    `from_offsets`/`to_offsets` hold, per partition, the offset a time or an
    explicit offset resolved to (None: not bounded on that side).
    """
    out = []
    for p in sorted(ends):
        if partitions is not None and p not in partitions:
            continue
        start = max(beginnings[p], from_offsets.get(p) or 0)
        to = to_offsets.get(p)
        end = ends[p] if to is None else min(ends[p], to)
        out.append(PartitionRange(p, start, max(start, end)))
    if partitions is not None and not out:
        raise ReplayError(f"no such partitions: {sorted(partitions)}")
    return tuple(out)


def refuse_if_active(group: str, members: int, processor: str) -> None:
    if members:
        raise ReplayError(
            f"consumer group {group} has {members} active member(s): stop every "
            f"`clickloop worker {processor}` process first (Ctrl-C, or scale it to 0), "
            f"then run the replay again")


def check_processor_range(to_time: str | None, to_offset: int | None,
                          partitions: set[int] | None) -> None:
    """A processor rebuild starts anywhere, but ends nowhere and covers every partition."""
    if to_time is not None or to_offset is not None:
        raise ReplayError(
            "a processor rebuild cannot stop at --to/--to-offset: once reset, the processor "
            "goes on with its live input to the end (and then on). Drop --to/--to-offset, or "
            "re-process a bounded range in a backfill topic: --target topic:<backfill topic>")
    if partitions is not None:
        raise ReplayError(
            "a processor rebuild covers every partition (its state and outputs are reset on all "
            "of them): drop --partitions, or copy those partitions to --target topic:<name>")


def start_rule(topic: str, replayed: str, truncated: set[str], from_time: str | None,
               from_offset: int | None, processor: str) -> str:
    """Where a reset processor resumes `topic` so that it equals a fresh run from the start
    of the range: the replayed topic at the range's start, a truncated output from its
    (new) beginning, any other input at the same time."""
    if topic == replayed:
        return START_OF_RANGE
    if topic in truncated or (from_time is None and from_offset is None):
        return BEGINNING
    if from_time is None:
        raise ReplayError(
            f"{processor} also reads {topic}, where offsets of {replayed} mean nothing: give the "
            f"start as a time (--from <ISO>), which applies to every input")
    return AT_TIME


def refuse_archive_processor(topic: str, processor: str, range_args: str, prefix: str) -> None:
    """Why a processor is not rebuilt from the archive, and what to run instead."""
    side = f"{prefix}rebuild."
    raise ReplayError(
        f"--source archive cannot rebuild processor:{processor} in place: a processor reads "
        f"only its live input topic, and archived records written back into {topic} would come "
        f"after the records it still holds (out of event-time order: late for the sessionizer) "
        f"and count those twice.\n"
        f"  While {topic} still retains the range, rebuild from it:\n"
        f"    clickloop replay --topic {topic}{range_args} --target processor:{processor}\n"
        f"  Otherwise rebuild a side deployment from the archive, then compare or switch:\n"
        f"    clickloop replay --topic {topic} --source archive{range_args} "
        f"--target topic:rebuild.{topic} --execute\n"
        f"    CLICKLOOP_PREFIX={side} clickloop worker {processor}   (and every worker downstream)")
