"""Replay throughput from the Parquet archive: archive N events, then replay them into a topic.

    .venv/bin/python bench/replay_throughput.py [--events N] [--per-record K] [--profile FILE]

Produces N synthetic click events to a fresh `clicks` topic (envelopes of K
events, as the collector packs them), archives them with the real `clickloop
worker archive` (bench/archive_throughput.py, `archive_topic`), then runs the
real `clickloop replay --source archive --target topic:clicks.replayed
--execute` and takes the rate from its summary: from the start of planning
(listing and tallying the files) to the last acknowledged record, process
start-up excluded. The target topic is then read back: it must hold exactly the
N events, in as many records as the source.
Last line: events=N archive_eps=X replay_eps=Y
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import bench_arguments, click_events, click_records, produce  # noqa: E402
from bench.archive_throughput import archive_settings, archive_topic  # noqa: E402
from services.settings import Settings  # noqa: E402
from streams import topics  # noqa: E402
from streams.codec import decode_clicks  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402

TARGET = "clicks.replayed"
SUMMARY = re.compile(r"replayed (\d+) records \((\d+) events, .*\) into \S+ in ([\d.]+) s")


def replay(settings: Settings, profile: str | None) -> tuple[int, int, float]:
    """Run `clickloop replay` from the archive into TARGET; (records, events, seconds)."""
    spy = [str(Path(sys.executable).with_name("py-spy")), "record", "--subprocesses", "--format",
           "speedscope", "-o", profile, "--"] if profile else []
    out = subprocess.run([*spy, sys.executable, "-m", "services.cli", "replay", "--topic", topics.CLICKS,
                          "--source", "archive", "--target", f"topic:{TARGET}", "--execute"],
                         env={**os.environ, **settings.as_env()}, capture_output=True, text=True)
    print(out.stdout, end="", flush=True)
    match = SUMMARY.search(out.stdout)
    if out.returncode or match is None:
        raise SystemExit(f"replay failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}")
    return int(match.group(1)), int(match.group(2)), float(match.group(3))


async def count(settings: Settings, topic: str) -> tuple[int, int]:
    """(records, events) on `topic`, every record decoded."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records = events = 0
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            for batch in (await consumer.getmany(timeout_ms=1000, max_records=2000)).values():
                records += len(batch)
                events += sum(len(decode_clicks(r.value)) for r in batch)
        return records, events
    finally:
        await consumer.stop()


def main() -> None:
    args = bench_arguments(__doc__, 1_000_000, "the replay").parse_args()
    settings = archive_settings()
    archive_dir = settings.archive_root
    asyncio.run(ensure_topics(settings))
    records = click_records(click_events(args.events), settings.partitions, args.per_record)
    produce_s = asyncio.run(produce(settings, settings.topic(topics.CLICKS), records))
    print(f"produced {args.events} events in {len(records)} records in {produce_s:.1f} s", flush=True)
    try:
        archive_eps = archive_topic(settings, args.events)
        print(f"archive worker: {archive_eps:,.0f} events/s into {archive_dir}", flush=True)
        replayed, events, seconds = replay(settings, args.profile)
    finally:
        shutil.rmtree(archive_dir, ignore_errors=True)
    on_topic = asyncio.run(count(settings, settings.topic(TARGET)))
    print(f"{settings.topic(TARGET)} holds {on_topic[0]} records, {on_topic[1]} events", flush=True)
    if on_topic != (len(records), args.events) or (replayed, events) != on_topic:
        raise SystemExit(f"expected {len(records)} records and {args.events} events, the replay "
                         f"reported {replayed} and {events}, the topic holds {on_topic}")
    print(f"events={args.events} archive_eps={archive_eps:.0f} replay_eps={events / seconds:.0f}")


if __name__ == "__main__":
    main()
