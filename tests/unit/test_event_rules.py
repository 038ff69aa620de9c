"""The compiled sessionizer and the Python processors (features, attribution, training)
read events by the same rules: which events cannot be processed (`codec.event_problem`)
and which item an event is about (`sessions.item_of`). Random events built from odd
values (containers, huge or fractional numbers, booleans, empty strings) are fed to both."""
from __future__ import annotations

import random

import orjson

from streams.codec import event_problem
from streams.sessions import PartitionSessions, SessionConfig, item_of

ODD = [None, "", "x", "Product Viewed", "Products Searched", 0, 1, -5, 2 ** 63 - 1, 2 ** 63,
       1.0, 1.5, 1e20, True, False, [], ["a"], {}, {"a": 1}, "u1", "0"]
T = 1_780_000_000_000


def random_event(rng: random.Random) -> dict:
    """A processable track event with some fields replaced by odd values."""
    event = {"message_id": "m1", "type": "track", "event": "Product Viewed", "user_id": "u1",
             "anonymous_id": "a1", "timestamp": T, "context": {},
             "properties": {"item_id": "i1", "product_id": "p1"}}
    for name, odd in (("message_id", ["", None, 5]), ("type", ["page", None, 3]),
                      ("event", [*ODD, "Product Clicked", "Item Viewed"]), ("user_id", ODD),
                      ("anonymous_id", ODD), ("timestamp", [1.78e12, "1", None, True, 2 ** 63, -1]),
                      ("properties", [["i1"], {}, {"product_id": "p1"}])):
        if rng.random() < 0.25:
            event[name] = rng.choice(odd)
    for name in ("item_id", "product_id"):
        if isinstance(event["properties"], dict) and name in event["properties"] and rng.random() < 0.4:
            event["properties"][name] = rng.choice(ODD)
    return event


def encoded(event: dict) -> bytes:
    """The record as JSON (orjson does not write integers from 2**63: spliced in)."""
    if event["timestamp"] == 2 ** 63:
        return orjson.dumps({"v": 1, "events": [{**event, "timestamp": "BIG"}]}) \
            .replace(b'"BIG"', str(2 ** 63).encode())
    return orjson.dumps({"v": 1, "events": [event]})


def test_both_cores_agree_on_bad_events_and_items():
    rng, items_checked, bad = random.Random(11), 0, 0
    for _ in range(3_000):
        event = random_event(rng)
        part = PartitionSessions(SessionConfig())
        out = part.process_record(encoded(event), 1)
        assert bool(out.bad_json) == (event_problem(event) is not None), event
        if out.bad_json:
            bad += 1
            continue
        closing = {**event, "message_id": "later", "type": "page", "timestamp": 2 * T}
        (session,) = part.process([closing]).closed
        expected = [] if item_of(event) is None else [item_of(event)]
        assert session["items"] == expected, event
        items_checked += 1
    assert items_checked > 1_000 and bad > 300


def test_both_cores_refuse_an_event_stamped_after_its_record_allows():
    """`not_after` (the record's Kafka timestamp plus the clock bound): the same events are
    bad in both cores, with the same reason, and a refused event moves no watermark."""
    from streams.codec import AHEAD, not_after

    rng, ahead = random.Random(5), 0
    for _ in range(1_000):
        event = random_event(rng)
        limit = not_after(T + rng.choice([-1, 0, 1, -300_000, 10 ** 6]), rng.choice([0, 300]))
        part = PartitionSessions(SessionConfig())
        out = part.process_record(encoded(event), 1, limit)
        problem = event_problem(event, limit)
        assert [r for _, r in out.bad_json] == ([problem] if problem else []), (event, limit)
        if problem == AHEAD:
            ahead += 1
            assert part.watermark == -1, "a refused event moves no watermark"
    assert ahead > 50


def test_a_record_without_a_timestamp_bounds_nothing():
    from streams.codec import not_after

    assert not_after(None, 300) is None and not_after(-1, 300) is None
    assert not_after(T, 300) == T + 300_000 and not_after(T, 0) == T


def test_a_bad_events_bytes_reach_the_dlq_even_where_the_json_readers_would_differ():
    """The bad or late event's own bytes are cut from the record as the parse read it:
    with two `events` keys, from the last (the one the parse took); with invalid UTF-8
    in a string the parse accepted, with U+FFFD in its place; never `null`."""
    part = PartitionSessions(SessionConfig())
    twice = b'{"v":1,"events":[{"type":"x"}],"events":[{"type":"track", "bad": [1, {"a": "b"}]}, 5]}'
    out = part.process_record(twice, 1)
    assert [e for e, _ in out.bad_json] == [b'{"type":"track", "bad": [1, {"a": "b"}]}', b"5"]
    broken = b'{"v":1,"events":[{"type":"track","note":"\xff\xfe"}]}'
    (event, reason), = part.process_record(broken, 2).bad_json
    assert event == '{"type":"track","note":"\ufffd\ufffd"}'.encode() and "lacks" in reason
    late_part = PartitionSessions(SessionConfig())
    late_part.process([{"message_id": "m1", "type": "page", "user_id": "u", "timestamp": T}])
    late = (b'{"v":1,"events":[],"events":[{"message_id":"m2","type":"page","user_id":"w",'
            b'"timestamp":1,"x":"\xff"}]}')
    (event, _), = late_part.process_record(late, 3).late_json
    assert event.startswith(b'{"message_id":"m2"') and b"\xef\xbf\xbd" in event
