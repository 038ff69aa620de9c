"""CDC history throughput (the real `cdc_history` worker) and as-of lookup latency (HTTP).

    .venv/bin/python bench/cdc_history.py [--events N] [--keys K] [--lookups M] [--profile FILE]

Produces N Debezium-shaped PostgreSQL change events (`change_records`: a
snapshot of a tenth of the keys, then inserts, updates, deletes each followed
by its tombstone, about 2 % re-delivered duplicates and 2 % swapped with their
predecessor) to a fresh `cdc.bench.public.subscriptions` topic, then runs the
real `clickloop worker cdc_history` process over it. The worker reports its
own progress (records folded, seconds from its first to its latest record), so
start-up and rebalance are not counted. Then the standalone history service
(`python -m services.history.app`, a separate process) loads `history.subscriptions`
and this process asks it M `?as_of=` lookups of random keys at random times,
one at a time over one keep-alive connection, timing each request end to end
(HTTP client to server and back); the in-process handler time (`routes.answer`)
is printed for comparison.
Last line: events=N history_eps=X asof_p99_ms=Y
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import bench_settings, produce, worker_rate  # noqa: E402
from services.infra import free_port  # noqa: E402
from streams import topics  # noqa: E402
from streams.cdc_history import offline_history  # noqa: E402
from streams.history import HistoryConfig  # noqa: E402
from streams._native import murmur2  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402

PLANS = ("basic", "pro", "team", "enterprise")
STATUSES = ("active", "trialing", "past_due", "cancelled")
T0_MS = 1_795_000_000_000


def _pg_value(op: str, before, after, lsn: int, commit: int, ts_ms: int, table: str,
              snapshot: bool, wrap: bool) -> bytes:
    doc = {"before": before, "after": after, "source": {
        "version": "3.6.1.Final", "connector": "postgresql", "name": "bench", "ts_ms": ts_ms,
        "snapshot": "true" if snapshot else "false", "db": "bench",
        "sequence": f'["{commit}","{lsn}"]' if not snapshot else f'[null,"{lsn}"]',
        "schema": "public", "table": table, "txId": lsn // 16, "lsn": lsn, "xmin": None},
        "op": op, "ts_ms": ts_ms + 5, "transaction": None}
    return orjson.dumps({"schema": {"type": "struct", "name": f"bench.public.{table}.Envelope"},
                         "payload": doc} if wrap else doc)


def change_records(n: int, keys: int = 10_000, seed: int = 7, table: str = "subscriptions",
                   wrap: bool = False) -> list[tuple[bytes, bytes | None, list]]:
    """N Kafka records (key, value, headers) of Debezium PostgreSQL change events, as a
    connector with `schemas.enable=false` (or true: `wrap`) writes them."""
    rng = random.Random(seed)
    rows: dict[int, dict] = {}
    out: list[tuple[bytes, bytes | None, list]] = []
    lsn, ts = 23_000_000, T0_MS
    snapshot = max(1, keys // 10)
    for k in range(1, snapshot + 1):              # the initial snapshot
        if len(out) >= n:
            return out
        lsn += 64
        rows[k] = {"id": k, "user_id": f"u{k}", "plan": rng.choice(PLANS), "status": "active",
                   "seats": rng.randint(1, 50), "updated_at": ts * 1000}
        out.append((orjson.dumps({"id": k}), _pg_value("r", None, rows[k], lsn, lsn, ts, table,
                                                        True, wrap), []))
    while len(out) < n:
        roll = rng.random()
        if roll < 0.02 and out:                  # a duplicate re-delivered
            out.append(out[rng.randrange(max(0, len(out) - 1000), len(out))])
            continue
        if roll < 0.04 and len(out) > snapshot:  # out of order: swapped with its predecessor
            out[-1], out[-2] = out[-2], out[-1]
        k = rng.randint(1, keys)
        lsn += 64
        ts += rng.randint(1, 2000)
        commit = lsn - 8
        key = orjson.dumps({"id": k})
        old = rows.get(k)
        if old is None:
            rows[k] = {"id": k, "user_id": f"u{k}", "plan": rng.choice(PLANS), "status": "trialing",
                       "seats": rng.randint(1, 50), "updated_at": ts * 1000}
            out.append((key, _pg_value("c", None, rows[k], lsn, commit, ts, table, False, wrap), []))
        elif rng.random() < 0.05:
            del rows[k]
            out.append((key, _pg_value("d", old, None, lsn, commit, ts, table, False, wrap), []))
            if len(out) < n:
                out.append((key, None, []))     # the tombstone after a delete
        else:
            new = {**old, "status": rng.choice(STATUSES), "updated_at": ts * 1000}
            if rng.random() < 0.3:
                new["plan"] = rng.choice(PLANS)
            rows[k] = new
            out.append((key, _pg_value("u", old, new, lsn, commit, ts, table, False, wrap), []))
    return out[:n]


def partitioned(records, partitions: int) -> list[tuple[int, bytes, bytes | None]]:
    """(partition, key, value) by Kafka's default partitioner, as Debezium's producer does."""
    return [((murmur2(k) & 0x7FFFFFFF) % partitions, k, v) for k, v, _ in records]


async def lookups(settings, rows: list[dict], keys: int, m: int, t_end: int) -> tuple[float, float]:
    """p99 of `m` as-of lookups over HTTP against the history service (a separate process),
    and p99 of the same lookups timed in-process through `routes.answer` (ms)."""
    import aiohttp

    from services.history.routes import answer
    from services.history.store import HistoryStore

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.history.app", "--port", str(port)],
                            env={**os.environ, **settings.as_env()})
    rng = random.Random(3)
    queries = [(str(rng.randint(1, keys)), rng.randint(T0_MS, t_end)) for _ in range(m)]
    base = f"http://127.0.0.1:{port}/v1/history"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    async with http.get(base) as resp:
                        status = await resp.json()
                    if status["rows"] >= len(rows) and status["caught_up"]:
                        break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"history service did not load {len(rows)} rows")
                await asyncio.sleep(0.5)
            for key, when in queries[:200]:             # warm-up
                async with http.get(f"{base}/subscriptions/{key}", params={"as_of": str(when)}) as r:
                    await r.read()
            times, found = [], 0
            for key, when in queries:
                t0 = time.perf_counter()
                async with http.get(f"{base}/subscriptions/{key}", params={"as_of": str(when)}) as r:
                    await r.read()
                times.append(time.perf_counter() - t0)
                found += r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    times.sort()
    http_p99 = times[int(len(times) * 0.99)] * 1000
    print(f"HTTP as-of lookups: {m}, {found} found (200), p50 {times[len(times) // 2] * 1000:.3f} ms, "
          f"p99 {http_p99:.3f} ms", flush=True)
    # The same lookups through the handler's logic, in this process, on the same rows.
    store = HistoryStore()
    for row in rows:
        store.add("subscriptions", row)
    inner = []
    for key, when in queries:
        t0 = time.perf_counter()
        answer(store, "subscriptions", key, str(when))
        inner.append(time.perf_counter() - t0)
    inner.sort()
    inner_p99 = inner[int(len(inner) * 0.99)] * 1000
    print(f"in-process handler logic (routes.answer): p99 {inner_p99:.4f} ms", flush=True)
    return http_p99, inner_p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--lookups", type=int, default=5_000)
    parser.add_argument("--profile", metavar="FILE",
                        help="record the worker with py-spy into FILE (speedscope JSON)")
    args = parser.parse_args()
    settings = bench_settings()
    name = topics.cdc_topic("bench", "public", "subscriptions")
    asyncio.run(ensure_topics(settings, (name, "history.subscriptions", name + ".dlq")))
    records = change_records(args.events, args.keys)
    produce_s = asyncio.run(produce(settings, settings.topic(name),
                                    partitioned(records, settings.partitions)))
    print(f"produced {args.events} change events to {settings.topic(name)} "
          f"({settings.partitions} partitions) in {produce_s:.1f} s", flush=True)
    # Folded is not yet committed: keep the worker up for the next checkpoint (the lookups
    # below read committed rows; under py-spy SIGINT is not graceful).
    eps = worker_rate(settings, "cdc_history", args.events, timeout_s=60 + args.events / 2000,
                      profile=args.profile, settle_s=2 * settings.checkpoint_ms / 1000 + 1)
    print(f"cdc_history worker: {eps:,.0f} events/s", flush=True)
    rows, _ = offline_history(records, HistoryConfig(max_versions=settings.history_max_versions))
    t_end = max(r["valid_from"] for r in rows) + 60_000
    p99, _ = asyncio.run(lookups(settings, rows, args.keys, args.lookups, t_end))
    print(f"events={args.events} history_eps={eps:.0f} asof_p99_ms={p99:.3f}")


if __name__ == "__main__":
    main()
