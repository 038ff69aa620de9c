"""The `sessions` topic: one record per closed session, keyed by visitor.

Written by the sessionizer inside Kafka transactions: read it with
isolation_level=read_committed. Times are epoch milliseconds, UTC.
"""
from __future__ import annotations

from typing import TypedDict

SCHEMA_VERSION = 1


class Session(TypedDict):
    v: int                      # SCHEMA_VERSION
    session_id: str             # deterministic: same events, same id (replay-safe)
    visitor: str
    user_id: str | None
    anonymous_id: str | None
    start: int                  # epoch ms of the first event
    end: int                    # epoch ms of the last event
    duration_ms: int
    event_count: int
    counts: dict[str, int]      # events by type, `track` events by their name
    page_views: int
    searches: int
    landing_page: str | None
    exit_page: str | None
    referrer: str | None
    utm: dict[str, str]         # source, medium, campaign, term, content of the landing event
    device: str                 # desktop | mobile | tablet | bot | other (first event's)
    items: list[str]            # item ids viewed or clicked, in order of first sight, unique
    session_index: int          # 1 for the visitor's first session (or first after being forgotten,
                                # CLICKLOOP_SESSION_RETENTION_S), then 2, 3, ...
    previous_session_id: str | None
