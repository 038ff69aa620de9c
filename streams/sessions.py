"""Session windows per visitor, in event time: pure logic, no I/O, no clock.

A session is a run of one visitor's events with no silence of `gap_ms` or more
between neighbours. Windows are half-open: an event exactly `gap_ms` after a
session's last event (or before its first) does not belong to it.

Time moves with a per-partition watermark, the largest event time seen on the
partition. A session stays open, able to take late events, until the
watermark reaches `end + gap + grace`; then it is closed and emitted exactly
once, also when its visitor never comes back. An event that fits no open
session and whose own session would already be closed (`ts + gap + grace <=
watermark`) is late: it is handed back in `Outputs.late`, never dropped and
never allowed to reopen history.

Rules, in the order they apply to an event:
- a `message_id` already in one of the visitor's open sessions is a duplicate;
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
"""
from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from schemas.clicks import ClickEvent, visitor_key
from schemas.sessions import SCHEMA_VERSION, Session
from streams.codec import event_problem

SEARCH_EVENTS = frozenset({"Products Searched", "Search", "search"})
ITEM_EVENTS = frozenset({"Product Viewed", "Product Clicked", "Item Viewed", "Item Clicked"})
UTM_KEYS = ("source", "medium", "campaign", "term", "content")


@dataclass(frozen=True, slots=True)
class SessionConfig:
    gap_ms: int = 30 * 60_000
    grace_ms: int = 10 * 60_000
    max_ms: int = 24 * 3_600_000


def item_of(event: ClickEvent) -> str | None:
    """The catalogue item an event is about, if any (Segment e-commerce spec names)."""
    if event.get("event") not in ITEM_EVENTS:
        return None
    props = event["properties"]
    item = props.get("item_id") or props.get("product_id")
    return str(item) if item is not None else None


def utm_of(context: dict) -> dict[str, str]:
    """UTM parameters: Segment's context.campaign, else the page URL's query."""
    campaign = context.get("campaign")
    if isinstance(campaign, dict) and campaign:
        utm = {"source": campaign.get("source"), "medium": campaign.get("medium"),
               "campaign": campaign.get("name") or campaign.get("campaign"),
               "term": campaign.get("term"), "content": campaign.get("content")}
        return {k: str(v) for k, v in utm.items() if v}
    page = context.get("page") or {}
    query = page.get("search") or urlsplit(page.get("url") or page.get("path") or "").query
    if "utm_" not in query:
        return {}
    pairs = dict(parse_qsl(query.lstrip("?")))
    return {k: pairs[f"utm_{k}"] for k in UTM_KEYS if pairs.get(f"utm_{k}")}


