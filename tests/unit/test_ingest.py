"""Collector ingest rules (services.collector.ingest) and the topic contracts they produce."""
from __future__ import annotations

import base64
import typing

import fastjsonschema
import orjson
import pytest

from schemas import json_schema
from schemas.clicks import ClickEvent
from schemas.sessions import Session
from services.collector.ingest import (BatchTooLarge, IngestError, Request, by_visitor, dlq_value,
                                       event_time, parse_request, to_click)
from schemas.times import iso_to_ms as parse_time

NOW = 1_700_000_000_000
REQ = Request(received_at=NOW, ip="198.51.100.77", new_id=lambda: "generated")
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0 Safari/537.36")


def body(*events, **top) -> bytes:
    return orjson.dumps({"batch": list(events), **top})


GOOD = {"type": "track", "event": "Product Viewed", "userId": "u1", "messageId": "m1",
        "timestamp": "2023-11-14T22:13:20.000Z", "properties": {"item_id": "i9"},
        "context": {"ip": "203.0.113.9", "userAgent": CHROME, "page": {"path": "/p/i9"}}}

# (reason, body, part of the error message): the whole body is refused (400).
BAD_BODIES = [
    ("not JSON", b"{nope", "not valid JSON"),
    ("not an object", b"[1, 2]", '"batch" array'),
    ("batch missing", b'{"events": []}', '"batch" array'),
    ("batch not an array", b'{"batch": {}}', '"batch" array'),
    ("batch empty", body(), "empty"),
    ("bad batch sentAt", body(GOOD, sentAt="soon"), "batch sentAt 'soon' is not an ISO-8601 time"),
]


