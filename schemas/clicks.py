"""The `clicks` topic: tracked events, Segment-style, as the collector enriched them.

A Kafka record on `clicks` is an envelope (`ClickBatch`) of one or more events
that all belong on the same partition: the partition of their visitor key,
`partition_of(visitor_key(event), partitions)` (Kafka's default murmur2
partitioner, so a record keyed by the visitor lands on the same partition).
The record key is the visitor when every event of the envelope has the same
one, else null. Under load the collector packs events of many requests into
one record per partition; amortizing Kafka's and Faust's per-record cost over
hundreds of events is what lets processors run near raw-client speed
(DESIGN.md, "Performance design"). Every event of a visitor is on one
partition, in the order the collector received it.

Times are integer epoch milliseconds, UTC.
"""
from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

from aiokafka.partitioner import murmur2

SCHEMA_VERSION = 1

EventType = Literal["track", "page", "screen", "identify", "alias", "group"]
EVENT_TYPES: tuple[EventType, ...] = ("track", "page", "screen", "identify", "alias", "group")


class UserAgent(TypedDict):
    """Parsed by the collector from context.userAgent."""
    browser: str            # family, e.g. "Chrome", "Mobile Safari", "Other"
    os: str                 # family, e.g. "Windows", "iOS", "Other"
    device: str             # "desktop" | "mobile" | "tablet" | "bot" | "other"
    is_bot: bool


class ClickEvent(TypedDict):
    message_id: str
    type: EventType
    event: NotRequired[str | None]          # the action of a `track` event
    name: NotRequired[str | None]           # the page or screen name of `page` / `screen`
    user_id: str | None
    anonymous_id: str | None
    previous_id: NotRequired[str | None]    # `alias`
    group_id: NotRequired[str | None]       # `group`
    timestamp: int                          # event time, clock-skew corrected
    original_timestamp: NotRequired[int | None]   # the client's clock, as sent
    sent_at: NotRequired[int | None]        # the client's clock when the batch was sent
    received_at: int                        # the collector's clock
    # Segment's context object as the client sent it (camelCase names: page{url,
    # path, referrer, title, search}, campaign{source, medium, name, term,
    # content}, userAgent, library, locale, ...), with `ip` anonymized and `ua`
    # (UserAgent) added by the collector.
    context: dict
    properties: dict
    traits: NotRequired[dict]
    extra: NotRequired[dict]                # unknown top-level fields, kept as sent


class ClickBatch(TypedDict):
    v: int                                  # SCHEMA_VERSION
    events: list[ClickEvent]


def visitor_key(event: ClickEvent) -> str:
    """Who the event belongs to: the user id once known, else the anonymous id."""
    return event.get("user_id") or event["anonymous_id"]  # type: ignore[return-value]


def partition_of(visitor: str, partitions: int) -> int:
    """The `clicks` partition of a visitor: Kafka's default partitioner on the key bytes."""
    return (murmur2(visitor.encode()) & 0x7FFFFFFF) % partitions
