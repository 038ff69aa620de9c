"""A recommender starting on a `models` topic whose newest announcements are bad (real Kafka):
it serves the newest one that loads, and /health names what it refused."""
from __future__ import annotations

import dataclasses

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from services.model import artifact as artifacts
from services.recommender.app import make_app
from services.recommender.synthetic import announce, random_model, user_id
from streams import topics

pytestmark = pytest.mark.integration


async def send(settings, records: list[tuple[bytes, bytes]]) -> None:
    await topics.ensure_topics(settings, (topics.MODELS,))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(settings.topic(topics.MODELS), value, key=key)
    finally:
        await producer.stop()


async def test_restart_serves_the_newest_announcement_that_loads(settings):
    s = dataclasses.replace(settings, model_dir=str(settings.state_dir / "models"))
    v1 = random_model(s.model_root, "als", "v1", n_items=100, factors=8, n_users=20, seed=0)
    other = random_model(s.model_root, "other", "o1", n_items=50, factors=4, n_users=5, seed=3)
    await announce(s, v1)
    # Newer than v1: an artifact only the trainer's host reaches, a record keyed `als`
    # naming another model, and one that is not an announcement at all.
    missing = {**artifacts.announcement(v1), "version": "v2", "path": "/nowhere/als/v2"}
    await send(s, [(b"als", orjson.dumps(missing)),
                   (b"als", orjson.dumps(artifacts.announcement(other))),
                   (b"als", b"not json")])
    async with TestClient(TestServer(make_app(s, model_wait_s=10))) as client:
        health = await (await client.get("/health")).json()
        assert health["models"]["served"]["version"] == "v1", health
        error = health["model_error"]
        assert "als v2: /nowhere/als/v2" in error and "(serving als v1)" in error, error
        assert "'other' o1 under the key 'als'" in error and "unreadable announcement" in error
        body = await (await client.get("/v1/recommendations",
                                       params={"user_id": user_id(1)})).json()
        assert (body["path"], body["model"], body["model_version"]) == ("model", "als", "v1"), body
