"""Per-batch feature increments: pure counting, applied to Redis by `streams.features`.

Counting happens per record and is merged, so the Redis write is one pipeline
per record, not one call per event.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from schemas.clicks import ClickEvent, visitor_key
from schemas.sessions import Session
from streams.codec import event_problem
from streams.sessions import item_of


@dataclass(slots=True)
class FeatureDelta:
    user_events: Counter = field(default_factory=Counter)
    user_sessions: Counter = field(default_factory=Counter)
    user_last_seen: dict[str, int] = field(default_factory=dict)
    item_views: Counter = field(default_factory=Counter)

    def add_clicks(self, events: list[ClickEvent]) -> "FeatureDelta":
        for event in events:
            if event_problem(event):
                continue  # the sessionizer dead-letters it, with the reason
            visitor = visitor_key(event)
            self.user_events[visitor] += 1
            ts = event["timestamp"]
            if ts > self.user_last_seen.get(visitor, -1):
                self.user_last_seen[visitor] = ts
            item = item_of(event)
            if item is not None:
                self.item_views[item] += 1
        return self

    def add_session(self, session: Session) -> "FeatureDelta":
        self.user_sessions[session["visitor"]] += 1
        return self
