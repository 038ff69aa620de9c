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
from services.collector.ingest import by_visitor, to_click
from services.demo import Traffic
from services.settings import Settings


def bench_settings(partitions: int | None = None) -> Settings:
    base = Settings.from_env()
    infra.start_all(base)
    return dataclasses.replace(base, prefix=f"bench-{uuid.uuid4().hex[:8]}.",
                               partitions=partitions or base.partitions)


def click_records(n: int, request_size: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """(key, value) records for n events, packed exactly as the collector packs
    requests of `request_size` events (one record per visitor per request)."""
    now = int(time.time() * 1000)
    history = 24 * 3_600_000
    traffic = Traffic(seed=seed, visitors=max(1000, n // 40))
    events = (to_click(raw, now) for _, raw in itertools.islice(
        traffic.stream(now - history, spread_ms=history), n))
    records = []
    while True:
        chunk = list(itertools.islice(events, request_size))
        if not chunk:
            return records
        records += [(k.encode(), orjson.dumps(r)) for k, r in by_visitor(chunk).items()]


async def produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    """Send all records (acks=all), return the seconds it took."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    t0 = time.perf_counter()
    try:
        pending = []
        for key, value in records:
            pending.append(await producer.send(topic, key=key, value=value))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - t0
