"""Collector ingest rules (services.collector.ingest) and the topic contracts they produce."""
from __future__ import annotations

import typing

import fastjsonschema
import orjson
import pytest

from schemas import json_schema
from schemas.clicks import ClickEvent
from schemas.sessions import Session
from services.collector.ingest import IngestError, by_visitor, parse_batch, parse_time

NOW = 1_700_000_000_000


def body(*events) -> bytes:
    return orjson.dumps({"batch": list(events)})


GOOD = {"type": "track", "event": "Product Viewed", "userId": "u1", "messageId": "m1",
        "timestamp": "2023-11-14T22:13:20.000Z", "properties": {"item_id": "i9"},
        "context": {"ip": "203.0.113.9", "userAgent": "UA", "page": {"path": "/p/i9"}}}

# (reason, body, part of the error message)
BAD = [
    ("not JSON", b"{nope", "not valid JSON"),
    ("not an object", b"[1, 2]", '"batch" array'),
    ("batch missing", b'{"events": []}', '"batch" array'),
    ("batch empty", body(), "empty"),
    ("event not an object", body(1), "batch[0]: event must be a JSON object"),
    ("unknown type", body({**GOOD, "type": "click"}), "batch[0]: event.type must be one of"),
    ("track without event name", body({k: v for k, v in GOOD.items() if k != "event"}),
     "must contain ['event']"),
    ("no identity", body({**GOOD, "userId": None}), "userId or an anonymousId"),
    ("bad timestamp", body({**GOOD, "timestamp": "yesterday"}), "timestamp"),
    ("properties not an object", body({**GOOD, "properties": [1]}), "properties must be object"),
    ("second event bad is named", body(GOOD, {**GOOD, "type": 3}), "batch[1]"),
]


@pytest.mark.parametrize("reason,raw,message", BAD, ids=[b[0] for b in BAD])
def test_bad_bodies_are_refused_with_the_reason(reason, raw, message):
    with pytest.raises(IngestError) as err:
        parse_batch(raw, NOW)
    assert message in str(err.value), reason


def test_good_event_is_mapped_to_the_clicks_contract():
    (event,) = parse_batch(body(GOOD), NOW)
    assert event == {
        "message_id": "m1", "type": "track", "event": "Product Viewed", "user_id": "u1",
        "anonymous_id": None, "timestamp": 1_700_000_000_000, "received_at": NOW,
        "context": {"ip": "203.0.113.9", "user_agent": "UA", "page": {"path": "/p/i9"}},
        "properties": {"item_id": "i9"},
    }


def test_defaults_message_id_and_timestamp_and_numeric_ids():
    (event,) = parse_batch(body({"type": "page", "anonymousId": 42}), NOW)
    assert event["timestamp"] == NOW and event["anonymous_id"] == "42" and event["message_id"]


@pytest.mark.parametrize("text,ms", [
    ("2023-11-14T22:13:20Z", 1_700_000_000_000),
    ("2023-11-14T22:13:20.123+00:00", 1_700_000_000_123),
    ("2023-11-14T23:13:20+01:00", 1_700_000_000_000),
    ("2023-11-14T22:13:20", 1_700_000_000_000),  # naive means UTC
])
def test_parse_time(text, ms):
    assert parse_time(text) == ms


def test_records_group_events_by_visitor_in_order_and_match_the_topic_schema():
    events = parse_batch(body({**GOOD, "messageId": "a"}, {**GOOD, "userId": "u2", "messageId": "b"},
                              {**GOOD, "messageId": "c"}), NOW)
    records = by_visitor(events)
    assert {k: [e["message_id"] for e in r["events"]] for k, r in records.items()} == \
        {"u1": ["a", "c"], "u2": ["b"]}
    validate = fastjsonschema.compile(json_schema("clicks"))
    for record in records.values():
        validate(orjson.loads(orjson.dumps(record)))


@pytest.mark.parametrize("record,schema,inner", [
    (ClickEvent, "clicks", ("definitions", "ClickEvent")),
    (Session, "sessions", ()),
])
def test_typed_records_and_json_schemas_name_the_same_fields(record, schema, inner):
    doc = json_schema(schema)
    for step in inner:
        doc = doc[step]
    assert set(typing.get_type_hints(record)) == set(doc["properties"])
