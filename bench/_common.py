"""Shared benchmark plumbing: settings with a fresh prefix, synthetic records, producing."""
from __future__ import annotations

import argparse
import asyncio
import atexit
import dataclasses
import time
import uuid

import orjson
from aiokafka import AIOKafkaProducer

from services import infra
from services.demo import click_events, click_records  # noqa: F401 (re-exported for benches)
from services.settings import Settings
from streams.topics import drop_topics


def bench_settings(partitions: int | None = None) -> Settings:
    """Settings with a fresh topic prefix; the run's topics are deleted when it exits."""
    base = Settings.from_env()
    infra.start_all(base)
    settings = dataclasses.replace(base, prefix=f"bench-{uuid.uuid4().hex[:8]}.",
                                   partitions=partitions or base.partitions)
    atexit.register(lambda: asyncio.run(drop_topics(settings)))
    return settings


def bench_arguments(doc: str, events: int, profiled: str) -> argparse.ArgumentParser:
    """The options every throughput benchmark takes: --events, --per-record, --profile."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--events", type=int, default=events)
    parser.add_argument("--per-record", type=int, default=100,
                        help="events per Kafka record (the collector's micro-batch envelope)")
    parser.add_argument("--profile", metavar="FILE",
                        help=f"record {profiled} with py-spy into FILE (speedscope JSON)")
    return parser


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
