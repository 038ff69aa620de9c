"""Decoding topic records, with the reason a record is refused (it then goes to the DLQ)."""
from __future__ import annotations

import orjson

from schemas.clicks import ClickEvent
from schemas.sessions import Session


class BadRecord(ValueError):
    """A record that cannot be processed; str(error) is the reason written to the DLQ."""


def decode_clicks(value: bytes | None) -> list[ClickEvent]:
    """A `clicks` record (ClickBatch) to its events; checks what processors rely on."""
    try:
        batch = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON: {exc}") from None
    if not isinstance(batch, dict) or not isinstance(batch.get("events"), list):
        raise BadRecord('not a ClickBatch: expected an object with an "events" array')
    for i, event in enumerate(batch["events"]):
        if not isinstance(event, dict) or not isinstance(event.get("timestamp"), int) \
                or not event.get("message_id") or not isinstance(event.get("context"), dict) \
                or not isinstance(event.get("properties"), dict) \
                or not (event.get("user_id") or event.get("anonymous_id")):
            raise BadRecord(f"events[{i}] lacks an integer timestamp, a message_id, a visitor id, "
                            f"a context or properties object")
    return batch["events"]


def decode_session(value: bytes | None) -> Session:
    try:
        session = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON: {exc}") from None
    if not isinstance(session, dict) or not isinstance(session.get("visitor"), str):
        raise BadRecord("not a Session: expected an object with a visitor")
    return session  # type: ignore[return-value]