@dataclass(slots=True)
class OpenSession:
    """Mergeable sufficient statistics of a session that is still open."""

    start: int
    end: int
    first_message_id: str
    user_id: str | None = None
    anonymous_id: str | None = None
    event_count: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    page_views: int = 0
    searches: int = 0
    landing_page: str | None = None
    landing_ts: int = 0
    referrer: str | None = None
    utm: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    device_ts: int = 0
    exit_page: str | None = None
    exit_ts: int = 0
    items: dict[str, int] = field(default_factory=dict)     # item -> first time seen
    # Message ids of the session's events, for dedupe: membership is tested in
    # the partition's `seen` set (one large set is cheaper than many small ones).
    message_ids: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, event: ClickEvent) -> "OpenSession":
        ts = event["timestamp"]
        session = cls(start=ts, end=ts, first_message_id=event["message_id"])
        session.add(event)
        return session

    def add(self, event: ClickEvent) -> None:
        # The hot path of the sessionizer: written for CPython speed (locals,
        # no helper calls for the common case of an event arriving in order).
        mid, ts = event["message_id"], event["timestamp"]
        self.message_ids.append(mid)
        if ts <= self.start:
            if ts < self.start:
                self.start, self.first_message_id = ts, mid
            elif mid < self.first_message_id:
                self.first_message_id = mid
        if ts > self.end:
            self.end = ts
        if self.user_id is None:
            self.user_id = event.get("user_id")
        if self.anonymous_id is None:
            self.anonymous_id = event.get("anonymous_id")
        self.event_count += 1
        kind = event["type"]
        counts = self.counts
        if kind == "track":
            name = event.get("event") or kind
            if name in SEARCH_EVENTS:
                self.searches += 1
            elif name in ITEM_EVENTS:
                props = event.get("properties") or {}
                item = props.get("item_id") or props.get("product_id")
                if item is not None:
                    item = str(item)
                    seen = self.items.get(item)
                    if seen is None or ts < seen:
                        self.items[item] = ts
        else:
            name = kind
            if kind == "page":
                self.page_views += 1
        counts[name] = counts.get(name, 0) + 1
        context = event.get("context")
        if not context:
            return
        ua = context.get("ua")
        if ua and (self.device is None or ts < self.device_ts):
            self.device, self.device_ts = ua.get("device"), ts
        page = context.get("page")
        if page:
            path = page.get("path") or page.get("url")
            if path:
                if "?" in path:
                    path = path.split("?", 1)[0]
                # Landing = page of the earliest event, exit = page of the latest,
                # whatever order the events arrived in.
                if self.landing_page is None or ts < self.landing_ts:
                    self.landing_page, self.landing_ts = path, ts
                    self.referrer = page.get("referrer") or None
                    self.utm = utm_of(context)
                if self.exit_page is None or ts >= self.exit_ts:
                    self.exit_page, self.exit_ts = path, ts

    def merge(self, other: "OpenSession") -> "OpenSession":
        """The session holding both: what a bridging late event joins."""
        first, last = (self, other) if self.start <= other.start else (other, self)
        merged = OpenSession(
            start=first.start, end=max(self.end, other.end),
            first_message_id=first.first_message_id if first.start < last.start else
            min(first.first_message_id, last.first_message_id),
            user_id=first.user_id or last.user_id,
            anonymous_id=first.anonymous_id or last.anonymous_id,
            event_count=self.event_count + other.event_count,
            counts={k: self.counts.get(k, 0) + other.counts.get(k, 0)
                    for k in self.counts.keys() | other.counts.keys()},
            page_views=self.page_views + other.page_views,
            searches=self.searches + other.searches,
            message_ids=self.message_ids + other.message_ids,
            items={k: min(t for t in (self.items.get(k), other.items.get(k)) if t is not None)
                   for k in self.items.keys() | other.items.keys()},
        )
        for src in (first, last):  # earliest landing/device win, latest exit wins
            if src.landing_page is not None and (merged.landing_page is None
                                                 or src.landing_ts < merged.landing_ts):
                merged.landing_page, merged.landing_ts = src.landing_page, src.landing_ts
                merged.referrer, merged.utm = src.referrer, src.utm
            if src.device is not None and (merged.device is None or src.device_ts < merged.device_ts):
                merged.device, merged.device_ts = src.device, src.device_ts
            if src.exit_page is not None and (merged.exit_page is None or src.exit_ts >= merged.exit_ts):
                merged.exit_page, merged.exit_ts = src.exit_page, src.exit_ts
        return merged

    def summary(self, visitor: str, index: int, previous: str | None) -> Session:
        return Session(
            v=SCHEMA_VERSION, session_id=session_id(visitor, self.start, self.first_message_id),
            visitor=visitor, user_id=self.user_id, anonymous_id=self.anonymous_id,
            start=self.start, end=self.end, duration_ms=self.end - self.start,
            event_count=self.event_count, counts=dict(self.counts), page_views=self.page_views,
            searches=self.searches, landing_page=self.landing_page, exit_page=self.exit_page,
            referrer=self.referrer, utm=dict(self.utm), device=self.device or "other",
            items=sorted(self.items, key=lambda k: (self.items[k], k)),
            session_index=index, previous_session_id=previous)

    def to_state(self) -> dict:
        return {s: getattr(self, s) for s in self.__slots__}

    @classmethod
    def from_state(cls, state: dict) -> "OpenSession":
        return cls(**state)


def session_id(visitor: str, start: int, first_message_id: str) -> str:
    return hashlib.blake2b(f"{visitor}|{start}|{first_message_id}".encode(),
                           digest_size=12).hexdigest()


@dataclass(slots=True)
class VisitorState:
    """A visitor's open sessions (disjoint, by start) and what closed before them."""

    open: list[OpenSession] = field(default_factory=list)
    closed_count: int = 0
    last_session_id: str | None = None

    def to_state(self) -> dict:
        return {"open": [s.to_state() for s in self.open], "closed_count": self.closed_count,
                "last_session_id": self.last_session_id}

    @classmethod
    def from_state(cls, state: dict) -> "VisitorState":
        return cls([OpenSession.from_state(s) for s in state["open"]],
                   state["closed_count"], state["last_session_id"])


@dataclass(slots=True)
class Outputs:
    closed: list[Session] = field(default_factory=list)
    late: list[tuple[ClickEvent, str]] = field(default_factory=list)   # event, reason
    bad: list[tuple[ClickEvent, str]] = field(default_factory=list)    # event, reason (DLQ)
    duplicates: int = 0
    touched: set[str] = field(default_factory=set)      # visitors whose state changed


