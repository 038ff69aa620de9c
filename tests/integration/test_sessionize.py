"""The sessionize worker on the real broker: bad records to the DLQ, late events to clicks.late."""
from __future__ import annotations

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streams import topics
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration


async def test_bad_record_goes_to_the_dlq_with_reason_and_position_and_the_worker_carries_on(
        settings, workers):
    await topics.ensure_topics(settings)
    workers.start("sessionize")
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        clicks = settings.topic(topics.CLICKS)
        await producer.send_and_wait(clicks, key=b"x", value=b"\xffnot json")
        good = [{"message_id": f"m{i}", "type": "page", "event": None, "user_id": "dana",
                 "anonymous_id": None, "timestamp": i * 45 * 60_000, "received_at": 0,
                 "context": {}, "properties": {}} for i in range(2)]
        for event in good:
            await producer.send_and_wait(clicks, key=b"dana",
                                         value=orjson.dumps({"v": 1, "events": [event]}))
    finally:
        await producer.stop()
    (dead,) = await read_topic(settings.kafka_bootstrap, settings.topic(topics.CLICKS_DLQ),
                               lambda got: len(got) >= 1)
    assert dead["position"] == f"{clicks}[0]@0"
    assert "not JSON" in dead["error"] and dead["processor"] == "sessionize"
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
