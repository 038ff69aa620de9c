"""Pure ingest rules: a Segment-style request body in, `clicks` events out.

No I/O and no clock: the handler passes the receive time, the client's
address and the cookie's anonymous id in (`Request`). A body that cannot be
read at all raises `IngestError` (the client gets a 400 with its message); in
a readable batch each bad event becomes a `Rejected` with its position and
reason (it goes to `clicks.dlq`) while the good ones are accepted.

Validation is plain Python rather than the JSON Schema in
schemas/json/segment_event.schema.json: it runs for every event at tens of
thousands of events per second and gives messages written for the client.
tests/unit/test_ingest.py checks that both accept and refuse the same events.
"""
from __future__ import annotations

import base64
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Callable

import orjson

from schemas.clicks import EVENT_TYPES, SCHEMA_VERSION, ClickBatch, ClickEvent, visitor_key
from schemas.times import iso_to_ms
from services.collector.ip import anonymize_ip
from services.collector.useragent import parse_user_agent

MAX_MESSAGE_ID = 200
_TYPES = frozenset(EVENT_TYPES)
# Top-level fields with a place of their own in ClickEvent (or consumed here);
# any other field is kept in `extra`. `writeKey` is a credential: never stored.
_KNOWN = frozenset({"type", "event", "name", "userId", "anonymousId", "previousId", "groupId",
                    "messageId", "timestamp", "originalTimestamp", "sentAt", "context",
                    "properties", "traits", "writeKey"})
_OBJECTS = ("context", "properties", "traits")


class IngestError(ValueError):
    """The request body cannot be accepted; str(error) is the reason."""


class EventTooLarge(IngestError):
    """One event is over the size limit (413 when it is the only one)."""


class BatchTooLarge(IngestError):
    """The batch's events as stored (each with the batch's context) are over the body limit (413)."""


@dataclass(frozen=True, slots=True)
class Request:
    """What the handler knows about the HTTP request, besides its body."""
    received_at: int                    # collector clock, epoch ms
    ip: str | None = None               # the client's address (used when context.ip is absent)
    anonymize_ip: bool = True
    cookie_id: str | None = None        # anonymous id for events with no identity; None: refuse them
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_ahead_ms: int = 300_000         # an event time further ahead of received_at is not believed
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))


@dataclass(slots=True)
class Rejected:
    position: str                       # "batch[3]" or "event"
    error: str
    raw: bytes                          # the event as sent (compact JSON)
    too_large: bool = False


@dataclass(slots=True)
class Parsed:
    events: list[ClickEvent]
    rejected: list[Rejected]
    write_key: object = None            # `writeKey` from the body, if any
    used_cookie: bool = False           # some event took its anonymous id from the cookie


class BodyTooLarge(IngestError):
    """The body, once inflated, is over the batch limit (413)."""


class UnsupportedEncoding(IngestError):
    """A Content-Encoding the collector does not inflate (415)."""


