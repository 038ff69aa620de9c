"""Load generator for bench/serve_latency.py; runs in its own process with its own event loop.

    python bench/_serve_load.py --port P --visitors FILE (--rate R | --max) --seconds S
                                [--connections C] [--k 10] [--path /v1/recommendations]

A minimal HTTP/1.1 keep-alive client on raw asyncio streams (no HTTP library
on the client side), so the generator takes as little as possible of the two
cores the server shares with it. `--rate R`: open loop, request i is due at
t0 + i/R and its latency counts from that due time, so a stalled server shows
up in the figures instead of slowing the generator down (no coordinated
omission). `--max`: closed loop, C connections asking back to back. Visitors
are read from FILE (one per line) and drawn at random (seeded), uniformly or
by a Zipf law (`--zipf S`). Prints one
JSON line: counts, statuses, paths and reasons seen, latency percentiles and
a per-second timeline.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
from collections import Counter

import numpy as np
import orjson

PATH_RE = re.compile(rb'"path":"(\w+)","reason":(null|"\w+")')


class Conn:
    """One keep-alive connection: `ask(request bytes)` -> (status, body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def ask(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        i = head.lower().find(b"content-length:")
        length = int(head[i + 15:head.index(b"\r\n", i)]) if i >= 0 else 0
        body = await self.reader.readexactly(length) if length else b""
        return status, body


class Stats:
    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.paths: Counter[str] = Counter()
        self.errors = 0
        self.timeline: dict[int, list] = {}

    def add(self, due: float, done: float, status: int | None, body: bytes) -> None:
        latency = done - due
        self.latencies.append(latency)
        second = int(due - self.t0)
        slot = self.timeline.setdefault(second, [0, 0, 0, []])  # requests, errors, fallbacks, lat
        slot[0] += 1
        slot[3].append(latency)
        if status is None:
            self.statuses["connection_error"] += 1
            self.errors += 1
            slot[1] += 1
            return
        self.statuses[str(status)] += 1
        if status >= 500 or status == 0:
            self.errors += 1
            slot[1] += 1
        m = PATH_RE.search(body)
        if m:
            path = m.group(1).decode()
            reason = m.group(2).decode().strip('"')
            self.paths[path if reason == "null" else f"{path}:{reason}"] += 1
            if path == "fallback":
                slot[2] += 1

    def report(self, seconds: float) -> dict:
        lat = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        timeline = [{"s": s, "requests": v[0], "errors": v[1], "fallback": v[2],
                     "p99_ms": round(float(np.percentile(np.asarray(v[3]) * 1000, 99)), 3)}
                    for s, v in sorted(self.timeline.items())]
        return {"requests": len(self.latencies), "seconds": seconds,
                "rps": len(self.latencies) / seconds, "errors": self.errors,
                "statuses": dict(self.statuses), "paths": dict(self.paths),
                "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
                "p99_ms": float(np.percentile(lat, 99)), "p999_ms": float(np.percentile(lat, 99.9)),
                "max_ms": float(lat.max()), "timeline": timeline}


def draw(visitors: list[str], n: int, seed: int, zipf: float = 0.0) -> list[str]:
    """n visitors drawn uniformly, or by a Zipf law of exponent `zipf` over a shuffled
    order (a few hot visitors, a long tail: what the hot-key cache is for)."""
    rng = random.Random(seed)
    if zipf > 0:
        order = visitors[:]
        rng.shuffle(order)
        weights = 1.0 / np.arange(1, len(order) + 1) ** zipf
        picks = np.random.default_rng(seed).choice(len(order), n, p=weights / weights.sum())
        return [order[i] for i in picks]
    return [rng.choice(visitors) for _ in range(n)]


def requests_for(visitors: list[str], path: str, k: int, n: int, seed: int,
                 zipf: float = 0.0) -> list[bytes]:
    """n HTTP/1.1 requests of `path` for visitors drawn by `draw`."""
    return [f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            for target in targets_of(draw(visitors, n, seed, zipf), path, k)]


def targets_of(visitors: list[str], path: str, k: int) -> list[str]:
    """The request target of each visitor's request (for `path` under /v1/; else `path`)."""
    if not path.startswith("/v1/"):
        return [path] * len(visitors)
    return [f"{path}?{'anonymous_id' if v.startswith('anon') else 'user_id'}={v}&k={k}"
            for v in visitors]


async def open_loop(port: int, reqs: list[bytes], rate: float, seconds: float, conns: int) -> dict:
    pool: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await Conn.open(port))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stats = Stats(t0)
    total = int(rate * seconds)
    tasks: set[asyncio.Task] = set()

    async def one(request: bytes, due: float) -> None:
        conn = await pool.get()
        try:
            status, body = await conn.ask(request)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            stats.add(due, loop.time(), None, b"")
            conn = await Conn.open(port)
        else:
            stats.add(due, loop.time(), status, body)
        pool.put_nowait(conn)

    i = 0
    while i < total:
        now = loop.time()
        while i < total and t0 + i / rate <= now:
            t = asyncio.create_task(one(reqs[i % len(reqs)], t0 + i / rate))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    return stats.report(loop.time() - t0)


async def closed_loop(port: int, reqs: list[bytes], seconds: float, conns: int) -> dict:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stats = Stats(t0)
    end = t0 + seconds
    counter = iter(range(10 ** 12))

    async def worker() -> None:
        conn = await Conn.open(port)
        while loop.time() < end:
            request = reqs[next(counter) % len(reqs)]
            start = loop.time()
            try:
                status, body = await conn.ask(request)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                stats.add(start, loop.time(), None, b"")
                conn = await Conn.open(port)
                continue
            stats.add(start, loop.time(), status, body)
        conn.writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return stats.report(loop.time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--visitors", required=True, help="file, one visitor per line")
    parser.add_argument("--path", default="/v1/recommendations")
    parser.add_argument("--k", type=int, default=10)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float)
    mode.add_argument("--max", action="store_true")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent (0: uniform)")
    args = parser.parse_args()
    visitors = open(args.visitors).read().split()
    reqs = requests_for(visitors, args.path, args.k, 200_000, args.seed, args.zipf)
    if args.max:
        result = asyncio.run(closed_loop(args.port, reqs, args.seconds, args.connections))
    else:
        result = asyncio.run(open_loop(args.port, reqs, args.rate, args.seconds, args.connections))
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
