"""The `clicks` topic: tracked events, Segment-style, as the collector enriched them.

A Kafka record on `clicks` is an envelope of one or more events of one
visitor (`ClickBatch`): the collector writes all events of a request that share
a visitor as one record, keyed by that visitor. Amortizing the per-record cost
of Kafka and Faust over several events is what lets the stream processors run
at raw-client speed (DESIGN.md, "Performance design").

Times are integer epoch milliseconds, UTC.
"""
from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

SCHEMA_VERSION = 1

EventType = Literal["track", "page", "screen", "identify", "alias", "group"]
EVENT_TYPES: tuple[EventType, ...] = ("track", "page", "screen", "identify", "alias", "group")


class Page(TypedDict, total=False):
    url: str
    path: str
    referrer: str
    title: str


class Context(TypedDict, total=False):
    ip: str
    user_agent: str
    page: Page


class ClickEvent(TypedDict):
    message_id: str
    type: EventType
    event: NotRequired[str | None]      # the action name of a `track` event
    user_id: str | None
    anonymous_id: str | None
    timestamp: int                      # event time, epoch ms
    received_at: int                    # collector's clock, epoch ms
    context: Context
    properties: dict


class ClickBatch(TypedDict):
    v: int                              # SCHEMA_VERSION
    events: list[ClickEvent]


def visitor_key(event: ClickEvent) -> str:
    """Who the event belongs to: the user id once known, else the anonymous id.

    Part of the topic contract: records on `clicks` are keyed (and so
    partitioned) by this value.
    """
    return event.get("user_id") or event["anonymous_id"]  # type: ignore[return-value]