_INFLATE = {"gzip": 47, "x-gzip": 47, "deflate": 47}   # 32 + 15: a gzip or zlib header


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The request body as sent before its Content-Encoding, at most `limit` bytes.

    Inflated here, not by aiohttp: a corrupt stream is the client's 400 with the
    reason (aiohttp's own inflater turned it into a 500 and a dropped connection),
    and inflation stops at the limit, so a small gzip bomb costs nothing."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        if len(body) > limit:
            raise BodyTooLarge(f"body larger than the {limit}-byte limit")
        return body
    wbits = _INFLATE.get(encoding)
    if wbits is None:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported "
                                  f"(gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise IngestError(f"body cannot be read as {encoding}: {exc}") from None
    if len(out) > limit:
        raise BodyTooLarge(f"body larger than the {limit}-byte limit once inflated")
    if not inflater.eof:
        raise IngestError(f"body cannot be read as {encoding}: the stream is cut short")
    return out


def _time(raw: dict, name: str) -> int | None:
    value = raw.get(name)
    if value is None:
        return None
    try:
        return iso_to_ms(value)
    except ValueError:
        raise IngestError(f"{name} {value!r} is not an ISO-8601 time") from None


_EXACT = 2 ** 53   # integers beyond it have no exact float (JSON numbers of JavaScript clients)


def _id(raw: dict, name: str) -> str | None:
    """An id as text. A number must be an integer that JSON carries exactly: `12` and
    `12.0` are the same user "12", while 1.5 or 123456789012345678901234567890 (read
    as a float, its digits lost) would be a wrong or shared id."""
    value = raw.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if value.__class__ is int and -2 ** 63 <= value < 2 ** 63:
        return str(value)
    if value.__class__ is float and value.is_integer() and -_EXACT <= value <= _EXACT:
        return str(int(value))
    raise IngestError(f"{name} must be a string or an integer (a number of at most 2^53 when "
                      f"it is not sent as an integer), not {value!r}")


def event_time(received_at: int, original: int | None, sent_at: int | None,
               max_ahead_ms: int = 300_000) -> int:
    """Segment's clock-skew correction: receivedAt − (sentAt − originalTimestamp).

    The client's clock may be wrong, but the time between the event and the
    send is measured on that one clock, so it is carried over to ours. Without
    sentAt the client's time is taken as sent; without any, the receive time.

    A time more than `max_ahead_ms` after receivedAt cannot be true (an event is
    not received before it happens): it becomes receivedAt (the client's times
    stay in `original_timestamp` and `sent_at`). Believed, one such event would
    move every processor's event-time watermark into the future: all open
    sessions closed, every later event late, windows emptied."""
    if original is None:
        return received_at
    at = original if sent_at is None else received_at - (sent_at - original)
    return received_at if at > received_at + max_ahead_ms else at


def to_click(raw: dict, received_at: int, request: Request | None = None,
             sent_at: int | None = None, batch_context: dict | None = None) -> ClickEvent:
    """One Segment event to one `clicks` event; raises IngestError with the reason."""
    req = request if request is not None else Request(received_at)
    kind = raw.get("type")
    if kind not in _TYPES:
        raise IngestError(f"type must be one of {', '.join(EVENT_TYPES)} (got {kind!r})")
    for name in _OBJECTS:
        value = raw.get(name)
        if value is not None and not isinstance(value, dict):
            raise IngestError(f"{name} must be an object")
    user_id, anonymous_id = _id(raw, "userId"), _id(raw, "anonymousId")
    if user_id is None and anonymous_id is None:
        if req.cookie_id is None:
            raise IngestError("event needs a userId or an anonymousId")
        anonymous_id = req.cookie_id
    message_id = raw.get("messageId")
    if message_id is None or message_id == "":
        message_id = req.new_id()
    elif not isinstance(message_id, str) or len(message_id) > MAX_MESSAGE_ID:
        raise IngestError(f"messageId must be a string of at most {MAX_MESSAGE_ID} characters")
    original = _time(raw, "originalTimestamp")
    if original is None:
        original = _time(raw, "timestamp")
    own_sent_at = _time(raw, "sentAt")
    if own_sent_at is not None:
        sent_at = own_sent_at

    event: ClickEvent = {"message_id": message_id, "type": kind}  # type: ignore[typeddict-item]
    if kind == "track":
        name = raw.get("event")
        if not isinstance(name, str) or not name:
            raise IngestError("a track event needs an event name (\"event\")")
        event["event"] = name
    elif kind == "page" or kind == "screen":
        name = raw.get("name")
        if name is not None and not isinstance(name, str):
            raise IngestError("name must be a string")
        event["name"] = name
    event["user_id"] = user_id
    event["anonymous_id"] = anonymous_id
    if kind == "alias":
        previous_id = _id(raw, "previousId")
        if previous_id is None or user_id is None:
            raise IngestError("an alias event needs a previousId and a userId")
        event["previous_id"] = previous_id
    elif kind == "group":
        group_id = _id(raw, "groupId")
        if group_id is None:
            raise IngestError("a group event needs a groupId")
        event["group_id"] = group_id
    event["timestamp"] = event_time(req.received_at, original, sent_at, req.max_ahead_ms)
    event["original_timestamp"] = original
    event["sent_at"] = sent_at
    event["received_at"] = req.received_at
    event["context"] = _context(raw.get("context"), batch_context, req)
    event["properties"] = raw.get("properties") or {}
    traits = raw.get("traits")
    if traits is not None:
        event["traits"] = traits
    if raw.keys() - _KNOWN:
        event["extra"] = {k: v for k, v in raw.items() if k not in _KNOWN}
    return event


def _context(sent: dict | None, batch_context: dict | None, req: Request) -> dict:
    """Segment's context as sent (a batch's context under the event's own), with
    the IP anonymized and the parsed user agent added."""
    ctx = {**batch_context, **(sent or {})} if batch_context else dict(sent or ())
    ip = ctx.get("ip")
    if not isinstance(ip, str) or not ip:
        ip = req.ip
    if ip is not None and req.anonymize_ip:
        ip = anonymize_ip(ip)
    if ip is None:
        ctx.pop("ip", None)
    else:
        ctx["ip"] = ip
    ua = ctx.get("userAgent")
    ctx["ua"] = parse_user_agent(ua if isinstance(ua, str) else "")
    return ctx


def _load(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(f"body is not valid JSON: {exc}") from None


def parse_request(body: bytes, kind: str | None, req: Request) -> Parsed:
    """A request body to events: `kind` None for `/v1/batch`, else the type
    the endpoint implies (`/v1/track` → "track"), which overrides the body's."""
    doc = _load(body)
    if kind is not None:
        if not isinstance(doc, dict):
            raise IngestError(f"body must be a JSON object: one {kind} event")
        doc["type"] = kind
        try:
            if len(body) > req.max_event_bytes:
                raise EventTooLarge(_too_large(len(body), req.max_event_bytes))
            event = to_click(doc, req.received_at, req)
        except IngestError as exc:
            return Parsed([], [Rejected("event", str(exc), body, isinstance(exc, EventTooLarge))],
                          doc.get("writeKey"))
        return Parsed([event], [], doc.get("writeKey"), _cookie(event, doc, req))
    if not isinstance(doc, dict) or not isinstance(doc.get("batch"), list):
        raise IngestError('body must be a JSON object with a "batch" array of events')
    raws = doc["batch"]
    if not raws:
        raise IngestError('"batch" is empty')
    try:
        sent_at = _time(doc, "sentAt")
    except IngestError as exc:
        raise IngestError(f"batch {exc}") from None
    batch_context = doc.get("context")
    if not isinstance(batch_context, dict):
        batch_context = None
    # Every event is stored with the batch's context: it counts in each event's size
    # and in the batch's (a small body with a big context must not become gigabytes).
    shared = len(orjson.dumps(batch_context)) if batch_context else 0
    if shared and len(body) + shared * len(raws) > req.max_batch_bytes:
        raise BatchTooLarge(f"the batch context ({shared} bytes) repeated in {len(raws)} events "
                            f"makes the batch larger than the {req.max_batch_bytes}-byte limit")
    # Only a body over the limit can hold an event over it: measure events then only.
    measure = len(body) + shared > req.max_event_bytes
    parsed = Parsed([], [], doc.get("writeKey"))
    for i, raw in enumerate(raws):
        try:
            if not isinstance(raw, dict):
                raise IngestError("event must be a JSON object")
            if measure:
                size = len(orjson.dumps(raw)) + shared
                if size > req.max_event_bytes:
                    raise EventTooLarge(_too_large(size, req.max_event_bytes))
            event = to_click(raw, req.received_at, req, sent_at, batch_context)
        except IngestError as exc:
            parsed.rejected.append(Rejected(f"batch[{i}]", str(exc), orjson.dumps(raw),
                                            isinstance(exc, EventTooLarge)))
            continue
        parsed.events.append(event)
        if not parsed.used_cookie and _cookie(event, raw, req):
            parsed.used_cookie = True
    return parsed


def _cookie(event: ClickEvent, raw: dict, req: Request) -> bool:
    return req.cookie_id is not None and event["anonymous_id"] == req.cookie_id \
        and not raw.get("anonymousId")


def _too_large(size: int, limit: int) -> str:
    return f"event is {size} bytes, over the {limit}-byte limit"


def dlq_value(topic: str, position: str, error: str, raw: bytes, received_at: int) -> bytes:
    """A `clicks.dlq` record for a refused event, with the field names of
    streams/dlq.py's records; `position` says where in which request it was."""
    return orjson.dumps({
        "v": 1, "position": position, "topic": topic, "partition": None, "offset": None,
        "processor": "collector", "error": error, "received_at": received_at,
        "key_b64": None, "value_b64": base64.b64encode(raw).decode(),
    })


def by_visitor(events: list[ClickEvent]) -> dict[str, ClickBatch]:
    """One `clicks` record per visitor, events in the order they came (the
    issue-2 packing; the collector now packs per partition, see packer.py)."""
    records: dict[str, ClickBatch] = {}
    for event in events:
        key = visitor_key(event)
        record = records.get(key)
        if record is None:
            records[key] = ClickBatch(v=SCHEMA_VERSION, events=[event])
        else:
            record["events"].append(event)
    return records