@pytest.mark.parametrize("reason,raw,message", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_unreadable_bodies_are_refused_with_the_reason(reason, raw, message):
    with pytest.raises(IngestError) as err:
        parse_request(raw, None, REQ)
    assert message in str(err.value), reason


def without(*names: str) -> dict:
    return {k: v for k, v in GOOD.items() if k not in names}


# (reason, event, part of the error message): this event is refused, the others accepted.
BAD_EVENTS = [
    ("event not an object", 1, "event must be a JSON object"),
    ("unknown type", {**GOOD, "type": "click"}, "type must be one of track, page"),
    ("no type", without("type"), "type must be one of"),
    ("track without event name", without("event"), 'needs an event name ("event")'),
    ("track with empty event name", {**GOOD, "event": ""}, 'needs an event name'),
    ("no identity", without("userId"), "userId or an anonymousId"),
    ("empty identity", {**GOOD, "userId": "", "anonymousId": None}, "userId or an anonymousId"),
    ("boolean user id", {**GOOD, "userId": True}, "userId must be a string or an integer"),
    ("fractional user id", {**GOOD, "userId": 1.5}, "userId must be a string or an integer"),
    ("bad timestamp", {**GOOD, "timestamp": "yesterday"}, "timestamp 'yesterday' is not an ISO"),
    ("numeric timestamp", {**GOOD, "timestamp": 1700000000}, "timestamp 1700000000 is not an ISO"),
    ("bad originalTimestamp", {**GOOD, "originalTimestamp": "x"}, "originalTimestamp 'x'"),
    ("bad sentAt", {**GOOD, "sentAt": "x"}, "sentAt 'x'"),
    ("properties not an object", {**GOOD, "properties": [1]}, "properties must be an object"),
    ("context not an object", {**GOOD, "context": "web"}, "context must be an object"),
    ("traits not an object", {**GOOD, "traits": 3}, "traits must be an object"),
    ("messageId too long", {**GOOD, "messageId": "m" * 201}, "messageId must be a string"),
    ("messageId a number", {**GOOD, "messageId": 7}, "messageId must be a string"),
    ("page name a number", {**GOOD, "type": "page", "name": 3}, "name must be a string"),
    ("alias without previousId", {**GOOD, "type": "alias"}, "previousId and a userId"),
    ("alias without userId", {"type": "alias", "previousId": "a", "anonymousId": "a"},
     "previousId and a userId"),
    ("group without groupId", {**GOOD, "type": "group"}, "needs a groupId"),
]


@pytest.mark.parametrize("reason,event,message", BAD_EVENTS, ids=[b[0] for b in BAD_EVENTS])
def test_bad_events_are_named_and_the_good_ones_kept(reason, event, message):
    parsed = parse_request(body(GOOD, event, {**GOOD, "messageId": "m3"}), None, REQ)
    assert [e["message_id"] for e in parsed.events] == ["m1", "m3"], reason
    (rejected,) = parsed.rejected
    assert rejected.position == "batch[1]" and message in rejected.error, (reason, rejected.error)
    assert orjson.loads(rejected.raw) == event and not rejected.too_large


@pytest.mark.parametrize("reason,event,message", BAD_EVENTS[1:], ids=[b[0] for b in BAD_EVENTS[1:]])
def test_the_json_schema_refuses_the_same_events(reason, event, message):
    # segment_event.schema.json documents the rules ingest checks in plain Python.
    validate = fastjsonschema.compile(json_schema("segment_event"))
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        validate(event)


GOOD_EVENTS = [
    GOOD,
    {"type": "page", "anonymousId": 42, "name": "Home"},
    {"type": "screen", "userId": "u", "name": None},
    {"type": "identify", "userId": "u", "traits": {"plan": "pro"}},
    {"type": "alias", "userId": "u", "previousId": "anon-1"},
    {"type": "group", "userId": "u", "groupId": 7, "traits": {}},
    {**GOOD, "somethingNew": {"a": 1}, "integrations": {"All": True}},
]


@pytest.mark.parametrize("event", GOOD_EVENTS)
def test_good_events_pass_both_the_rules_and_the_json_schema(event):
    fastjsonschema.compile(json_schema("segment_event"))(event)
    parsed = parse_request(body(event), None, REQ)
    assert len(parsed.events) == 1 and not parsed.rejected


def test_good_event_is_mapped_to_the_clicks_contract():
    (event,) = parse_request(body(GOOD), None, REQ).events
    assert event == {
        "message_id": "m1", "type": "track", "event": "Product Viewed", "user_id": "u1",
        "anonymous_id": None, "timestamp": 1_700_000_000_000, "original_timestamp": 1_700_000_000_000,
        "sent_at": None, "received_at": NOW,
        "context": {"ip": "203.0.113.0", "userAgent": CHROME, "page": {"path": "/p/i9"},
                    "ua": {"browser": "Chrome", "os": "Windows", "device": "desktop", "is_bot": False}},
        "properties": {"item_id": "i9"},
    }


def test_type_specific_fields_unknown_fields_and_traits_are_kept():
    events = parse_request(body(*GOOD_EVENTS[1:]), None, REQ).events
    page, screen, identify, alias, group, extra = events
    assert (page["name"], page["anonymous_id"], page["message_id"]) == ("Home", "42", "generated")
    assert "event" not in page and screen["name"] is None
    assert identify["traits"] == {"plan": "pro"} and "extra" not in identify
    assert alias["previous_id"] == "anon-1" and group["group_id"] == "7"
    assert extra["extra"] == {"somethingNew": {"a": 1}, "integrations": {"All": True}}


# (reason, timestamp, originalTimestamp, event sentAt, batch sentAt, expected event time)
T0 = "2023-11-14T22:13:20Z"   # = NOW
T0_M5 = "2023-11-14T22:13:15Z"  # NOW - 5 s
SKEW = [
    ("no times: the receive time", None, None, None, None, NOW),
    ("no sentAt: the client's time", T0_M5, None, None, None, NOW - 5000),
    ("client clock 1 h behind, sent 2 s after the event",
     "2023-11-14T21:13:18Z", None, None, "2023-11-14T21:13:20Z", NOW - 2000),
    ("originalTimestamp wins over timestamp",
     T0, "2023-11-14T21:13:18Z", None, "2023-11-14T21:13:20Z", NOW - 2000),
    ("the event's sentAt wins over the batch's",
     "2023-11-14T21:13:18Z", None, "2023-11-14T21:13:19Z", "2023-11-14T21:13:30Z", NOW - 1000),
    ("offsets are honoured", "2023-11-14T23:13:15+01:00", None, None, None, NOW - 5000),
]


@pytest.mark.parametrize("reason,ts,original,sent,batch_sent,expected", SKEW, ids=[s[0] for s in SKEW])
def test_clock_skew_correction(reason, ts, original, sent, batch_sent, expected):
    raw = {"type": "page", "userId": "u"}
    for name, value in (("timestamp", ts), ("originalTimestamp", original), ("sentAt", sent)):
        if value is not None:
            raw[name] = value
    top = {"sentAt": batch_sent} if batch_sent else {}
    (event,) = parse_request(body(raw, **top), None, REQ).events
    assert event["timestamp"] == expected, reason


def test_event_time_rule():
    assert event_time(1000, original=100, sent_at=150) == 950
    assert event_time(1000, original=100, sent_at=None) == 100
    assert event_time(1000, original=None, sent_at=150) == 1000


@pytest.mark.parametrize("reason,original,sent_at,expected", [
    ("a client clock in 2100, no sentAt: the receive time", "2100-01-01T00:00:00Z", None, NOW),
    ("sentAt before the event on the client's clock: would land in the future", "2023-11-14T23:13:20Z",
     "2023-11-14T22:13:20Z", NOW),
    ("exactly the allowed 5 minutes ahead is believed", "2023-11-14T22:18:20Z", None, NOW + 300_000),
    ("one ms more is not", "2023-11-14T22:18:20.001Z", None, NOW),
    ("the past is believed (late events are the processors' to judge)", "2023-11-01T00:00:00Z", None,
     parse_time("2023-11-01T00:00:00Z")),
])
def test_an_event_time_ahead_of_the_receive_time_is_not_believed(reason, original, sent_at, expected):
    """One future event would move every processor's watermark into the future."""
    raw = {**GOOD, "timestamp": original, **({"sentAt": sent_at} if sent_at else {})}
    (event,) = parse_request(body(raw), None, REQ).events
    assert event["timestamp"] == expected, reason
    assert event["original_timestamp"] == parse_time(original)


def test_a_batch_context_counts_in_every_event_it_is_stored_with():
    """A small body with a big batch context must not become a huge amount of stored data."""
    ctx = {"library": {"name": "x" * 20_000}}
    small = {"type": "track", "event": "E", "userId": "u", "timestamp": "2023-11-14T22:00:00Z"}
    parsed = parse_request(body(small, {**small, "properties": {"p": "y" * 15_000}}, context=ctx),
                           None, REQ)
    assert len(parsed.events) == 1 and parsed.rejected[0].position == "batch[1]"
    assert parsed.rejected[0].too_large
    with pytest.raises(BatchTooLarge, match="repeated in 30 events"):
        parse_request(body(*[small] * 30, context=ctx), None, REQ)


@pytest.mark.parametrize("reason,context,req,ip", [
    ("client's ip anonymized", {"ip": "203.0.113.9"}, REQ, "203.0.113.0"),
    ("request's address when none sent", {}, REQ, "198.51.100.0"),
    ("IPv6: last 80 bits zeroed", {"ip": "2001:db8:1:2:3:4:5:6"}, REQ, "2001:db8:1::"),
    ("not an address: dropped", {"ip": "localhost"}, REQ, None),
    ("anonymization off", {"ip": "203.0.113.9"},
     Request(NOW, ip="198.51.100.77", anonymize_ip=False), "203.0.113.9"),
    ("no address at all", {}, Request(NOW), None),
])
def test_ip(reason, context, req, ip):
    event = to_click({"type": "page", "userId": "u", "context": context}, NOW, req)
    assert event["context"].get("ip") == ip, reason


def test_batch_context_is_merged_under_each_events_own():
    raw = {"type": "page", "userId": "u", "context": {"locale": "fr-FR"}}
    (event,) = parse_request(body(raw, context={"locale": "en-US", "library": {"name": "x"}}),
                             None, REQ).events
    assert event["context"]["locale"] == "fr-FR" and event["context"]["library"] == {"name": "x"}


def test_cookie_supplies_the_anonymous_id_only_when_the_client_sent_none():
    req = Request(NOW, cookie_id="cookie-1")
    parsed = parse_request(body({"type": "page"}, {"type": "page", "anonymousId": "a"}), None, req)
    assert [e["anonymous_id"] for e in parsed.events] == ["cookie-1", "a"] and parsed.used_cookie
    parsed = parse_request(body({"type": "page", "userId": "u"}), None, req)
    assert parsed.events[0]["anonymous_id"] is None and not parsed.used_cookie


def test_single_event_endpoints_take_the_type_from_the_path():
    parsed = parse_request(orjson.dumps({"type": "page", "event": "Clicked", "userId": "u",
                                         "writeKey": "k"}), "track", REQ)
    (event,) = parsed.events
    assert event["type"] == "track" and parsed.write_key == "k" and "extra" not in event
    parsed = parse_request(b'{"userId": "u"}', "track", REQ)
    assert not parsed.events and parsed.rejected[0].position == "event"
    with pytest.raises(IngestError, match="one track event"):
        parse_request(b"[]", "track", REQ)


def test_oversized_events_are_refused_as_too_large():
    req = Request(NOW, max_event_bytes=1024)
    big = {**GOOD, "properties": {"x": "y" * 2000}}
    parsed = parse_request(body(GOOD, big), None, req)
    assert len(parsed.events) == 1
    (rejected,) = parsed.rejected
    assert rejected.too_large and "over the 1024-byte limit" in rejected.error
    parsed = parse_request(orjson.dumps(big), "track", req)
    assert parsed.rejected[0].too_large


def test_dlq_value_keeps_the_original_event_and_names_the_position():
    value = orjson.loads(dlq_value("clicks", "POST /v1/batch batch[3]", "bad", b'{"a":1}', NOW))
    assert value["position"] == "POST /v1/batch batch[3]" and value["processor"] == "collector"
    assert base64.b64decode(value["value_b64"]) == b'{"a":1}' and value["error"] == "bad"
    assert set(value) >= {"v", "position", "error", "processor", "value_b64"}


@pytest.mark.parametrize("text,ms", [
    ("2023-11-14T22:13:20Z", 1_700_000_000_000),
    ("2023-11-14T22:13:20.123+00:00", 1_700_000_000_123),
    ("2023-11-14T23:13:20+01:00", 1_700_000_000_000),
    ("2023-11-14T22:13:20", 1_700_000_000_000),  # naive means UTC
])
def test_parse_time(text, ms):
    assert parse_time(text) == ms


def test_events_match_the_topic_schema():
    events = parse_request(body(*GOOD_EVENTS), None, REQ).events
    validate = fastjsonschema.compile(json_schema("clicks"))
    for record in by_visitor(events).values():
        validate(orjson.loads(orjson.dumps(record)))


def test_by_visitor_groups_events_in_order():
    events = parse_request(body({**GOOD, "messageId": "a"}, {**GOOD, "userId": "u2", "messageId": "b"},
                                {**GOOD, "messageId": "c"}), None, REQ).events
    assert {k: [e["message_id"] for e in r["events"]] for k, r in by_visitor(events).items()} == \
        {"u1": ["a", "c"], "u2": ["b"]}


@pytest.mark.parametrize("record,schema,inner", [
    (ClickEvent, "clicks", ("definitions", "ClickEvent")),
    (Session, "sessions", ()),
])
def test_typed_records_and_json_schemas_name_the_same_fields(record, schema, inner):
    doc = json_schema(schema)
    for step in inner:
        doc = doc[step]
    assert set(typing.get_type_hints(record)) == set(doc["properties"])


def test_inflate_stops_at_the_limit_and_names_what_is_wrong():
    import gzip
    import zlib

    from services.collector.ingest import BodyTooLarge, UnsupportedEncoding, inflate

    data = b'{"batch": []}'
    assert inflate(gzip.compress(data), "gzip", 100) == data
    assert inflate(zlib.compress(data), "Deflate", 100) == data
    assert inflate(data, None, 100) == data
    bomb = gzip.compress(b"0" * 50_000_000)   # 49 KB that inflate to 50 MB
    with pytest.raises(BodyTooLarge):
        inflate(bomb, "gzip", 512_000)
    with pytest.raises(BodyTooLarge):
        inflate(b"x" * 101, "identity", 100)
    with pytest.raises(UnsupportedEncoding, match="'zstd'"):
        inflate(data, "zstd", 100)
    with pytest.raises(IngestError, match="cannot be read as gzip"):
        inflate(b"\x1f\x8b\x08\x00garbage", "gzip", 100)


@pytest.mark.parametrize("value,expected", [
    (42, "42"), (12.0, "12"), (-7, "-7"), ("abc", "abc"),
    (1.5, None), (123456789012345678901234567890, None), (2.0 ** 60, None), (True, None),
])
def test_numeric_ids_must_be_exact_integers(value, expected):
    raw = {**GOOD, "userId": "ID"}
    parsed = parse_request(body(raw).replace(b'"ID"', str(value).encode() if not isinstance(value, str)
                                             else orjson.dumps(value)).replace(b"True", b"true"),
                           None, REQ)
    if expected is None:
        assert parsed.events == [] and "userId must be a string or an integer" in parsed.rejected[0].error
    else:
        assert parsed.events[0]["user_id"] == expected
