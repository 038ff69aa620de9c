"""Feature freshness: a click accepted by the collector → the feature visible in Redis.

    .venv/bin/python bench/freshness.py [--rate 5000] [--seconds 30] [--probes-per-s 20]

Starts the real collector (`clickloop serve collector`) and the real features
worker (`clickloop worker features`), each in its own process, with a fresh
topic/key prefix. A load generator in a third process posts synthetic Segment
traffic (bench/_load.py's events) at `--rate` events/s, paced, in batches of
`--batch`. Meanwhile this process posts probes: each is one `Product Viewed`
event of a visitor never seen before, in a request of its own. A probe's
freshness is the time from the collector's 2xx (the event is in Kafka,
acks=all) to the first moment its visitor's hash `user:<visitor>` holds
`activity:last_seen`, polled with one pipelined HEXISTS over all outstanding
probes every `--poll-ms`. The probes count as events of the load.
Last line: events=N rate=R p50_ms=X p99_ms=Y
(N: events accepted, the load (which runs 4 s longer than the probes, around them) and
the probes; R: the load's achieved rate in events per second.)
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import bench_settings  # noqa: E402
from bench.collector_throughput import KEY, free_port, start_collector  # noqa: E402
from streams import topics  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402

HERE = Path(__file__).resolve()


def auth_headers() -> dict:
    return {"Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}


# ---- the load generator (its own process: `freshness.py --load ...`) ----------------------

async def paced_load(url: str, rate: float, seconds: float, batch: int, concurrency: int) -> dict:
    """Post `rate` events/s for `seconds`, batch k due at start + k * batch / rate."""
    from bench._load import raw_events

    n = int(rate * seconds)
    events = raw_events(n)
    bodies = [(len(c), orjson.dumps({"batch": c})) for c in (events[i:i + batch]
                                                              for i in range(0, n, batch))]
    statuses: dict[int, int] = {}
    accepted = 0
    queue: asyncio.Queue = asyncio.Queue(maxsize=concurrency * 2)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=auth_headers()) as http:
        async def worker() -> None:
            nonlocal accepted
            while (item := await queue.get()) is not None:
                count, body = item
                async with http.post(url, data=body) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    if resp.status == 200:
                        accepted += count

        workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        t0 = time.perf_counter()
        interval = batch / rate
        for k, item in enumerate(bodies):
            delay = t0 + k * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await queue.put(item)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - t0
    return {"events": accepted, "seconds": elapsed, "statuses": {str(k): v for k, v in statuses.items()}}


# ---- probes --------------------------------------------------------------------------------

def probe_body(visitor: str, item: str) -> bytes:
    return orjson.dumps({"batch": [{
        "type": "track", "event": "Product Viewed", "userId": visitor,
        "messageId": uuid.uuid4().hex, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "properties": {"item_id": item}}]})


async def run_probes(settings, url: str, seconds: float, per_s: float, poll_ms: float,
                     timeout_s: float = 10.0) -> tuple[list[float], int, int, list[float]]:
    """Freshness of each probe in ms (user hash); probes accepted; probes not seen within
    timeout_s; freshness of the probes' item hashes (they pass through FEATURES_ITEMS)."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    # redis key -> (perf_counter at the collector's 2xx, field to wait for, list to add to)
    outstanding: dict[str, tuple[float, str, list]] = {}
    latencies: list[float] = []
    item_latencies: list[float] = []
    timeline.clear()
    lost = 0
    done = asyncio.Event()

    async def poll() -> None:
        nonlocal lost
        while not (done.is_set() and not outstanding):
            if outstanding:
                keys = list(outstanding)
                pipe = redis.pipeline(transaction=False)
                for k in keys:
                    pipe.hexists(k, outstanding[k][1])
                found = await pipe.execute()
                seen_at = time.perf_counter()
                for k, hit in zip(keys, found):
                    accepted_at, _, into = outstanding[k]
                    if hit:
                        into.append((seen_at - accepted_at) * 1000)
                        if into is latencies:
                            timeline.append((accepted_at, into[-1]))
                        del outstanding[k]
                    elif seen_at - accepted_at > timeout_s:
                        del outstanding[k]
                        lost += 1
            await asyncio.sleep(poll_ms / 1000)

    accepted = 0
    poller = asyncio.ensure_future(poll())
    try:
        async with aiohttp.ClientSession(headers=auth_headers()) as http:
            async def probe() -> None:
                nonlocal accepted
                tag = uuid.uuid4().hex[:12]
                async with http.post(url, data=probe_body(f"probe-{tag}", f"probe-item-{tag}")) as resp:
                    await resp.read()
                    if resp.status == 200:
                        t = time.perf_counter()
                        outstanding[settings.redis_key("user", f"probe-{tag}")] = \
                            (t, "activity:last_seen", latencies)
                        outstanding[settings.redis_key("item", f"probe-item-{tag}")] = \
                            (t, "engagement:views_1h", item_latencies)
                        accepted += 1

            tasks = []
            t0 = time.perf_counter()
            for k in range(int(seconds * per_s)):
                delay = t0 + k / per_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(probe()))
            await asyncio.gather(*tasks)
        done.set()
        await poller
    finally:
        await redis.aclose()
    return latencies, accepted, lost, item_latencies


