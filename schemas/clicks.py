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

from streams.partitioning import key_partition

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


# Absent vs null. A NotRequired key is either left out or present with a null
# value, and the collector (services/collector/ingest.py) decides which: it always
# writes the keys of NULL_KEYS, and those of NULL_KEYS_BY_TYPE for events of that
# type (a `page` event carries `"name": null` when unnamed), and leaves every other
# optional key out when it has no value (`traits` and `extra` only when sent, no
# `event` on a page view). The Parquet archive stores absent and null alike; a
# replay from it restores each by this rule, so the records come back exactly.
NULL_KEYS = frozenset({"message_id", "type", "user_id", "anonymous_id", "timestamp",
                       "original_timestamp", "sent_at", "received_at", "context", "properties"})
NULL_KEYS_BY_TYPE: dict[str, frozenset[str]] = {
    "track": frozenset({"event"}), "page": frozenset({"name"}), "screen": frozenset({"name"}),
    "identify": frozenset(), "alias": frozenset({"previous_id"}), "group": frozenset({"group_id"}),
}


class ClickBatch(TypedDict):
    v: int                                  # SCHEMA_VERSION
    events: list[ClickEvent]


def visitor_key(event: ClickEvent) -> str:
    """Who the event belongs to: the user id once known, else the anonymous id."""
    return event.get("user_id") or event["anonymous_id"]  # type: ignore[return-value]


def partition_of(visitor: str, partitions: int) -> int:
    """The `clicks` partition of a visitor: Kafka's default partitioner on the key bytes."""
    return key_partition(visitor.encode(), partitions)