@dataclass(slots=True)
class PartitionSessions:
    """Open sessions of one partition, its watermark and the next input offset to apply."""

    config: SessionConfig
    visitors: dict[str, VisitorState] = field(default_factory=dict)
    watermark: int = -1
    next_offset: int = 0
    _expiry: list[tuple[int, str]] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)    # message ids of all open sessions

    def __post_init__(self) -> None:
        slack = self.config.gap_ms + self.config.grace_ms
        self._expiry = [(st.open[0].end + slack, v) for v, st in self.visitors.items() if st.open]
        heapq.heapify(self._expiry)
        self._seen = {mid for st in self.visitors.values() for s in st.open for mid in s.message_ids}

    def step(self, event: ClickEvent, out: Outputs) -> None:
        try:
            ts, mid = event["timestamp"], event["message_id"]
            visitor = event.get("user_id") or event.get("anonymous_id")
            ok = type(ts) is int and type(mid) is str and mid and type(visitor) is str \
                and type(event["type"]) is str
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            out.bad.append((event, event_problem(event) or "malformed event"))
            return
        cfg = self.config
        state = self.visitors.get(visitor)
        if state is None:
            state = self.visitors[visitor] = VisitorState()
        if mid in self._seen:
            out.duplicates += 1
            return
        sessions = state.open
        if len(sessions) == 1:  # the common case, without building lists
            session = sessions[0]
            if session.start - cfg.gap_ms < ts < session.end + cfg.gap_ms \
                    and max(session.end, ts) - min(session.start, ts) < cfg.max_ms:
                session.add(event)
                self._seen.add(mid)
                out.touched.add(visitor)
                if ts > self.watermark:
                    self.watermark = ts
                return
        fits = [i for i, s in enumerate(sessions) if s.start - cfg.gap_ms < ts < s.end + cfg.gap_ms]
        session = self._place(sessions, fits, ts)
        if session is None:
            if ts + cfg.gap_ms + cfg.grace_ms <= self.watermark:
                if not sessions and state.closed_count == 0:
                    del self.visitors[visitor]
                out.late.append((event, "older than the watermark allows: its session "
                                        "would already be closed (gap + grace passed)"))
                return
            session = OpenSession.of(event)
            sessions.append(session)
            sessions.sort(key=lambda s: s.start)
            heapq.heappush(self._expiry, (session.end + cfg.gap_ms + cfg.grace_ms, visitor))
        elif len(fits) > 1:  # merged: schedule the merged session
            session.add(event)
            heapq.heappush(self._expiry, (session.end + cfg.gap_ms + cfg.grace_ms, visitor))
        else:
            session.add(event)
        self._seen.add(mid)
        out.touched.add(visitor)
        if ts > self.watermark:
            self.watermark = ts

    def _place(self, sessions: list[OpenSession], fits: list[int], ts: int) -> OpenSession | None:
        """The open session an event at `ts` joins (merging bridged ones), or None."""
        max_ms = self.config.max_ms
        if not fits:
            return None
        if len(fits) > 1:
            chosen = [sessions[i] for i in fits]
            start = min(min(s.start for s in chosen), ts)
            end = max(max(s.end for s in chosen), ts)
            if end - start < max_ms:
                merged = chosen[0]
                for other in chosen[1:]:
                    merged = merged.merge(other)
                for i in reversed(fits):
                    del sessions[i]
                sessions.append(merged)
                sessions.sort(key=lambda s: s.start)
                return merged
            # Too long merged: join the session before the event if that fits.
            fits = [i for i in fits if sessions[i].start <= ts][-1:] or fits[:1]
        session = sessions[fits[0]]
        if max(session.end, ts) - min(session.start, ts) >= max_ms:
            return None
        return session

    def close_for(self, watermark: int, out: Outputs) -> None:
        """Emit every session the watermark has passed by gap + grace.

        The heap holds at least one entry per visitor with open sessions, at
        or before the expiry of the visitor's first one (expiries only grow
        as sessions do): an entry is pushed when a session opens, and when
        popped early it is pushed again at the current expiry. So growing a
        session costs no heap operation.
        """
        slack = self.config.gap_ms + self.config.grace_ms
        expiry_heap = self._expiry
        while expiry_heap and expiry_heap[0][0] <= watermark:
            _, visitor = heapq.heappop(expiry_heap)
            state = self.visitors.get(visitor)
            if state is None:
                continue
            sessions = state.open
            while sessions and sessions[0].end + slack <= watermark:
                session = sessions.pop(0)
                self._seen.difference_update(session.message_ids)
                state.closed_count += 1
                summary = session.summary(visitor, state.closed_count, state.last_session_id)
                state.last_session_id = summary["session_id"]
                out.closed.append(summary)
                out.touched.add(visitor)
            if sessions:
                heapq.heappush(expiry_heap, (sessions[0].end + slack, visitor))

    def process(self, events: list[ClickEvent], next_offset: int | None = None) -> Outputs:
        """Fold a record's events in, then close what the new watermark allows."""
        out = Outputs()
        for event in events:
            self.step(event, out)
        self.close_for(self.watermark, out)
        if next_offset is not None:
            self.next_offset = next_offset
        return out

    def meta(self) -> dict:
        return {"watermark": self.watermark, "next_offset": self.next_offset}
