"""Micro-batching: events of many requests packed into one `clicks` record per partition.

Pure logic, no I/O and no clock: the shell (services.collector.sink) passes
the time in and sends the records this module hands back. Kafka and Faust
cost about the same per record whether it holds 1 event or 500 (DESIGN.md,
"Performance design"), so under load the collector keeps one open record per
partition and closes it when the first of three limits is reached:

- `linger_ms` after its first event (a quiet collector adds at most this much
  latency; a busy one fills records long before),
- `max_events` events,
- `max_bytes` bytes of value (kept below the broker's message size limit).

Events are serialized once, by the caller, and the record value is built by
joining those bytes, so nothing is encoded twice. A record's events keep the
order in which they were added, and records of one partition are closed in
order, so the events of a visitor (always on one partition) stay in the order
the collector received them.

    >>> p = Packer(linger_ms=5, max_events=2, max_bytes=1000)
    >>> p.add(0, "u1", b'{"a":1}', now_ms=100)
    (1, [])
    >>> rid, full = p.add(0, "u1", b'{"a":2}', now_ms=101)
    >>> rid, [(r.partition, r.key, r.value) for r in full]
    (1, [(0, 'u1', b'{"v":1,"events":[{"a":1},{"a":2}]}')])
"""
from __future__ import annotations

from dataclasses import dataclass, field

from schemas.clicks import SCHEMA_VERSION

_HEAD = b'{"v":%d,"events":[' % SCHEMA_VERSION
_TAIL = b"]}"
OVERHEAD = len(_HEAD) + len(_TAIL)
_MIXED = object()  # an open record holding events of more than one visitor


@dataclass(slots=True)
class Record:
    """A closed record, ready to send with its explicit partition."""
    id: int
    partition: int
    key: str | None          # the visitor when all events share it, else None
    value: bytes             # a ClickBatch, JSON
    events: int
    opened_ms: int


@dataclass(slots=True)
class _Open:
    id: int
    opened_ms: int
    visitor: object
    events: list[bytes] = field(default_factory=list)
    size: int = OVERHEAD     # value bytes if closed now (commas included)


class Packer:
    """Open records per partition; `add` events, collect closed `Record`s."""

    def __init__(self, linger_ms: int, max_events: int, max_bytes: int) -> None:
        if max_events < 1 or max_bytes <= OVERHEAD:
            raise ValueError("a record must hold at least one event")
        self.linger_ms, self.max_events, self.max_bytes = linger_ms, max_events, max_bytes
        self._open: dict[int, _Open] = {}
        self._next_id = 1

    def add(self, partition: int, visitor: str, event: bytes, now_ms: int) -> tuple[int, list[Record]]:
        """Add one serialized event; returns the id of the record that holds it
        and the records this closed (at most two: the one that had no room
        left, and this one if it is now full). An event larger than
        `max_bytes` still gets a record of its own; the caller caps event size."""
        closed: list[Record] = []
        rec = self._open.get(partition)
        if rec is not None and rec.size + len(event) + 1 > self.max_bytes:
            closed.append(self._close(partition))
            rec = None
        if rec is None:
            rec = self._open[partition] = _Open(self._next_id, now_ms, visitor)
            self._next_id += 1
            rec.size -= 1  # the first event has no comma before it
        elif rec.visitor != visitor:
            rec.visitor = _MIXED
        rec.events.append(event)
        rec.size += len(event) + 1
        if len(rec.events) >= self.max_events or rec.size >= self.max_bytes:
            closed.append(self._close(partition))
        return rec.id, closed

    def due(self, now_ms: int) -> list[Record]:
        """Close the records whose linger time has passed."""
        late = [p for p, rec in self._open.items() if now_ms - rec.opened_ms >= self.linger_ms]
        return [self._close(p) for p in late]

    def next_due_ms(self) -> int | None:
        """When the oldest open record must be closed, or None when none is open."""
        if not self._open:
            return None
        return min(rec.opened_ms for rec in self._open.values()) + self.linger_ms

    def drain(self) -> list[Record]:
        """Close every open record (shutting down)."""
        return [self._close(p) for p in list(self._open)]

    @property
    def pending_events(self) -> int:
        return sum(len(rec.events) for rec in self._open.values())

    def _close(self, partition: int) -> Record:
        rec = self._open.pop(partition)
        key = None if rec.visitor is _MIXED else rec.visitor
        return Record(rec.id, partition, key, _HEAD + b",".join(rec.events) + _TAIL,  # type: ignore[arg-type]
                      len(rec.events), rec.opened_ms)
