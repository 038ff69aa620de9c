"""Pure ingest rules: a Segment-style request body in, `clicks` records out.

No I/O and no clock: the handler passes the receive time in. Every rejection
is an `IngestError` whose message is the reason the client reads in the 400.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import fastjsonschema
import orjson

from schemas import json_schema
from schemas.clicks import SCHEMA_VERSION, ClickBatch, ClickEvent, visitor_key

_validate_event = fastjsonschema.compile(json_schema("segment_event"))


class IngestError(ValueError):
    """The request body cannot be accepted; str(error) is the reason."""


def parse_time(value: str) -> int:
    """ISO-8601 (with `Z` or an offset; naive means UTC) to epoch milliseconds."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _id(value) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def to_click(raw: dict, received_at: int) -> ClickEvent:
    """One Segment event to one `clicks` event; raises IngestError with the reason."""
    try:
        _validate_event(raw)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise IngestError(exc.message.replace("data", "event", 1)) from None
    user_id, anonymous_id = _id(raw.get("userId")), _id(raw.get("anonymousId"))
    if user_id is None and anonymous_id is None:
        raise IngestError("event needs a userId or an anonymousId")
    try:
        timestamp = parse_time(raw["timestamp"]) if "timestamp" in raw else received_at
    except ValueError:
        raise IngestError(f"event.timestamp {raw['timestamp']!r} is not an ISO-8601 time") from None
    context = raw.get("context") or {}
    ctx = {k: v for k, v in (("ip", context.get("ip")),
                             ("user_agent", context.get("userAgent")),
                             ("page", context.get("page"))) if v is not None}
    return ClickEvent(
        message_id=raw.get("messageId") or str(uuid.uuid4()),
        type=raw["type"], event=raw.get("event"), user_id=user_id, anonymous_id=anonymous_id,
        timestamp=timestamp, received_at=received_at, context=ctx,  # type: ignore[typeddict-item]
        properties=raw.get("properties") or {})


def parse_batch(body: bytes, received_at: int) -> list[ClickEvent]:
    """A `/v1/batch` body to events; the whole batch is refused if any event is bad."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("batch"), list):
        raise IngestError('body must be a JSON object with a "batch" array of events')
    if not doc["batch"]:
        raise IngestError('"batch" is empty')
    events, errors = [], []
    for i, raw in enumerate(doc["batch"]):
        try:
            if not isinstance(raw, dict):
                raise IngestError("event must be a JSON object")
            events.append(to_click(raw, received_at))
        except IngestError as exc:
            errors.append(f"batch[{i}]: {exc}")
    if errors:
        raise IngestError("; ".join(errors))
    return events


def by_visitor(events: list[ClickEvent]) -> dict[str, ClickBatch]:
    """One `clicks` record per visitor, events in the order they came."""
    records: dict[str, ClickBatch] = {}
    for event in events:
        key = visitor_key(event)
        record = records.get(key)
        if record is None:
            records[key] = ClickBatch(v=SCHEMA_VERSION, events=[event])
        else:
            record["events"].append(event)
    return records
