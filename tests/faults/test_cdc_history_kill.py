"""Faults: the cdc_history worker killed with SIGKILL mid-stream, on the real broker."""
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
from bench.cdc_history import change_records, partitioned
from streams import topics
from streams.cdc_history import offline_history
from streams.history import HistoryConfig, resolve

pytestmark = pytest.mark.integration


async def test_sigkill_at_any_point_leaves_history_equal_to_the_offline_fold(settings, workers):
    """Kill the worker with SIGKILL several times mid-stream; the committed
    `history.<table>` records must be exactly those of an offline fold of the same
    records: none lost, none written twice, so the resolved history is equal too."""
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=100)
    workers.settings = settings
    cdc = topics.cdc_topic("shop", "public", "subscriptions")
    await topics.ensure_topics(settings, (cdc, topics.history_topic(cdc), topics.dlq_topic(cdc)))
    records = change_records(100_000, keys=4_000, seed=13)
    parts = partitioned(records, settings.partitions)
    cfg = HistoryConfig(max_versions=settings.history_max_versions)
    expected: list[dict] = []
    for p in range(settings.partitions):    # the worker folds each partition in its order
        expected += offline_history([r for r, (q, _, _) in zip(records, parts) if q == p], cfg)[0]
    assert len(expected) > 60_000
    await produce(settings, settings.topic(cdc), parts)

    committed = AIOKafkaConsumer(settings.topic(topics.history_topic(cdc)),
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
            proc = workers.start("cdc_history")
            # Kill only once this run has committed something, shortly after.
            deadline = time.monotonic() + 60
            while await count() == before:
                assert proc.poll() is None, workers.logs()
                assert time.monotonic() < deadline, "no progress in 60 s:\n" + workers.logs()
            await asyncio.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert await count() < len(expected), "killed after the work was done: use more events"
        workers.start("cdc_history")
        deadline = time.monotonic() + 120
        while await count() < len(expected) and time.monotonic() < deadline:
            pass
        await asyncio.sleep(2)  # anything extra would show up now
        await count()
    finally:
        await committed.stop()
    got = [orjson.loads(v) for v in seen]
    assert len(got) == len(expected), f"{len(got)} history records for {len(expected)} expected"

    def order(row: dict):
        return row["key_id"], row["revision"]

    assert sorted(got, key=order) == sorted(expected, key=order), \
        "history records differ from the offline fold (lost, doubled or changed)"
    assert resolve(got) == resolve(expected)
