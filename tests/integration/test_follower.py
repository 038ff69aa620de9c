"""The recommender's topic follower against the real broker: a failure is reported while
it lasts and cleared once the feed is back and caught up."""
from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from services.recommender.follower import TopicFollower
from streams import topics
from tests.integration.helpers import eventually

pytestmark = pytest.mark.integration


async def test_a_feed_error_is_shown_until_the_feed_recovers(settings):
    await topics.ensure_topics(settings, (topics.MODELS,))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    await producer.send_and_wait(settings.topic(topics.MODELS), b"x", key=b"als")
    await producer.stop()
    folded: list[bytes] = []
    failures = [RuntimeError("broker went away")]   # the first fold fails, as a lost fetch would

    def fold(records) -> bool:
        if failures:
            raise failures.pop()
        folded.extend(r.value for r in records)
        return True

    follower = TopicFollower(settings, (topics.MODELS,), fold, lambda: None, "models topic")
    errors: list[str | None] = []

    async def watch() -> None:
        while True:
            if not errors or errors[-1] != follower.error:
                errors.append(follower.error)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        assert await follower.start(30)
        await eventually(lambda: asyncio.sleep(0, follower.error), lambda e: e is None, 10,
                         "the error cleared")
    finally:
        watcher.cancel()
        await follower.stop()
    assert folded == [b"x"], "the record was read again after the reopen"
    assert any(e and "broker went away" in e and e.startswith("models topic") for e in errors), errors
    assert follower.error is None
