"""Faults: the sessionize worker killed with SIGKILL mid-stream, on the real broker."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import time

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from bench._common import produce
from services.demo import click_events, click_records
from streams import sessionize, topics
from tests.integration.helpers import offline_sessions

pytestmark = pytest.mark.integration


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
            deadline = time.monotonic() + 60
            while await count() == before:
                assert proc.poll() is None, workers.logs()
                assert time.monotonic() < deadline, "no progress in 60 s:\n" + workers.logs()
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
