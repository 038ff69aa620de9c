"""The sessionize worker on the real broker: bad records, late events, restarts."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import signal

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench._common import produce
from services.demo import click_events, click_records
from streams import sessionize, topics
from streams.sessions import PartitionSessions
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


def offline_sessions(records, cfg) -> list[dict]:
    """The sessions a single uninterrupted run produces: the pure core, partition by partition."""
    parts: dict[int, PartitionSessions] = {}
    closed, offsets = [], {}
    for partition, _, value in records:
        offset = offsets.get(partition, 0)
        offsets[partition] = offset + 1
        part = parts.setdefault(partition, PartitionSessions(cfg))
        closed += part.process(orjson.loads(value)["events"], offset + 1).closed
    return closed


async def test_sigkill_at_any_point_neither_loses_nor_duplicates_a_session(settings, workers):
    """Kill the worker with SIGKILL several times mid-stream; the committed `sessions`
    topic must equal an offline recomputation exactly: none lost, none twice."""
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=100,
                                   instance_id="kill-test")
    workers.settings = settings
    await topics.ensure_topics(settings)
    records = click_records(click_events(200_000, seed=11), settings.partitions, per_record=50)
    expected = offline_sessions(records, sessionize.config(settings))
    assert len(expected) > 10_000
    await produce(settings, settings.topic(topics.CLICKS), records)

    committed = AIOKafkaConsumer(settings.topic(topics.SESSIONS),
                                 bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                 auto_offset_reset="earliest", isolation_level="read_committed")
    await committed.start()
    seen: list[bytes] = []

    async def count() -> int:
        for batch in (await committed.getmany(timeout_ms=100)).values():
            seen.extend(r.value for r in batch)
        return len(seen)

    rng = random.Random(5)
    try:
        for _ in range(4):
            before = await count()
            proc = workers.start("sessionize")
            # Kill only once this run has committed something, shortly after.
            while await count() == before:
                assert proc.poll() is None, workers.logs()
            await asyncio.sleep(rng.uniform(0, 0.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert await count() < len(expected), "killed after the work was done: use more events"
        workers.start("sessionize")
        deadline = asyncio.get_running_loop().time() + 120
        while await count() < len(expected) and asyncio.get_running_loop().time() < deadline:
            pass
        await asyncio.sleep(2)  # anything extra would show up now
        await count()
    finally:
        await committed.stop()
    got = [orjson.loads(v) for v in seen]
    ids = [s["session_id"] for s in got]
    assert len(ids) == len(set(ids)), "a session was emitted twice"
    assert sorted(got, key=lambda s: s["session_id"]) == \
        sorted(expected, key=lambda s: s["session_id"]), "sessions differ from the offline run"
