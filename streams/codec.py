"""Decoding topic records, with the reason a record is refused (it then goes to the DLQ)."""
from __future__ import annotations

import orjson

from schemas.clicks import ClickEvent
from schemas.sessions import Session


class BadRecord(ValueError):
    """A record that cannot be processed; str(error) is the reason written to the DLQ."""


def decode_clicks(value: bytes | None) -> list[ClickEvent]:
    """A `clicks` record (ClickBatch) to its events.

    Only the envelope is checked here; each event is checked by `event_problem`
    where it is used, so one bad event goes to the DLQ alone, not its envelope.
    """
    try:
        batch = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON: {exc}") from None
    if not isinstance(batch, dict) or not isinstance(batch.get("events"), list):
        raise BadRecord('not a ClickBatch: expected an object with an "events" array')
    return batch["events"]


# An event time later than its record's Kafka timestamp plus CLICKLOOP_MAX_CLOCK_AHEAD_S
# cannot be true (the collector never writes one): believed, it would move a processor's
# watermark into the future. The compiled core names it the same (native/src/partition.rs).
AHEAD = "timestamp is more than CLICKLOOP_MAX_CLOCK_AHEAD_S after its record's Kafka timestamp"


def not_after(record_ts_ms: int | None, max_ahead_s: int) -> int | None:
    """The latest event time a record's events may carry: its Kafka timestamp plus the
    clock bound; None (no bound) for a record without a timestamp."""
    if record_ts_ms is None or record_ts_ms < 0:
        return None
    return record_ts_ms + max_ahead_s * 1000


def event_problem(event, not_after: int | None = None) -> str | None:
    """Why a `clicks` event cannot be processed, or None when it can. `not_after`: the
    latest event time its record allows (`not_after()`), None for no bound."""
    if not isinstance(event, dict):
        return "event is not a JSON object"
    ts, user_id = event.get("timestamp"), event.get("user_id")
    # As the compiled core reads them: a timestamp is a 64-bit integer, and a user_id
    # that is an object or an array (even an empty one) names no one.
    if type(ts) is not int or not -2 ** 63 <= ts < 2 ** 63 \
            or not isinstance(event.get("message_id"), str) \
            or not event["message_id"] or not isinstance(event.get("type"), str) \
            or isinstance(user_id, (dict, list)) \
            or not isinstance(user_id or event.get("anonymous_id"), str):
        return "event lacks an integer timestamp, a message_id, a type or a user_id/anonymous_id"
    if not_after is not None and ts > not_after:
        return AHEAD
    return None


def decode_session(value: bytes | None) -> Session:
    try:
        session = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON: {exc}") from None
    if not isinstance(session, dict) or not isinstance(session.get("visitor"), str):
        raise BadRecord("not a Session: expected an object with a visitor")
    return session  # type: ignore[return-value]
