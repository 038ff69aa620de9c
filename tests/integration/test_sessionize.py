"""The sessionize worker on the real broker: bad records to the DLQ, late events to clicks.late,
visitors idle past retention forgotten (tombstones in the changelog)."""
from __future__ import annotations

import base64
import dataclasses
import hashlib

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streams import topics
from tests.integration.helpers import read_records, read_topic

pytestmark = pytest.mark.integration
BIG = b"{" + b"x" * 900_000   # not JSON either


async def test_bad_record_goes_to_the_dlq_with_reason_and_position_and_the_worker_carries_on(
        settings, workers):
    await topics.ensure_topics(settings)
    workers.start("sessionize")
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        clicks = settings.topic(topics.CLICKS)
        await producer.send_and_wait(clicks, key=b"x", value=b"\xffnot json")
        # Near the broker's 1 MB limit: its dead-letter copy, base64, would be over it.
        await producer.send_and_wait(clicks, key=b"big", value=BIG)
        good = [{"message_id": f"m{i}", "type": "page", "event": None, "user_id": "dana",
                 "anonymous_id": None, "timestamp": i * 45 * 60_000, "received_at": 0,
                 "context": {}, "properties": {}} for i in range(2)]
        for event in good:
            await producer.send_and_wait(clicks, key=b"dana",
                                         value=orjson.dumps({"v": 1, "events": [event]}))
    finally:
        await producer.stop()
    dead, big = await read_topic(settings.kafka_bootstrap, settings.topic(topics.CLICKS_DLQ),
                                 lambda got: len(got) >= 2)
    assert dead["position"] == f"{clicks}[0]@0"
    assert "not JSON" in dead["error"] and dead["processor"] == "sessionize"
    assert base64.b64decode(dead["value_b64"]) == b"\xffnot json" and not dead["truncated"]
    assert big["position"] == f"{clicks}[0]@1" and big["truncated"]
    assert big["value_bytes"] == len(BIG) and big["value_sha256"] == hashlib.sha256(BIG).hexdigest()
    assert BIG.startswith(base64.b64decode(big["value_b64"]))
    # The next records were processed: the first session closed when the second began.
    (session,) = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS),
                                  lambda got: len(got) >= 1)
    assert session["visitor"] == "dana" and session["event_count"] == 1


async def test_an_event_later_than_the_grace_goes_to_clicks_late_with_the_reason(settings, workers):
    await topics.ensure_topics(settings)
    workers.start("sessionize")
    minute = 60_000

    def event(mid: str, user: str, minutes: int) -> bytes:
        return orjson.dumps({"v": 1, "events": [{
            "message_id": mid, "type": "page", "user_id": user, "anonymous_id": None,
            "timestamp": minutes * minute, "received_at": 0, "context": {}, "properties": {}}]})

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        clicks = settings.topic(topics.CLICKS)
        await producer.send_and_wait(clicks, key=b"ann", value=event("a1", "ann", 100))
        await producer.send_and_wait(clicks, key=b"bob", value=event("b1", "bob", 200))
        # 150 minutes behind the watermark: far past gap + grace (40 min).
        await producer.send_and_wait(clicks, key=b"cat", value=event("c1", "cat", 50))
    finally:
        await producer.stop()
    (late,) = await read_topic(settings.kafka_bootstrap, settings.topic(topics.CLICKS_LATE),
                               lambda got: len(got) >= 1)
    assert late["event"]["message_id"] == "c1"
    assert late["position"] == f"{clicks}[0]@2" and late["watermark"] == 200 * minute
    assert "gap + grace" in late["reason"]


