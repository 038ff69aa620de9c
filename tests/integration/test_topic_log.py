"""The request path's fire-and-forget Kafka log (services/recommender/topic_log.py) against the
real broker: every record delivered once, on the partition `send` would pick for its key, in
order per key; a record the broker refuses (too large) dropped and counted, not the others."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from aiokafka.partitioner import DefaultPartitioner

from services.recommender.topic_log import LINGER_MS, TopicLog
from streams import topics
from tests.integration.helpers import consume

pytestmark = pytest.mark.integration


async def test_records_arrive_once_on_their_keys_partition_in_order(settings):
    s = dataclasses.replace(settings, partitions=4)
    await topics.ensure_topics(s, (topics.EXPOSURES,))
    topic = s.topic(topics.EXPOSURES)
    tlog = TopicLog(s, topic)
    batches = []
    submit = tlog._submit

    async def counted(builder, partition):
        batches.append(builder.record_count())
        await submit(builder, partition)

    tlog._submit = counted  # type: ignore[method-assign]
    tlog.start()
    n, keys = 3000, [f"visitor-{v}".encode() for v in range(37)]
    t0 = time.monotonic()
    for i in range(n):   # one at a time as requests arrive, then in bursts
        tlog.log(keys[i % len(keys)], b"%d" % i)
        if i < 1000 or i % 100 == 99:
            await asyncio.sleep(0.001)
    seconds = time.monotonic() - t0
    tlog.log(b"too-big", b"x" * (300 * 1024))   # more than a 256 KB batch: one of its own
    tlog.log(b"refused", b"x" * (2 << 20))       # more than the broker's 1 MB message limit
    tlog.log(keys[0], b"after")
    await tlog.stop()
    assert (tlog.sent, tlog.dropped) == (n + 2, 1)
    # Batched by time (LINGER_MS rounds, a batch per partition each), not one per record.
    assert sum(batches) == n + 3   # every record handed over, the refused one too
    assert len(batches) <= 4 * (seconds * 1000 / LINGER_MS + 2) + 3, batches

    records = await consume(s.kafka_bootstrap, topic, lambda rs: len(rs) >= n + 2, lambda r: r, 30)
    assert len(records) == n + 2
    partition_of = DefaultPartitioner()
    by_key: dict[bytes, list[int]] = {}
    for r in records:
        assert r.partition == partition_of(r.key, [0, 1, 2, 3], [0, 1, 2, 3])
        if r.key.startswith(b"visitor-") and r.value != b"after":
            by_key.setdefault(r.key, []).append(int(r.value))
    assert sorted(v for vs in by_key.values() for v in vs) == list(range(n)), "each once"
    assert all(vs == sorted(vs) for vs in by_key.values()), "in order per key"
    assert {r.partition for r in records} == {0, 1, 2, 3}
    last = [r for r in records if r.key == keys[0]][-1]
    assert last.value == b"after", "the records after the dropped one still go"
