"""Sessionizer throughput against a raw aiokafka consume + orjson decode loop, same data, same run.

    .venv/bin/python bench/stream_throughput.py [--events N] [--per-record K]

Produces N synthetic click events to a fresh `clicks` topic, packed as the
collector's micro-batching packs them under load (envelopes of K events of one
partition), then
measures (a) a raw aiokafka consumer decoding every record and (b) the real
`clickloop worker sessionize` process over the same topic. The worker reports
its own progress (events folded, seconds from its first to its latest record),
so its start-up and rebalance are not counted, as they are not for the raw loop.
Last line: events=N sessionizer_eps=X raw_eps=Y ratio=X/Y
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import bench_settings, click_events, click_records, produce, worker_rate  # noqa: E402
from streams import topics  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402



async def raw_loop(bootstrap: str, topic: str, n: int) -> float:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    seen, first = 0, None
    try:
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if first is None and batches:
                first = time.perf_counter()
            for records in batches.values():
                for record in records:
                    seen += len(orjson.loads(record.value)["events"])
        return seen / (time.perf_counter() - first)
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--per-record", type=int, default=100,
                        help="events per Kafka record (the collector's micro-batch envelope)")
    parser.add_argument("--profile", metavar="FILE",
                        help="record the worker with py-spy into FILE (speedscope JSON)")
    parser.add_argument("--timeline", action="store_true",
                        help="print the worker's per-second progress lines")
    args = parser.parse_args()
    settings = bench_settings()
    topic = settings.topic(topics.CLICKS)
    asyncio.run(ensure_topics(settings))
    records = click_records(click_events(args.events), settings.partitions, args.per_record)
    produce_s = asyncio.run(produce(settings, topic, records))
    print(f"produced {args.events} events in {len(records)} records to {topic} "
          f"({settings.partitions} partitions) in {produce_s:.1f} s", flush=True)
    raw = asyncio.run(raw_loop(settings.kafka_bootstrap, topic, args.events))
    print(f"raw aiokafka consume+decode: {raw:,.0f} events/s", flush=True)
    sess = worker_rate(settings, "sessionize", args.events, timeout_s=60 + args.events / 500,
                       profile=args.profile,
                      timeline=args.timeline)
    print(f"sessionizer worker: {sess:,.0f} events/s", flush=True)
    print(f"events={args.events} sessionizer_eps={sess:.0f} raw_eps={raw:.0f} ratio={sess / raw:.3f}")


if __name__ == "__main__":
    main()
