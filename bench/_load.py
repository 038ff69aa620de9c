"""Load generator for bench/collector_throughput.py; runs in its own process.

    python bench/_load.py --url URL --key WRITE_KEY --events N [--batch 100] [--concurrency 16]

Builds the request bodies first (Segment batches of synthetic demo traffic,
each with sentAt, as the SDKs send them), then posts them over `concurrency`
keep-alive connections and prints one JSON line: events accepted, seconds from
the first request to the last answer, and the status codes seen.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.demo import Traffic  # noqa: E402

SEED = 11


def raw_events(n: int, seed: int = SEED) -> list[dict]:
    """The n Segment events both the collector run and the raw baseline send."""
    now = int(time.time() * 1000)
    history = 24 * 3_600_000
    traffic = Traffic(seed=seed, visitors=max(1000, n // 40))
    return [raw for _, raw in itertools.islice(traffic.stream(now - history, spread_ms=history), n)]


def bodies(events: list[dict], batch: int) -> list[tuple[int, bytes]]:
    sent_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return [(len(chunk), orjson.dumps({"batch": chunk, "sentAt": sent_at}))
            for chunk in (events[i:i + batch] for i in range(0, len(events), batch))]


async def post_all(url: str, key: str, work: list[tuple[int, bytes]], concurrency: int) -> dict:
    statuses: Counter[int] = Counter()
    accepted = 0
    queue = iter(work)
    headers = {"Content-Type": "application/json",
               "Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        async def worker() -> None:
            nonlocal accepted
            for n, body in queue:
                async with http.post(url, data=body) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                    if resp.status == 200:
                        accepted += n

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return {"events": accepted, "seconds": seconds, "statuses": {str(k): v for k, v in statuses.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5_000, help="events sent first, not timed")
    args = parser.parse_args()
    events = raw_events(args.events)
    warm = bodies(events[:args.warmup], args.batch)
    timed = bodies(events, args.batch)
    asyncio.run(post_all(args.url, args.key, warm, args.concurrency))
    print(orjson.dumps(asyncio.run(post_all(args.url, args.key, timed, args.concurrency))).decode(),
          flush=True)


if __name__ == "__main__":
    main()
