"""Session windows per visitor, in event time: pure logic, no I/O, no clock.

A session is a run of one visitor's events with no silence of `gap_ms` or more
between neighbours. Windows are half-open: an event exactly `gap_ms` after the
session's last event starts a new session. A partition's watermark is the
largest event time seen on it; a session is closed (emitted) once the
watermark reaches `end + gap_ms`, so visitors who never come back are closed
too, as soon as anyone else's later events arrive on the partition.

`PartitionSessions` holds the open sessions of one Kafka partition and speaks
`step(event) -> Outputs` and `close_for(watermark) -> closed sessions`; the
Faust agent only decodes, calls it, persists the touched sessions and sends.
"""
from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field

from schemas.clicks import ClickEvent, visitor_key
from schemas.sessions import SCHEMA_VERSION, Session

SEARCH_EVENTS = frozenset({"Products Searched", "Search", "search"})
ITEM_EVENTS = frozenset({"Product Viewed", "Product Clicked", "Item Viewed", "Item Clicked"})


def item_of(event: ClickEvent) -> str | None:
    """The catalogue item an event is about, if any (Segment e-commerce spec names)."""
    if event.get("event") not in ITEM_EVENTS:
        return None
    props = event["properties"]
    item = props.get("item_id") or props.get("product_id")
    return str(item) if item is not None else None


@dataclass(slots=True)
class OpenSession:
    """Sufficient statistics of a session still open; everything a summary needs."""

    visitor: str
    user_id: str | None
    anonymous_id: str | None
    start: int
    end: int
    first_message_id: str
    event_count: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    page_views: int = 0
    searches: int = 0
    landing_page: str | None = None
    landing_ts: int = 0
    exit_page: str | None = None
    exit_ts: int = 0
    referrer: str | None = None
    items: list[str] = field(default_factory=list)
    message_ids: set[str] = field(default_factory=set)

    def add(self, event: ClickEvent) -> bool:
        """Fold one event in; False when it is a duplicate (same message_id)."""
        mid = event["message_id"]
        if mid in self.message_ids:
            return False
        self.message_ids.add(mid)
        ts = event["timestamp"]
        if ts < self.start:
            self.start, self.first_message_id = ts, mid
        self.end = max(self.end, ts)
        self.user_id = self.user_id or event.get("user_id")
        self.anonymous_id = self.anonymous_id or event.get("anonymous_id")
        self.event_count += 1
        name = event.get("event") if event["type"] == "track" else event["type"]
        name = name or event["type"]
        self.counts[name] = self.counts.get(name, 0) + 1
        if name in SEARCH_EVENTS:
            self.searches += 1
        page = event["context"].get("page") or {}
        if event["type"] == "page":
            self.page_views += 1
        path = page.get("path") or page.get("url")
        if path:
            # Landing = page of the earliest event, exit = page of the latest,
            # whatever order the events arrived in.
            if self.landing_page is None or ts < self.landing_ts:
                self.landing_page, self.landing_ts = path, ts
                self.referrer = page.get("referrer") or None
            if self.exit_page is None or ts >= self.exit_ts:
                self.exit_page, self.exit_ts = path, ts
        item = item_of(event)
        if item is not None and item not in self.items:
            self.items.append(item)
        return True

    def summary(self) -> Session:
        digest = hashlib.blake2b(f"{self.visitor}|{self.start}|{self.first_message_id}".encode(),
                                 digest_size=12).hexdigest()
        return Session(
            v=SCHEMA_VERSION, session_id=digest, visitor=self.visitor, user_id=self.user_id,
            anonymous_id=self.anonymous_id, start=self.start, end=self.end,
            duration_ms=self.end - self.start, event_count=self.event_count,
            counts=dict(self.counts), page_views=self.page_views, searches=self.searches,
            landing_page=self.landing_page, exit_page=self.exit_page, referrer=self.referrer,
            items=list(self.items))

    def to_state(self) -> dict:
        return {s: (sorted(getattr(self, s)) if s == "message_ids" else getattr(self, s))
                for s in self.__slots__}

    @classmethod
    def from_state(cls, state: dict) -> "OpenSession":
        return cls(**{**state, "message_ids": set(state["message_ids"])})


def open_session(event: ClickEvent) -> OpenSession:
    session = OpenSession(visitor=visitor_key(event), user_id=None, anonymous_id=None,
                          start=event["timestamp"], end=event["timestamp"],
                          first_message_id=event["message_id"])
    session.add(event)
    return session


@dataclass(slots=True)
class Outputs:
    closed: list[Session] = field(default_factory=list)
    late: list[ClickEvent] = field(default_factory=list)     # belongs to a session already closed
    touched: set[str] = field(default_factory=set)           # visitors whose open session changed


@dataclass(slots=True)
class PartitionSessions:
    """The open sessions of one partition, and its event-time watermark."""

    gap_ms: int
    open: dict[str, OpenSession] = field(default_factory=dict)
    watermark: int = -1
    _expiry: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._expiry = [(s.end + self.gap_ms, v) for v, s in self.open.items()]
        heapq.heapify(self._expiry)

    def step(self, event: ClickEvent, out: Outputs) -> None:
        visitor = visitor_key(event)
        ts = event["timestamp"]
        current = self.open.get(visitor)
        if current is not None and ts >= current.end + self.gap_ms:
            out.closed.append(current.summary())
            del self.open[visitor]
            out.touched.add(visitor)
            current = None
        if current is None:
            if ts + self.gap_ms <= self.watermark:
                # Its session would already have been closed: never reopen one.
                out.late.append(event)
                return
            current = self.open[visitor] = open_session(event)
        elif ts <= current.start - self.gap_ms:
            out.late.append(event)
            return
        elif not current.add(event):
            return
        out.touched.add(visitor)
        heapq.heappush(self._expiry, (current.end + self.gap_ms, visitor))
        if ts > self.watermark:
            self.watermark = ts

    def close_for(self, watermark: int, out: Outputs) -> None:
        """Emit every session whose `end + gap` the watermark has reached."""
        while self._expiry and self._expiry[0][0] <= watermark:
            expiry, visitor = heapq.heappop(self._expiry)
            session = self.open.get(visitor)
            # Entries pushed before the session grew are stale: skip them, the
            # current one is further down the heap, so sessions close in expiry order.
            if session is not None and session.end + self.gap_ms == expiry:
                del self.open[visitor]
                out.closed.append(session.summary())
                out.touched.add(visitor)

    def process(self, events: list[ClickEvent]) -> Outputs:
        """Fold a batch of events in, then close what the new watermark allows."""
        out = Outputs()
        for event in events:
            self.step(event, out)
        self.close_for(self.watermark, out)
        return out
