"""Session windows per visitor, in event time: pure logic, no I/O, no clock.

A session is a run of one visitor's events with no silence of `gap_ms` or more
between neighbours. Windows are half-open: an event exactly `gap_ms` after a
session's last event (or before its first) does not belong to it.

Time moves with a per-partition watermark, the largest event time seen on the
partition. A session stays open, able to take late events, until the
watermark reaches `end + gap + grace`; then it is closed and emitted exactly
once, also when its visitor never comes back. The pass that closes sessions
runs after each record, but a session is closed from the moment the watermark
reaches that point: an event of its visitor closes it first and never joins
it, so sessions do not depend on how events were packed into records (a
replay may pack them differently). An event that fits no open
session and whose own session would already be closed (`ts + gap + grace <=
watermark`) is late: it is handed back in `Outputs.late`, never dropped and
never allowed to reopen history.

Rules, in the order they apply to an event:
- a `message_id` already in one of the visitor's open sessions is a duplicate
  (each session remembers its latest 1,000 to 2,000 ids: `KEPT_IDS` in
  native/src/partition.rs; a session lists at most 1,000 items and counts 100
  event names, the rest under `(other)`);
- the event joins every open session it is within `gap` of; if it fits two,
  it bridges them and they merge (unless the merged session would span
  `max_ms` or more, then it joins the one before it if that stays under
  `max_ms`, else starts its own);
- an event that would stretch a session to `max_ms` or more starts a new one;
- identity change: the visitor key is the user_id once known, else the
  anonymous id, so when an anonymous visitor logs in the logged-in events
  form a new session under the user's key (the anonymous one closes by gap);
- otherwise the event starts a new session (or is late, as above).

Sessions of a visitor close in start order; each gets the visitor's running
`session_index` (1, 2, ...) and the id of the previous one (Snowplow-style).
The session id is a hash of visitor, start and the first event's message id,
so a replay of the same events yields the same ids.

Retention bounds the state: a visitor with no open session whose last session
ended `retention_ms` or more before the watermark (`watermark - end >=
retention`) is forgotten, in the same watermark pass that closes sessions, so
a replay forgets at the same point; an event of a visitor already due at the
watermark before it finds it forgotten even when no pass ran in between (the
same record moved the watermark), so how events were packed into records does
not change who is forgotten. Its state leaves the partition and
`take_dirty` yields it as (visitor, None), a tombstone in the changelog. A
forgotten visitor who comes back starts again at `session_index` 1 with no
previous session id, like an expired analytics cookie (Snowplow's
domain_sessionidx, GA's client id). `retention_ms` 0 never forgets. A state
restored from a changelog written before retention existed has no last end:
the watermark at `load` stands for it (and is written back at the next
checkpoint), so an upgrade starts every known visitor's clock then instead of
forgetting them all at once.

The rules run in a compiled core, `streams._native` (Rust, native/src/),
that parses a `clicks` record and folds its events in one pass without
building a Python object per event: that is what lets the sessionizer keep up
with a raw Kafka consumer (README, "Performance"). This module is its Python
face and the place its rules are specified and tested (tests/unit/test_sessions.py).
Fields of an unexpected JSON type read as absent (a numeric `referrer` is
ignored), except the ones an event cannot do without (`timestamp` an integer,
`message_id`, `type`, and a visitor as strings): such an event is bad, with
the reason, and goes to the DLQ on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from schemas.clicks import ClickEvent
from schemas.sessions import Session
from streams import _native
from streams.codec import BadRecord

SEARCH_EVENTS = frozenset({"Products Searched", "Search", "search"})
ITEM_EVENTS = frozenset({"Product Viewed", "Product Clicked", "Item Viewed", "Item Clicked"})


@dataclass(frozen=True, slots=True)
class SessionConfig:
    gap_ms: int = 30 * 60_000
    grace_ms: int = 10 * 60_000
    max_ms: int = 24 * 3_600_000
    retention_ms: int = 30 * 24 * 3_600_000     # 0: never forget a visitor


def event_name(event: ClickEvent) -> str | None:
    """A track event's name (a non-empty string), else None: what the rules compare with
    SEARCH_EVENTS, ITEM_EVENTS and CLICK_EVENTS. Any other value (a list, an object, a
    number) names nothing, as in the compiled core, never an error."""
    name = event.get("event")
    return name if event.get("type") == "track" and name.__class__ is str and name else None


def item_of(event: ClickEvent) -> str | None:
    """The catalogue item an event is about, if any (Segment e-commerce spec names): a
    track event in ITEM_EVENTS with a scalar `item_id` (else `product_id`), as text."""
    if event_name(event) not in ITEM_EVENTS:
        return None
    props = event.get("properties")
    if props.__class__ is not dict:
        return None
    item = props.get("item_id")
    if not isinstance(item, (dict, list)):   # a container, even empty, is chosen and names nothing
        item = item or props.get("product_id")
    if item is None or isinstance(item, (dict, list)) \
            or (item.__class__ is int and not -2 ** 63 <= item < 2 ** 63):   # not a 64-bit integer
        return None
    return str(item)


def utm_of(context: dict) -> dict[str, str]:
    """UTM parameters: Segment's context.campaign, else the page URL's query."""
    return dict(_native.utm_of(orjson.dumps(context)))


def session_id(visitor: str, start: int, first_message_id: str) -> str:
    return _native.session_id(visitor, start, first_message_id)


@dataclass(slots=True)
class Outputs:
    """What one record produced, as the core returns it: JSON bytes, decoded on demand."""

    events: int = 0
    # (visitor as the record key, Session JSON, murmur2 of the key for the partitioner)
    closed_json: list[tuple[bytes, bytes, int]] = field(default_factory=list)
    late_json: list[tuple[bytes, str]] = field(default_factory=list)     # event, reason
    bad_json: list[tuple[bytes, str]] = field(default_factory=list)      # event, reason (DLQ)
    duplicates: int = 0

    @property
    def closed(self) -> list[Session]:
        return [orjson.loads(s) for _, s, _ in self.closed_json]

    @property
    def late(self) -> list[tuple[ClickEvent, str]]:
        return [(orjson.loads(e), reason) for e, reason in self.late_json]

    @property
    def bad(self) -> list[tuple[ClickEvent, str]]:
        return [(orjson.loads(e), reason) for e, reason in self.bad_json]


class PartitionSessions:
    """Open sessions of one partition, its watermark and the next input offset to apply."""

    __slots__ = ("config", "_core")

    def __init__(self, config: SessionConfig, watermark: int = -1, next_offset: int = 0) -> None:
        self.config = config
        self._core = _native.Partition(config.gap_ms, config.grace_ms, config.max_ms,
                                         sorted(SEARCH_EVENTS), sorted(ITEM_EVENTS),
                                         watermark, next_offset, config.retention_ms)

    @property
    def watermark(self) -> int:
        return self._core.watermark

    @property
    def next_offset(self) -> int:
        return self._core.next_offset

    @next_offset.setter
    def next_offset(self, offset: int) -> None:
        self._core.next_offset = offset

    def process_record(self, value: bytes | None, next_offset: int | None = None,
                       not_after: int | None = None) -> Outputs:
        """Fold a `clicks` record (a ClickBatch) in, then close what the new watermark allows.
        An event stamped after `not_after` (`codec.not_after` of the record) is bad.

        BadRecord, with the reason, when the record is not a ClickBatch; nothing
        is applied then.
        """
        if value is None:
            raise BadRecord("not JSON: the record has no value")
        try:
            return Outputs(*self._core.process(value, next_offset, not_after))
        except ValueError as exc:
            raise BadRecord(str(exc)) from None

    def process(self, events: list[ClickEvent], next_offset: int | None = None,
                not_after: int | None = None) -> Outputs:
        """Fold events in (as one record), then close what the new watermark allows."""
        return self.process_record(orjson.dumps({"v": 1, "events": events}), next_offset, not_after)

    def load(self, visitor: str, state: bytes) -> None:
        """Put back a visitor's state as `take_dirty` returned it (a changelog entry)."""
        self._core.load(visitor, state)

    def take_dirty(self) -> list[tuple[bytes, bytes | None]]:
        """(visitor, state JSON or None) of every visitor changed since the last call."""
        return self._core.take_dirty()

    @property
    def visitors(self) -> list[str]:
        return self._core.visitors()

    @property
    def visitor_count(self) -> int:
        """Visitors whose state the partition holds (open sessions or within retention)."""
        return len(self._core)

    def meta(self) -> dict:
        return {"watermark": self.watermark, "next_offset": self.next_offset}
