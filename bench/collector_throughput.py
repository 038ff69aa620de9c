"""Collector throughput against a raw aiokafka producer, same events, same run.

    .venv/bin/python bench/collector_throughput.py [--events N] [--batch 100] [--concurrency 16]
                                                   [--workers N]

(a) Starts the real collector (`clickloop serve collector`, its own process)
and posts N synthetic Segment events in batches of `--batch` from a load
generator in a third process (bench/_load.py); collector_eps counts events
answered 200, i.e. acknowledged by the broker (acks=all, idempotent producer),
from the first request to the last answer. `--workers N`: the collector runs
N processes on its port (CLICKLOOP_COLLECTOR_WORKERS).
(b) Sends the same N events, enriched as the collector enriches them, with a
raw aiokafka producer (acks=all, idempotent, linger 5 ms, 256 KB batches), one
record per event keyed by visitor: the best a Python producer does without
the collector's packing, and with no HTTP, parsing or enrichment to pay for.
Last line: events=N collector_eps=X raw_eps=Y ratio=X/Y
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import bench_settings  # noqa: E402
from bench._load import raw_events  # noqa: E402
from services.infra import free_port  # noqa: E402
from schemas.clicks import visitor_key  # noqa: E402
from services.collector.ingest import to_click  # noqa: E402
from streams import topics  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402

KEY = "bench-write-key"
RAW_TOPIC = "clicks.rawbench"
HERE = Path(__file__).resolve().parent


def start_collector(settings, port: int, workers: int = 1) -> subprocess.Popen:
    env = {**os.environ, **settings.as_env(), "CLICKLOOP_COLLECTOR_PORT": str(port),
           "CLICKLOOP_WRITE_KEYS": KEY, "CLICKLOOP_COLLECTOR_WORKERS": str(workers)}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "collector"], env=env)
    ready: set[int] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                if resp.status == 200:
                    ready.add(orjson.loads(resp.read())["worker"]["pid"])
                    if len(ready) == workers:  # each worker's producer connected
                        return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"collector exited with code {proc.returncode}")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("collector did not become healthy in 60 s")


def collector_run(settings, events: int, batch: int, concurrency: int, workers: int) -> float:
    port = free_port()
    proc = start_collector(settings, port, workers)
    try:
        out = subprocess.run([sys.executable, str(HERE / "_load.py"),
                              "--url", f"http://127.0.0.1:{port}/v1/batch", "--key", KEY,
                              "--events", str(events), "--batch", str(batch),
                              "--concurrency", str(concurrency)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = orjson.loads(out.strip().splitlines()[-1])
    print(f"collector: {result}", flush=True)
    if result["events"] != events:
        raise SystemExit(f"collector accepted {result['events']} of {events} events: {result}")
    return result["events"] / result["seconds"]


async def raw_run(settings, events: int) -> float:
    now = int(time.time() * 1000)
    records = [(visitor_key(e).encode(), orjson.dumps(e))
               for e in (to_click(raw, now) for raw in raw_events(events))]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    topic = settings.topic(RAW_TOPIC)
    try:
        t0 = time.perf_counter()
        pending = []
        for key, value in records:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return events / (time.perf_counter() - t0)
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=100, help="events per request")
    parser.add_argument("--concurrency", type=int, default=16, help="load generator connections")
    parser.add_argument("--workers", type=int, default=1, help="collector processes (default 1)")
    args = parser.parse_args()
    settings = bench_settings()
    asyncio.run(ensure_topics(settings, (topics.CLICKS, topics.CLICKS_DLQ, RAW_TOPIC)))
    collector = collector_run(settings, args.events, args.batch, args.concurrency, args.workers)
    print(f"collector (HTTP → enriched → acks=all): {collector:,.0f} events/s", flush=True)
    raw = asyncio.run(raw_run(settings, args.events))
    print(f"raw aiokafka producer, one record per event: {raw:,.0f} events/s", flush=True)
    print(f"workers={args.workers} events={args.events} collector_eps={collector:.0f} raw_eps={raw:.0f} "
          f"ratio={collector / raw:.2f}")


if __name__ == "__main__":
    main()
