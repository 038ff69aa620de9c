"""Bandit allocation in the recommender: the per-request cost, and how fast rewards reach it.

    .venv/bin/python bench/bandit.py [--requests 200000] [--arms 10] [--bursts 8] [--burst 200]

(1) alloc_us: the recommender's own decision (`services.recommender.experiments.
    Allocation.decide`) for one running Thompson experiment with `--arms` arms on
    a posterior snapshot, timed in-process with timeit over `--requests`
    requests of distinct users (each a fresh draw plus an entry in the sticky
    map, which is full and evicting after 100,000: the worst case; a sticky
    repeat is cheaper and printed too). Best of 5 runs, microseconds per request.
(2) propagation_s: the real bandits worker (`clickloop worker bandits`) and the
    real recommender (`clickloop serve recommender`) run in their own processes
    on bench settings (a fresh topic prefix, `posterior_publish_ms` at its
    setting, default 1000). A running Thompson experiment is written to
    `experiments`. Each of `--bursts` bursts is `--burst` rewards of 1 for one
    arm produced to `rewards` (key = experiment id, acks=all); its propagation
    is the time from the last acknowledgement of the burst until the
    recommender's `GET /v1/experiments` shows the allocation on a snapshot that
    folds all of them in (polled every 5 ms). Bursts start at random phases of
    the publish interval (sleeps of 0.1-1.6 s), because the worker publishes
    at most once per interval: a burst right after a publish waits for the
    next. propagation_s is the worst burst; the median is printed above it.
    Finally `--share-requests` requests of new users show the allocation share
    of the rewarded arm.

Targets (issue 6): alloc_us <= 20, propagation_s <= 2.
Last line: alloc_us=X propagation_s=Y
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import bench_settings  # noqa: E402
from bench.serve_latency import free_port, http_json, start_service  # noqa: E402
from services.recommender.experiments import Allocation  # noqa: E402
from services.recommender.request import Query  # noqa: E402
from streams import topics  # noqa: E402

PYTHON = sys.executable
EXPERIMENT = "bench-bandit"


def experiment_record(arms: list[str]) -> dict:
    now = int(time.time() * 1000)
    return {"v": 1, "revision": 1, "id": EXPERIMENT, "name": "bench", "owner": "bench",
            "hypothesis": "bench", "surface": "home.recommendations", "population": {},
            "unit": "user_id",
            "arms": [{"name": a, "weight": 1.0, "description": None} for a in arms],
            "kind": "thompson", "epsilon": None, "primary_metric": "click_through", "start": now,
            "planned_end": now + 86_400_000, "ended": None, "status": "running",
            "namespace": None, "updated": now}


def alloc_cost(n_arms: int, requests: int) -> tuple[float, float]:
    """(µs per fresh decision, µs per sticky repeat) through Allocation.decide."""
    arms = [f"arm-{i}" for i in range(n_arms)]
    rng = random.Random(1)
    snap = {"experiment": EXPERIMENT, "version": 5, "arms": arms,
            "alpha": [1.0 + rng.randint(0, 50) for _ in arms],
            "beta": [1.0 + rng.randint(100, 900) for _ in arms]}
    queries = [Query(f"u{i}", f"u{i}", None, 10, True) for i in range(requests)]

    def run(alloc: Allocation) -> None:
        decide = alloc.decide
        for i, q in enumerate(queries):
            decide(q, i)

    def fresh_alloc() -> Allocation:
        a = Allocation("home.recommendations", 3_600_000)
        a.update([experiment_record(arms)], {EXPERIMENT: snap})
        return a

    fresh = min(timeit.repeat(lambda: run(fresh_alloc()), number=1, repeat=5)) / requests * 1e6
    warm = fresh_alloc()
    run(warm)                                   # fills the sticky map (its last 100,000 units)
    tail = queries[-50_000:]

    def repeat() -> None:
        for q in tail:
            warm.decide(q, 1)

    sticky = min(timeit.repeat(repeat, number=1, repeat=5)) / len(tail) * 1e6
    return fresh, sticky


async def propagation(settings, port: int, arms: list[str], bursts: int, burst: int,
                      share_requests: int) -> tuple[list[float], float]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=2)
    await producer.start()
    rewards_topic = settings.topic(topics.REWARDS)
    target = arms[3 % len(arms)]
    seq = 0

    async def send_burst(arm: str, n: int) -> float:
        nonlocal seq
        now = int(time.time() * 1000)
        futs = []
        for _ in range(n):
            seq += 1
            r = {"v": 1, "request_id": f"bench-{seq}", "experiment": EXPERIMENT, "arm": arm,
                 "visitor": f"v{seq}", "reward": 1, "exposure_ts": now - 1000, "reward_ts": now,
                 "item": "item-00001", "position": 0}
            futs.append(await producer.send(rewards_topic, orjson.dumps(r), key=EXPERIMENT.encode()))
        await asyncio.gather(*futs)
        return time.perf_counter()

    async with aiohttp.ClientSession() as http:
        async def held() -> dict:
            async with http.get(f"http://127.0.0.1:{port}/v1/experiments") as resp:
                return await resp.json()

        async def wait_for(total: int, timeout_s: float = 30) -> tuple[float, int]:
            deadline = time.perf_counter() + timeout_s
            while True:
                h = await held()
                snap = h["posteriors"].get(EXPERIMENT)
                run = h["running"]
                if snap is not None and sum(snap["exposures"]) >= total and run \
                        and run[0]["posterior_version"] == snap["version"]:
                    return time.perf_counter(), snap["version"]
                if time.perf_counter() > deadline:
                    raise SystemExit(f"the recommender did not see {total} rewards in {timeout_s} s: {h}")
                await asyncio.sleep(0.005)

        # warm-up: the worker has joined its group and published once
        total = 1
        t_ack = await send_burst(arms[0], 1)
        seen, version = await wait_for(total, 60)
        print(f"warm-up: first reward visible after {seen - t_ack:.3f} s (snapshot v{version})",
              flush=True)
        out = []
        for b in range(bursts):
            await asyncio.sleep(random.uniform(0.1, 1.6))
            t_ack = await send_burst(target, burst)
            total += burst
            seen, version = await wait_for(total)
            out.append(seen - t_ack)
            print(f"burst {b + 1}: {burst} rewards for {target} -> allocation on snapshot "
                  f"v{version} after {out[-1]:.3f} s", flush=True)
        counts = Counter()
        for i in range(share_requests):
            async with http.get(f"http://127.0.0.1:{port}/v1/recommendations",
                                params={"user_id": f"share-{uuid.uuid4().hex[:8]}-{i}", "k": "3"}) as resp:
                counts[(await resp.json())["arm"]] += 1
    await producer.stop()
    return out, counts[target] / max(share_requests, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--arms", type=int, default=10)
    parser.add_argument("--bursts", type=int, default=8)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--share-requests", type=int, default=300)
    args = parser.parse_args()
    arms = [f"arm-{i}" for i in range(args.arms)]

    fresh_us, sticky_us = alloc_cost(args.arms, args.requests)
    print(f"allocation, {args.arms} arms: {fresh_us:.2f} us per fresh decision, "
          f"{sticky_us:.2f} us per sticky repeat ({args.requests} requests, best of 5)", flush=True)

    settings = bench_settings()
    work = Path(tempfile.mkdtemp(prefix="bandit-bench-"))
    asyncio.run(topics.ensure_topics(settings, (topics.EXPERIMENTS, topics.REWARDS,
                                                topics.BANDIT_POSTERIORS, topics.EXPOSURES)))

    async def write_experiment() -> None:
        p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await p.start()
        try:
            await p.send_and_wait(settings.topic(topics.EXPERIMENTS),
                                  orjson.dumps(experiment_record(arms)), key=EXPERIMENT.encode())
        finally:
            await p.stop()

    asyncio.run(write_experiment())
    port = free_port()
    env = {**os.environ, **settings.as_env(), "CLICKLOOP_RECOMMENDER_PORT": str(port),
           "CLICKLOOP_MODEL_DIR": str(work / "models"), "CLICKLOOP_LOG_LEVEL": "warning"}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen([PYTHON, "-m", "services.cli", "worker", "bandits"], env=env,
                                      stdout=open(work / "bandits.log", "ab"),
                                      stderr=subprocess.STDOUT))
        procs.append(start_service([PYTHON, "-m", "services.cli", "serve", "recommender"], env,
                                   work / "recommender.log", port,
                                   lambda p: [e["id"] for e in http_json(p, "/v1/experiments")["running"]]
                                   == [EXPERIMENT]))
        print(f"bandits worker pid {procs[0].pid}, recommender pid {procs[1].pid} on port {port}, "
              f"posterior_publish_ms={settings.posterior_publish_ms}", flush=True)
        times, share = asyncio.run(propagation(settings, port, arms, args.bursts, args.burst,
                                               args.share_requests))
        if procs[0].poll() is not None:
            raise SystemExit(f"bandits worker exited:\n{(work / 'bandits.log').read_text()[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"propagation over {len(times)} bursts: median {statistics.median(times):.3f} s, "
          f"max {max(times):.3f} s; then {share:.0%} of {args.share_requests} new users were "
          f"allocated the rewarded arm", flush=True)
    print(f"alloc_us={fresh_us:.2f} propagation_s={max(times):.3f}")


if __name__ == "__main__":
    main()