async def test_an_event_stamped_after_its_record_allows_goes_to_the_dlq_and_moves_no_watermark(
        settings, workers):
    """A producer other than the collector (which bounds event times) writes an event a
    year ahead: believed, it would move the watermark a year on and close every open
    session, and every later event would be late. It is dead-lettered with the reason;
    the session around it goes on."""
    import time

    await topics.ensure_topics(settings)
    workers.start("sessionize")
    now, minute = int(time.time() * 1000), 60_000

    def event(mid: str, ts: int) -> bytes:
        return orjson.dumps({"v": 1, "events": [{
            "message_id": mid, "type": "page", "user_id": "eve", "anonymous_id": None,
            "timestamp": ts, "received_at": now, "context": {}, "properties": {}}]})

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        clicks = settings.topic(topics.CLICKS)
        for mid, ts in (("e1", now - 10 * minute), ("e2", now + 365 * 24 * 60 * minute),
                        ("e3", now - 5 * minute), ("e4", now + 2 * 60 * minute)):
            await producer.send_and_wait(clicks, key=b"eve", value=event(mid, ts))  # stamped now
    finally:
        await producer.stop()
    dead = await read_topic(settings.kafka_bootstrap, settings.topic(topics.CLICKS_DLQ),
                            lambda got: len(got) >= 2)
    assert [orjson.loads(base64.b64decode(d["value_b64"]))["message_id"] for d in dead] == ["e2", "e4"]
    assert all("CLICKLOOP_MAX_CLOCK_AHEAD_S" in d["error"] for d in dead)
    assert [d["position"] for d in dead] == [f"{clicks}[0]@1", f"{clicks}[0]@3"]
    # e1 and e3 are one open session: nothing closed it, nothing was late (the DLQ records
    # came in the transactions that would have carried either).
    for topic in (topics.SESSIONS, topics.CLICKS_LATE):
        with pytest.raises(TimeoutError):
            await read_topic(settings.kafka_bootstrap, settings.topic(topic),
                             lambda got: len(got) >= 1, timeout_s=3)


async def test_a_visitor_idle_past_retention_is_a_tombstone_and_starts_again_at_index_1(
        settings, workers):
    """Retention 2 h of event time: the idle visitor's changelog entry becomes a
    tombstone, and after a restart (state from the changelog) it is a new visitor,
    while one within retention keeps its index."""
    settings = dataclasses.replace(settings, instance_id="retention-test")
    workers.settings = settings
    await topics.ensure_topics(settings)
    retention = {"CLICKLOOP_SESSION_RETENTION_S": "7200"}
    minute = 60_000
    clicks, changelog = settings.topic(topics.CLICKS), settings.topic(topics.SESSIONIZE_STATE)

    def event(user: str, minutes: int) -> bytes:
        return orjson.dumps({"v": 1, "events": [{
            "message_id": f"{user}-{minutes}", "type": "page", "user_id": user,
            "anonymous_id": None, "timestamp": minutes * minute, "received_at": 0,
            "context": {}, "properties": {}}]})

    async def send(*events: tuple[str, int]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for user, minutes in events:
                await producer.send_and_wait(clicks, key=user.encode(), value=event(user, minutes))
        finally:
            await producer.stop()

    workers.start("sessionize", **retention)
    # eve's one session ends at 0 and closes at 60; at 200 she has been idle 200 min > 2 h.
    # fay's session at 60 closes at 200 too, but fay has a session open from 200.
    await send(("eve", 0), ("fay", 60), ("fay", 200))
    entries = await read_records(settings.kafka_bootstrap, changelog,
                                 lambda got: (b"eve", None) in got)
    assert [value for key, value in entries if key == b"eve"][-1] is None
    assert (b"fay", None) not in entries

    workers.stop()
    workers.start("sessionize", **retention)      # state comes back from the changelog only
    await send(("eve", 210), ("gus", 300))
    sessions = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS),
                                lambda got: len(got) >= 4)
    sessions.sort(key=lambda s: s["start"])
    assert [(s["visitor"], s["start"] // minute, s["session_index"]) for s in sessions] == [
        ("eve", 0, 1), ("fay", 60, 1), ("fay", 200, 2), ("eve", 210, 1)]
    assert sessions[2]["previous_session_id"] == sessions[1]["session_id"]
    assert sessions[3]["previous_session_id"] is None
