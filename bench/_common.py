"""Shared benchmark plumbing: settings with a fresh prefix, synthetic records, producing."""
from __future__ import annotations

import argparse
import asyncio
import atexit
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

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
    # Killed by `timeout` or a terminal (SIGTERM, SIGHUP): exit normally instead, so the
    # `finally` blocks stop the bench's processes and atexit drops its topics (a killed
    # run used to leave them on the shared broker).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
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


PROGRESS = re.compile(r"progress events=(\d+) span_s=([\d.]+)")


def worker_rate(settings: Settings, processor: str, n: int, timeout_s: float,
                profile: str | None = None, timeline: bool = False, settle_s: float = 0.0,
                spy_subprocesses: bool = False) -> float:
    """Run `clickloop worker <processor>` (under py-spy into `profile` when given) until its
    progress lines report `n` events; its events/s from its first to its latest record, as
    the worker measures it (start-up and rebalance not counted, as for a raw loop).
    `settle_s`: keep it running that long after, e.g. for a checkpoint to commit;
    `spy_subprocesses`: profile the worker's child processes too."""
    env = {**os.environ, **settings.as_env()}
    spy = [str(Path(sys.executable).with_name("py-spy")), "record", "--rate", "250",
           *(["--subprocesses"] if spy_subprocesses else []), "--format", "speedscope",
           "-o", profile, "--"] if profile else []
    proc = subprocess.Popen([*spy, sys.executable, "-m", "services.cli", "worker", processor],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    tail: list[str] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            tail = (tail + [line])[-20:]
            match = PROGRESS.search(line)
            if timeline and match:
                print("  " + line.strip(), flush=True)
            if match and int(match.group(1)) >= n:
                time.sleep(settle_s)
                return int(match.group(1)) / float(match.group(2))
            if time.monotonic() > deadline:
                break
        raise SystemExit(f"{processor} worker did not finish:\n" + "".join(tail))
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
        proc.wait(timeout=30)
