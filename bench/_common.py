"""Shared benchmark plumbing: settings with a fresh prefix, synthetic records, producing."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import uuid

import orjson
from aiokafka import AIOKafkaProducer

from services import infra
from schemas.clicks import SCHEMA_VERSION, partition_of, visitor_key
from services.collector.ingest import to_click
from services.demo import Traffic
from services.settings import Settings


def bench_settings(partitions: int | None = None) -> Settings:
    base = Settings.from_env()
    infra.start_all(base)
    return dataclasses.replace(base, prefix=f"bench-{uuid.uuid4().hex[:8]}.",
                               partitions=partitions or base.partitions)


def click_events(n: int, seed: int = 1) -> list[dict]:
    """n synthetic `clicks` events (as the collector emits them), in event-time order."""
    now = int(time.time() * 1000)
    history = 24 * 3_600_000
    traffic = Traffic(seed=seed, visitors=max(1000, n // 40))
    return [to_click(raw, now) for _, raw in itertools.islice(
        traffic.stream(now - history, spread_ms=history), n)]


def click_records(events: list[dict], partitions: int,
                  per_record: int) -> list[tuple[int, bytes | None, bytes]]:
    """(partition, key, value) records packing `per_record` events of one partition
    each, as the collector's micro-batching packs them under load (schemas/clicks.py)."""
    buffers: dict[int, list[dict]] = {}
    records = []

    def flush(partition: int) -> None:
        batch = buffers.pop(partition)
        visitors = {visitor_key(e) for e in batch}
        key = visitors.pop().encode() if len(visitors) == 1 else None
        records.append((partition, key, orjson.dumps({"v": SCHEMA_VERSION, "events": batch})))

    for event in events:
        partition = partition_of(visitor_key(event), partitions)
        buffers.setdefault(partition, []).append(event)
        if len(buffers[partition]) >= per_record:
            flush(partition)
    for partition in list(buffers):
        flush(partition)
    return records


async def produce(settings: Settings, topic: str,
                  records: list[tuple[int, bytes | None, bytes]]) -> float:
    """Send all records (acks=all), return the seconds it took."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    t0 = time.perf_counter()
    try:
        pending = []
        for partition, key, value in records:
            pending.append(await producer.send(topic, key=key, value=value, partition=partition))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - t0
