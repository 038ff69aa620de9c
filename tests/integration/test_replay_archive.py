"""`clickloop replay --source archive` on the real broker: what the archive worker wrote comes
back into a backfill topic exactly (by offsets and by event time), and a dry run changes nothing."""
from __future__ import annotations

import asyncio
import dataclasses
import os

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench._common import produce
from schemas.clicks import visitor_key
from schemas.times import ms_to_iso
from services.demo import click_events, click_records
from streams import topics
from streams.archive_layout import parse
from streams.archive_store import ArchiveStore
from tests.integration.helpers import consume, eventually
from tests.integration.test_archive import row_count
from tests.integration.test_replay import replay

pytestmark = pytest.mark.integration


async def read_records(bootstrap: str, topic: str, n: int,
                       timeout_s: float = 60) -> list[tuple[int, bytes | None, bytes]]:
    """The first `n` committed records of `topic` as (partition, key, value), by partition
    and then offset."""
    got = await consume(bootstrap, topic, lambda got: len(got) >= n,
                        lambda r: (r.partition, r.offset, r.key, r.value), timeout_s)
    return [(p, k, v) for p, _, k, v in sorted(got, key=lambda r: (r[0], r[1]))]


def in_time(record: tuple[int, bytes | None, bytes], start: int, end: int):
    """What the archive's time selection makes of one live record: its events of [start, end),
    in an envelope keyed by the schemas/clicks.py rule, or None."""
    partition, _, value = record
    events = [e for e in orjson.loads(value)["events"] if start <= e["timestamp"] < end]
    if not events:
        return None
    visitors = {visitor_key(e) for e in events}
    key = visitors.pop().encode() if len(visitors) == 1 else None
    return partition, key, orjson.dumps({"v": 1, "events": events})


def archive_state(store: ArchiveStore, topic: str) -> dict[str, tuple[int, int]]:
    return {p: (os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in store.list_topic(topic)}


async def topic_names(settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def record_count(settings, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not tps:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def test_archive_replays_exactly_by_offsets_and_by_time_and_dry_runs_change_nothing(
        settings, workers):
    settings = dataclasses.replace(settings, partitions=2, archive_topics=(topics.CLICKS,),
                                   archive_max_rows=700, archive_interval_s=1)
    workers.settings = settings
    await topics.ensure_topics(settings)
    clicks = settings.topic(topics.CLICKS)
    records = click_records(click_events(6_000, seed=8), settings.partitions, per_record=25)
    await produce(settings, clicks, records)
    store = ArchiveStore(settings.archive_root)
    workers.start("archive")
    await eventually(lambda: asyncio.to_thread(row_count, store, clicks),
                     lambda n: n >= 6_000, timeout_s=60, what="every event archived")
    workers.stop()
    live = await read_records(settings.kafka_bootstrap, clicks, len(records))
    offsets = [o for p in (0, 1) for o in range(sum(r[0] == p for r in live))]   # of each record
    assert len(store.list_topic(clicks)) > 4, "several flushes and hours"

    # A dry run, and a refused processor target, change nothing.
    before = archive_state(store, clicks)
    dry = replay(settings, "--topic", "clicks", "--source", "archive", "--from-offset", "5",
                 "--to-offset", "40", "--target", "topic:clicks.dry")
    assert dry.returncode == 0, dry.stderr
    in_range = [(p, o, v) for (p, _, v), o in zip(live, offsets) if 5 <= o < 40]
    for p in (0, 1):
        events = sum(len(orjson.loads(v)["events"]) for q, _, v in in_range if q == p)
        assert f"partition {p}: offsets [5, 40) = 35 records, {events} events in" in dry.stdout, dry.stdout
    assert "dry run" in dry.stdout and "file(s) may hold the selection" in dry.stdout
    refused = replay(settings, "--topic", "clicks", "--source", "archive", "--target",
                     "processor:sessionize", "--execute")
    assert refused.returncode == 2 and "--target topic:rebuild.clicks" in refused.stderr
    assert archive_state(store, clicks) == before
    assert settings.topic("clicks.dry") not in await topic_names(settings)

    # By offsets, one partition: the very records of the live topic, byte for byte.
    out = replay(settings, "--topic", "clicks", "--source", "archive", "--from-offset", "5",
                 "--to-offset", "40", "--partitions", "1", "--target", "topic:clicks.bf1", "--execute")
    assert out.returncode == 0, out.stdout + out.stderr
    expected = [(p, k, v) for (p, k, v), o in zip(live, offsets) if p == 1 and 5 <= o < 40]
    got = await read_records(settings.kafka_bootstrap, settings.topic("clicks.bf1"), len(expected))
    assert await record_count(settings, settings.topic("clicks.bf1")) == len(expected)
    assert [(p, k) for p, k, _ in got] == [(p, k) for p, k, _ in expected]
    assert [orjson.loads(v) for _, _, v in got] == [orjson.loads(v) for _, _, v in expected]
    assert got == expected

    # By event time, bounds inside hours: envelopes keep the events of [start, end).
    times = sorted(e["timestamp"] for _, _, v in live for e in orjson.loads(v)["events"])
    start, end = times[len(times) // 4] + 1, times[len(times) * 3 // 5]
    out = replay(settings, "--topic", "clicks", "--source", "archive", "--from", ms_to_iso(start),
                 "--to", ms_to_iso(end), "--target", "topic:clicks.bf2", "--execute")
    assert out.returncode == 0, out.stdout + out.stderr
    expected = [r for r in (in_time(record, start, end) for record in live) if r is not None]
    assert sum(r[2].count(b'"message_id"') for r in expected) == sum(start <= t < end for t in times)
    got = await read_records(settings.kafka_bootstrap, settings.topic("clicks.bf2"), len(expected))
    assert await record_count(settings, settings.topic("clicks.bf2")) == len(expected)
    assert got == expected

    # A flush the archive worker has not committed (its files may be renamed only in
    # part, or deleted by its recovery) is not read.
    last = max(parse(p).range for p in store.list_topic(clicks) if parse(p).range.partition == 0)
    group = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             group_id=f"{settings.prefix}clickloop-archive")
    await group.start()
    try:
        group.assign([TopicPartition(clicks, 0)])
        await group.commit({TopicPartition(clicks, 0): last.first})
    finally:
        await group.stop()
    dry = replay(settings, "--topic", "clicks", "--source", "archive", "--partitions", "0",
                 "--target", "topic:clicks.dry")
    assert "flushes the archive worker has not committed yet are left out" in dry.stdout, dry.stdout
    assert f"partition 0: offsets [0, {last.first}) = {last.first} records" in dry.stdout
