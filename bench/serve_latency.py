"""Recommender latency and throughput: features in Redis, a 10,000-item × 64-factor model.

    .venv/bin/python bench/serve_latency.py [--seconds 30] [--rate 1000] [--max-seconds 10]
    .venv/bin/python bench/serve_latency.py --pause-redis [--seconds 30] [--pause-s 4]
    .venv/bin/python bench/serve_latency.py --profile out.json   # py-spy during the rate run
    .venv/bin/python bench/serve_latency.py --workers 2          # both servers with 2 processes
    .venv/bin/python bench/serve_latency.py --load python        # max runs without wrk

Set-up: a private redis-server (so it can be SIGSTOPped without touching the
shared one), features for `--users` known users and as many anonymous visitors
(recent items, written with the features worker's Lua script), popular
snapshots for every partition, a random 10,000 × 64 model artifact announced
on `models`; the real recommender runs as `clickloop serve recommender` in its
own process, and the load comes from a third process (bench/_serve_load.py,
its own event loop). 5 % of requests are for visitors without features.

(1) `--rate` requests/s (open loop, latency from each request's due time) for
    `--seconds`: last line `rps=… p50_ms=… p99_ms=… errors=…` (target p99 <=
    5 ms, 0 errors);
(2) maximum throughput (closed loop, `--connections`; the load from `wrk` when
    installed, `--load`) of the recommender and of
    an aiohttp hello-world in the same run: `max_rps=… hello_rps=… ratio=…`
    (target >= 0.6), then `floor_rps=… floor_ratio=…`: the same for the floor of
    any recommender on aiohttp that reads Redis per request (the recommender's
    query parsing and its one Redis read, then the hello-world's answer); with
    `--workers N` all run N processes on their port (the recommender under its
    supervisor, CLICKLOOP_RECOMMENDER_WORKERS=N; the baselines as N processes
    with SO_REUSEPORT), CPU summed over them;
(3) `--pause-redis`: the rate run with the private Redis SIGSTOPped for
    `--pause-s` seconds a fifth of the way in: p99 <= 30 ms, 0 errors,
    fallback served, the breaker opens and later closes.
Errors are 5xx answers and failed connections; a fallback is a 200.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import bench_settings  # noqa: E402
from bench._serve_load import draw, targets_of  # noqa: E402
from services.infra import free_port  # noqa: E402
from services.recommender.synthetic import (PrivateRedis, announce, item_id, random_model,  # noqa: E402
                                            user_id, write_popular, write_users)

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable


def http_json(port: int, path: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return orjson.loads(resp.read())


def young_gc(port: int) -> tuple[float, float]:
    """The recommender's young collections so far (count, seconds), from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        got = {line.split(" ")[0]: float(line.split(" ")[1]) for line in resp.read().decode().splitlines()
               if line.startswith("clickloop_recommender_gc_pause_seconds_") and 'generation="0"' in line}
    return (got.get('clickloop_recommender_gc_pause_seconds_count{generation="0"}', 0.0),
            got.get('clickloop_recommender_gc_pause_seconds_sum{generation="0"}', 0.0))


def baseline_server(port: int, floor: bool) -> None:
    """A baseline, one of `--workers` processes on the port with the recommender's server
    settings. The aiohttp hello-world: its smallest JSON answer. With `floor`, the floor
    of any recommender on aiohttp that reads Redis per request: the recommender's own
    query parsing and its one Redis read (the same client, keys and budget, from the
    recommender's environment), then the same fixed answer: no profile, model, body or
    exposure."""
    from aiohttp import web

    body = b'{"hello":"world"}'

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/hello", hello)
    if floor:
        from services.recommender.feature_client import FeatureClient
        from services.recommender.request import parse_query
        from services.settings import Settings

        settings = Settings.from_env()
        features = FeatureClient(settings.redis_url, settings.redis_pool)
        users, topks = settings.redis_key("user", ""), settings.redis_key("topk", "")
        budget_s = settings.redis_budget_ms / 1000

        async def floor(request: web.Request) -> web.Response:
            visitor = parse_query(request.query).visitor
            try:  # past the budget the recommender answers its fallback: so does the floor
                async with asyncio.timeout(budget_s):
                    await features.read(users + visitor, topks + visitor)
            except TimeoutError:
                pass
            return web.Response(body=body, content_type="application/json")

        app.router.add_get("/v1/recommendations", floor)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, reuse_port=True)