timeline: list[tuple[float, float]] = []    # (accepted at, ms) of every user probe


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_worker(settings, logfile: Path) -> subprocess.Popen:
    env = {**os.environ, **settings.as_env()}
    return subprocess.Popen([sys.executable, "-m", "services.cli", "worker", "features"], env=env,
                            stdout=open(logfile, "w"), stderr=subprocess.STDOUT)


async def wait_ready(settings, url: str, timeout_s: float = 90) -> None:
    """Until one probe comes through end to end (the worker has joined and opened its state)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latencies, _, _, _ = await run_probes(settings, url, seconds=0.5, per_s=2, poll_ms=20,
                                           timeout_s=5)
        if latencies:
            return
    raise SystemExit(f"no probe reached Redis in {timeout_s} s: is the features worker running?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000, help="events per second of load")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--batch", type=int, default=50, help="events per load request")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--probes-per-s", type=float, default=20)
    parser.add_argument("--poll-ms", type=float, default=5)
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)  # the load process
    args = parser.parse_args()
    if args.load:
        result = asyncio.run(paced_load(args.load, args.rate, args.seconds, args.batch,
                                        args.concurrency))
        print(orjson.dumps(result).decode(), flush=True)
        return

    settings = bench_settings()
    asyncio.run(ensure_topics(settings, (topics.CLICKS, topics.CLICKS_DLQ, topics.SESSIONS,
                                         topics.SESSIONS_DLQ, topics.FEATURES_ITEMS,
                                         topics.FEATURES_STATE)))
    log = settings.state_dir / f"{settings.prefix}features-worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    worker = start_worker(settings, log)
    port = free_port()
    collector = start_collector(settings, port)
    url = f"http://127.0.0.1:{port}/v1/batch"
    try:
        asyncio.run(wait_ready(settings, url))
        load = subprocess.Popen([sys.executable, str(HERE), "--load", url, "--rate", str(args.rate),
                                 "--seconds", str(args.seconds + 4), "--batch", str(args.batch),
                                 "--concurrency", str(args.concurrency)],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(2)       # the load generator builds its events, then runs at rate
        latencies, probes, lost, items = asyncio.run(run_probes(settings, url, args.seconds,
                                                         args.probes_per_s, args.poll_ms))
        out, _ = load.communicate(timeout=args.seconds + 120)
        result = orjson.loads(out.strip().splitlines()[-1])
        if worker.poll() is not None:
            raise SystemExit(f"the features worker exited ({worker.returncode}); see {log}")
    finally:
        collector.terminate()
        worker.terminate()
        collector.wait(timeout=30)
        worker.wait(timeout=30)
    events = result["events"] + probes
    rate = result["events"] / result["seconds"]
    print(f"load: {result}", flush=True)
    print(f"probes: {probes} accepted, {len(latencies)} seen in Redis, {lost} not within 10 s; "
          f"max {max(latencies):.1f} ms", flush=True)
    slow = sorted(timeline, key=lambda t: -t[1])[:5]
    t0 = min(t for t, _ in timeline) if timeline else 0.0
    print("slowest probes (s into the run, ms): " +
          ", ".join(f"{t - t0:.1f}s {ms:.0f}" for t, ms in sorted(slow)), flush=True)
    if items:
        print(f"item hashes (through the FEATURES_ITEMS repartition, committed every "
              f"{settings.features_commit_ms} ms): p50_ms={percentile(items, 0.5):.1f} "
              f"p99_ms={percentile(items, 0.99):.1f}", flush=True)
    if lost or not latencies:
        raise SystemExit(f"{lost} probes never reached Redis; see {log}")
    print(f"events={events} rate={rate:.0f} p50_ms={percentile(latencies, 0.5):.1f} "
          f"p99_ms={percentile(latencies, 0.99):.1f}")


if __name__ == "__main__":
    main()
