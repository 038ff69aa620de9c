"""Bad input gets a clear error and loses nothing: HTTP 4xx, or the DLQ with the position."""
from __future__ import annotations

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from services.collector.app import make_app as collector_app
from services.recommender.app import make_app as recommender_app
from streams import topics
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("data,status,message", [
    (b"{not json", 400, "not valid JSON"),
    (orjson.dumps({"batch": [{"type": "track", "userId": "u"}]}), 400, "must contain ['event']"),
    (orjson.dumps({"batch": [{"type": "page", "userId": "u", "properties": {"x": "y" * 600_000}}]}),
     413, "larger than"),
])
async def test_collector_refuses_bad_bodies_with_the_reason(settings, data, status, message):
    async with TestClient(TestServer(collector_app(settings))) as client:
        resp = await client.post("/v1/batch", data=data)
        body = await resp.json()
    assert resp.status == status
    assert body["success"] is False and message in body["error"]


@pytest.mark.parametrize("query,message", [
    ({}, "user_id or anonymous_id"),
    ({"user_id": "u", "k": "x"}, "not a whole number"),
    ({"user_id": "u", "k": "0"}, "between 1 and 100"),
])
async def test_recommender_refuses_bad_queries(settings, query, message):
    async with TestClient(TestServer(recommender_app(settings))) as client:
        resp = await client.get("/v1/recommendations", params=query)
        assert resp.status == 400 and message in (await resp.json())["error"]


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