async def seed(settings, redis_url: str, root: Path, users: int, seed: int = 3) -> list[str]:
    import redis.asyncio as aioredis

    rng = np.random.default_rng(seed)
    art = random_model(root, settings.model_name, "bench-v1", n_items=10_000, factors=64,
                       n_users=users, seed=seed)
    now = int(time.time() * 1000)
    profiles = {}
    for u in range(users):
        for visitor in (user_id(u), f"anon-{u:05d}"):
            items = rng.choice(10_000, int(rng.integers(3, 20)), replace=False)
            profiles[visitor] = [(item_id(int(j)), "click" if rng.random() < 0.2 else "view",
                                  now - int(rng.integers(0, 86_400_000))) for j in items]
    redis = aioredis.from_url(redis_url)
    await write_users(redis, settings, profiles, now)
    for p in range(settings.partitions):
        top = sorted(((item_id(int(j)), float(rng.random() * 100)) for j in
                      rng.choice(10_000, 1000, replace=False)), key=lambda t: -t[1])
        await write_popular(redis, settings, p, top, now)
    await redis.aclose()
    await announce(settings, art)
    cold = [f"cold-{i:05d}" for i in range(max(1, len(profiles) // 19))]  # 5 % without features
    return list(profiles) + cold


def start_service(args: list[str], env: dict, log: Path, port: int, ready) -> subprocess.Popen:
    proc = subprocess.Popen(args, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if ready(port):
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"{args} not ready in 90 s:\n{log.read_text()[-3000:]}")


ZIPF = ["--zipf", "0"]  # set from --zipf in main()


def load(port: int, visitors: Path, *mode: str, seconds: float, connections: int,
         path: str = "/v1/recommendations") -> dict:
    out = subprocess.run([PYTHON, str(HERE / "_serve_load.py"), "--port", str(port),
                          "--visitors", str(visitors), "--path", path, "--seconds", str(seconds),
                          "--connections", str(connections), *ZIPF, *mode],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return orjson.loads(out.strip().splitlines()[-1])


LOADER = ["python"]  # the maximum runs' load generator, set from --load in main()


def max_load(port: int, visitors: Path, seconds: float, connections: int,
             path: str = "/v1/recommendations") -> dict:
    """A maximum-throughput run (closed loop): with wrk (`--load wrk`), else bench/_serve_load.py.

    wrk (C, from Debian's packages) takes a fraction of the CPU the Python generator
    needs per request, so more of the two cores is left to the server under test; it
    asks for the same targets (the same draw of visitors) and counts statuses and
    paths the same way (bench/_wrk.lua)."""
    if LOADER[0] == "python":
        return load(port, visitors, "--max", seconds=seconds, connections=connections, path=path)
    targets = visitors.with_name(f"targets{path.replace('/', '-')}.txt")
    if not targets.exists():
        drawn = draw(visitors.read_text().split(), 200_000, seed=1, zipf=float(ZIPF[1]))
        targets.write_text("\n".join(targets_of(drawn, path, k=10)) + "\n")
    out = subprocess.run(["wrk", "--threads", "1", "--connections", str(connections),
                          "--duration", f"{max(1, round(seconds))}s", "--timeout", "2s",
                          "--script", str(HERE / "_wrk.lua"), f"http://127.0.0.1:{port}"],
                         env={**os.environ, "TARGETS": str(targets)}, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    r = orjson.loads(out.strip().splitlines()[-1])
    r["rps"] = r["requests"] / r["seconds"]
    r["errors"] = r["failed"] + r["timeouts"] + sum(n for status, n in r["statuses"].items()
                                                    if int(status) >= 500)
    return r


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds so far of processes and their children (/proc)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:  # gone
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        total += cpu_s([int(c) for c in children])
    return total


def worker_pids(port: int, n: int, timeout_s: float = 90) -> set[int]:
    """The pids of the n workers on the port, once each answers /health with the model."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(seen)} of {n} workers ready in {timeout_s} s")
        health = http_json(port, "/health")  # a connection of its own: any worker
        if (health["models"]["served"] or {}).get("version"):
            seen.add(health["worker"]["pid"])
    return seen


def summary(name: str, r: dict) -> str:
    return (f"{name}: {r['requests']} requests in {r['seconds']:.1f} s = {r['rps']:.0f}/s, "
            f"p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f}, p99 {r['p99_ms']:.2f}, "
            f"p99.9 {r['p999_ms']:.2f}, max {r['max_ms']:.1f}; errors {r['errors']}; "
            f"statuses {r['statuses']}; paths {r['paths']}")


class HealthWatch(threading.Thread):
    """Polls /health every 100 ms: when the Redis breaker was first seen open and closed again."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.t0 = time.monotonic()
        self.states: list[tuple[float, str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                state = http_json(self.port, "/health", 1.0)["breakers"]["redis"]["state"]
            except (OSError, ValueError, KeyError):
                state = "unknown"
            if not self.states or self.states[-1][1] != state:
                self.states.append((time.monotonic() - self.t0, state))
            time.sleep(0.1)

    def opened_at(self) -> float | None:
        return next((t for t, s in self.states if s == "open"), None)

    def closed_after(self, t: float | None) -> float | None:
        if t is None:
            return None
        return next((c for c, s in self.states if c > t and s == "closed"), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30, help="length of the rate run")
    parser.add_argument("--rate", type=float, default=1000, help="requests/s of the rate run")
    parser.add_argument("--max-seconds", type=float, default=10, help="length of each max run")
    parser.add_argument("--connections", type=int, default=32, help="connections of the max runs")
    parser.add_argument("--users", type=int, default=5000,
                        help="known users (as many anonymous visitors are folded in)")
    parser.add_argument("--pause-redis", action="store_true",
                        help="SIGSTOP the private Redis mid-run (instead of the max runs)")
    parser.add_argument("--pause-s", type=float, default=8.0,
                        help="long enough for the breaker's 10 s window to reach 50 %% errors")
    parser.add_argument("--skip-max", action="store_true", help="only the rate run")
    parser.add_argument("--profile", metavar="FILE",
                        help="record the recommender with py-spy during the rate run (speedscope)")
    parser.add_argument("--zipf", type=float, default=0.0,
                        help="draw visitors by a Zipf law of this exponent (default 0: uniform); "
                             "skewed traffic is what the hot-key cache is for")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes of the recommender and of the hello-world (default 1)")
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator of the maximum runs (auto: wrk when installed)")
    parser.add_argument("--baseline-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ZIPF[1] = str(args.zipf)
    LOADER[0] = args.load if args.load != "auto" else ("wrk" if shutil.which("wrk") else "python")
    if args.baseline_server:
        return baseline_server(args.baseline_server, args.floor)

    settings = bench_settings()
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    redis = PrivateRedis(work / "redis")
    procs: list[subprocess.Popen] = []
    try:
        redis.start()
        t = time.perf_counter()
        visitors = asyncio.run(seed(settings, redis.url, work / "models", args.users))
        vfile = work / "visitors.txt"
        vfile.write_text("\n".join(visitors))
        print(f"seeded {len(visitors)} visitors, 10,000 × 64 model in {time.perf_counter() - t:.1f} s",
              flush=True)
        port = free_port()
        env = {**os.environ, **settings.as_env(), "CLICKLOOP_REDIS_URL": redis.url,
               "CLICKLOOP_RECOMMENDER_PORT": str(port), "CLICKLOOP_MODEL_DIR": str(work / "models"),
               "CLICKLOOP_LOG_LEVEL": "warning", "CLICKLOOP_RECOMMENDER_WORKERS": str(args.workers)}
        rec = start_service([PYTHON, "-m", "services.cli", "serve", "recommender"], env,
                            work / "recommender.log", port,
                            lambda p: (http_json(p, "/health")["models"]["served"] or {}).get("version"))
        procs.append(rec)
        pids = worker_pids(port, args.workers)
        print(f"recommender pid {rec.pid} ({args.workers} workers: {sorted(pids)}) on port {port}: "
              f"{http_json(port, '/health')['models']}", flush=True)
        warm = load(port, vfile, "--rate", "500", seconds=3, connections=32)
        print(summary("warm-up", warm), flush=True)

        if args.pause_redis:
            return pause_run(args, port, vfile, redis)

        spy = None
        if args.profile:
            spy = subprocess.Popen([str(Path(PYTHON).parent / "py-spy"), "record", "--pid", str(rec.pid), "--rate", "500",
                                    "--nonblocking", "--subprocesses", "--format", "speedscope", "-o", args.profile, "--duration",
                                    str(int(args.seconds))],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0 = cpu_s([rec.pid])
        steady = load(port, vfile, "--rate", str(args.rate), seconds=args.seconds, connections=64)
        cpu = cpu_s([rec.pid]) - cpu0
        if spy is not None:
            spy.wait(timeout=120)
        print(summary(f"rate {args.rate:.0f}/s", steady), flush=True)
        per_second = sorted(slot["p99_ms"] for slot in steady["timeline"])
        print(f"per-second p99 (ms): best {per_second[0]:.2f}, median "
              f"{per_second[len(per_second) // 2]:.2f}, worst {per_second[-1]:.2f}; seconds with "
              f"p99 <= 5 ms: {sum(p <= 5 for p in per_second)}/{len(per_second)}", flush=True)
        print(f"recommender CPU: {cpu:.2f} s for {steady['requests']} requests = "
              f"{cpu / steady['requests'] * 1e6:.0f} µs per request", flush=True)
        health = http_json(port, "/health")
        print(f"recommender: cache {health['cache']}, exposures {health['exposures']}", flush=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            gc_lines = [line for line in resp.read().decode().splitlines()
                        if line.startswith(("clickloop_recommender_gc_pause_seconds_",
                                            "clickloop_recommender_latency_seconds_"))
                        and ("_count" in line or "_sum" in line)]
        print("metrics: " + "; ".join(gc_lines), flush=True)

        if not args.skip_max:
            print(f"maximum runs: {args.connections} connections, load from "
                  f"{'wrk' if LOADER[0] == 'wrk' else 'bench/_serve_load.py'}", flush=True)
            cpu0, gc0 = cpu_s([rec.pid]), young_gc(port)
            best = max_load(port, vfile, seconds=args.max_seconds, connections=args.connections)
            cpu, gc1 = cpu_s([rec.pid]) - cpu0, young_gc(port)
            print(summary("recommender max", best), flush=True)
            print(f"recommender CPU: {cpu:.2f} s in {best['seconds']:.1f} s, "
                  f"{cpu / best['requests'] * 1e6:.0f} µs per request", flush=True)
            health = http_json(port, "/health")
            batches = health["scoring"]["batches"]
            print(f"recommender: cache {health['cache']}; scoring batches {batches}, "
                  f"{health['scoring']['scored'] / max(1, batches):.2f} requests each "
                  "(since the start)", flush=True)
            collections, paused = gc1[0] - gc0[0], gc1[1] - gc0[1]
            print(f"recommender young collections during the max run (the worker that answered "
                  f"/metrics): {collections:.0f}, {paused / max(collections, 1) * 1e3:.2f} ms each, "
                  f"{paused / best['requests'] * 1e6 * args.workers:.1f} µs per request", flush=True)
            rec.terminate()
            rec.wait(timeout=30)
            base = baseline_max(args, work, vfile, procs, env, floor=False)
            floor = baseline_max(args, work, vfile, procs, env, floor=True)
            print(f"max_rps={best['rps']:.0f} hello_rps={base['rps']:.0f} "
                  f"ratio={best['rps'] / base['rps']:.2f} floor_rps={floor['rps']:.0f} "
                  f"floor_ratio={floor['rps'] / base['rps']:.2f}", flush=True)
        print(f"rps={steady['rps']:.0f} p50_ms={steady['p50_ms']:.2f} p99_ms={steady['p99_ms']:.2f} "
              f"errors={steady['errors']}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)


def baseline_max(args, work: Path, vfile: Path, procs: list[subprocess.Popen], env: dict,
                 floor: bool) -> dict:
    """The maximum throughput of a baseline (baseline_server) with `--workers` processes."""
    name, path = ("floor (aiohttp + one Redis read)", "/v1/recommendations") if floor \
        else ("aiohttp hello-world", "/hello")
    port = free_port()
    ask = f"{path}?user_id={user_id(0)}" if floor else path
    servers = [start_service([PYTHON, str(Path(__file__).resolve()), "--baseline-server", str(port),
                              *(["--floor"] if floor else [])], env, work / "baseline.log", port,
                             lambda p: urllib.request.urlopen(f"http://127.0.0.1:{p}{ask}",
                                                              timeout=1).status == 200)
               for _ in range(args.workers)]
    procs.extend(servers)
    time.sleep(1.0)  # the last one bound before it was asked: let it start serving
    pids = [s.pid for s in servers]
    cpu0 = cpu_s(pids)
    result = max_load(port, vfile, seconds=args.max_seconds, connections=args.connections, path=path)
    cpu = cpu_s(pids) - cpu0
    print(summary(f"{name} max", result), flush=True)
    print(f"{name} CPU: {cpu:.2f} s in {result['seconds']:.1f} s, "
          f"{cpu / result['requests'] * 1e6:.0f} µs per request", flush=True)
    for server in servers:
        server.terminate()
        server.wait(timeout=30)
    return result


def pause_run(args, port: int, vfile: Path, redis: PrivateRedis) -> None:
    watch = HealthWatch(port)
    watch.start()
    pause_at = args.seconds / 5

    def pauser() -> None:
        time.sleep(pause_at)
        redis.pause()
        time.sleep(args.pause_s)
        redis.resume()

    threading.Thread(target=pauser, daemon=True).start()
    result = load(port, vfile, "--rate", str(args.rate), seconds=args.seconds, connections=64)
    print(summary(f"rate {args.rate:.0f}/s, Redis paused at {pause_at:.1f} s for {args.pause_s:.1f} s",
                  result), flush=True)
    for slot in result["timeline"]:
        print(f"  t={slot['s']:>3}s requests={slot['requests']} fallback={slot['fallback']} "
              f"errors={slot['errors']} p99_ms={slot['p99_ms']}")
    opened = watch.opened_at()
    closed = watch.closed_after(opened)
    deadline = time.monotonic() + 15
    while opened is not None and closed is None and time.monotonic() < deadline:
        load(port, vfile, "--rate", "100", seconds=1, connections=4)  # a breaker moves on requests
        closed = watch.closed_after(opened)
    watch.halt.set()
    print(f"breaker states (s since start: state): "
          f"{', '.join(f'{t:.1f}: {s}' for t, s in watch.states)}", flush=True)
    fallback = sum(n for p, n in result["paths"].items() if p.startswith("fallback"))
    print(f"rps={result['rps']:.0f} p50_ms={result['p50_ms']:.2f} p99_ms={result['p99_ms']:.2f} "
          f"errors={result['errors']} fallback={fallback} "
          f"breaker_opened={'yes' if opened is not None else 'no'} "
          f"breaker_closed={'yes' if closed is not None else 'no'}")


if __name__ == "__main__":
    main()
