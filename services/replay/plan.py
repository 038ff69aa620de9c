"""Replay plans: which offsets of which partitions, how many records, what gets reset.

Pure: the shell (services/replay/command.py) asks Kafka for offsets and group
state and passes them in; the plan decides and renders. Ranges are half-open,
`[start, end)` per partition, like every window in clickloop.
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

    @property
    def records(self) -> int:
        return max(0, self.end - self.start)


@dataclass(frozen=True, slots=True)
class Plan:
    topic: str
    source: str                         # "live" | "archive"
    target: str                         # "topic:<name>" | "processor:<name>"
    ranges: tuple[PartitionRange, ...]
    resets: tuple[str, ...] = field(default=())

    @property
    def records(self) -> int:
        return sum(r.records for r in self.ranges)

    def render(self, execute: bool) -> str:
        lines = [f"replay {self.topic} from {self.source} into {self.target}"
                 f" ({'EXECUTE' if execute else 'dry run: nothing is changed; add --execute'})"]
        lines += [f"  partition {r.partition}: offsets [{r.start}, {r.end}) = {r.records} records"
                  for r in self.ranges]
        lines.append(f"  total {self.records} records")
        if self.resets:
            lines.append("  will reset:")
            lines += [f"    - {reset}" for reset in self.resets]
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
