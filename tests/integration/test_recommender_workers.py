"""`clickloop serve recommender` with several workers, against the real Kafka and Redis:
both workers serve on one port, /metrics from either sums them all, a killed worker
is replaced without losing its counts, SIGTERM stops everything; and a worker that
cannot start makes the supervisor give up instead of looping."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import orjson
import pytest
import redis.asyncio as aioredis

from services.infra import free_port
from services.recommender.synthetic import user_id
from services.workers import MAX_QUICK_EXITS, supervise
from tests.integration.helpers import eventually
from tests.integration.test_recommender import seed, tuned

pytestmark = pytest.mark.integration


def fetch(port: int, path: str) -> bytes:
    """One request on a connection of its own (the kernel picks the worker per connection)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        assert resp.status == 200
        return resp.read()


async def afetch(port: int, path: str) -> bytes:
    return await asyncio.to_thread(fetch, port, path)


def served_total(metrics: bytes) -> float:
    return sum(float(v) for v in re.findall(
        rb'^clickloop_recommender_responses_total\{path="\w+"\} (\S+)$', metrics, re.M))


def gauge_pids(metrics: bytes) -> set[int]:
    return {int(p) for p in re.findall(
        rb'^clickloop_recommender_breaker_state\{dependency="redis",pid="(\d+)"\}', metrics, re.M)}


async def workers_seen(port: int, tries: int = 40) -> dict[int, int]:
    """pid -> index of the workers that answered /health with the model loaded."""
    seen = {}
    for _ in range(tries):
        try:
            health = orjson.loads(await afetch(port, "/health"))
        except OSError:
            continue
        if health["models"]["served"] is not None:
            seen[health["worker"]["pid"]] = health["worker"]["index"]
    return seen


async def test_two_workers_share_the_port_sum_their_metrics_and_survive_a_kill(settings, tmp_path):
    port = free_port()
    s = tuned(settings, recommender_workers=2, recommender_port=port)
    redis = aioredis.from_url(s.redis_url)
    try:
        await seed(s, redis)
    finally:
        await redis.aclose()
    log = open(tmp_path / "recommender.log", "wb")
    sup = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "recommender"],
                           env={**os.environ, **s.as_env()}, stdout=log, stderr=subprocess.STDOUT)
    try:
        first = await eventually(lambda: workers_seen(port), lambda seen: len(seen) == 2,
                                 timeout_s=90, what="both workers serving the model")
        assert sorted(first.values()) == [0, 1]

        for _ in range(40):
            body = orjson.loads(await afetch(port, f"/v1/recommendations?user_id={user_id(1)}&k=5"))
            assert body["path"] == "model" and len(body["items"]) == 5
        # Whichever worker answers /metrics, it counts every worker's answers and shows
        # each live worker's gauges (refreshed every second by each worker).
        for _ in range(6):
            metrics = await afetch(port, "/metrics")
            assert served_total(metrics) == 40
        await eventually(lambda: afetch(port, "/metrics"), lambda m: gauge_pids(m) == set(first),
                         what="both workers' gauges")

        victim = next(pid for pid, index in first.items() if index == 1)
        os.kill(victim, signal.SIGKILL)
        after = await eventually(lambda: workers_seen(port), lambda seen: len(seen) == 2
                                 and victim not in seen, timeout_s=60, what="worker 1 replaced")
        assert sorted(after.values()) == [0, 1]
        # The killed worker's counts stay in the sums; its gauges leave.
        metrics = await eventually(lambda: afetch(port, "/metrics"),
                                   lambda m: gauge_pids(m) == set(after), what="gauges of live pids")
        assert served_total(metrics) == 40
        for _ in range(20):
            assert orjson.loads(await afetch(port, f"/v1/recommendations?user_id={user_id(1)}"
                                                   "&k=5"))["path"] == "model"
        assert served_total(await afetch(port, "/metrics")) == 60
    finally:
        sup.send_signal(signal.SIGTERM)
        code = sup.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "recommender.log").read_text()[-3000:]
    for pid in after:  # every worker stopped with the supervisor
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    text = (tmp_path / "recommender.log").read_text()
    assert "worker 1 (pid" in text and "restarting" in text


def test_a_worker_that_cannot_start_makes_the_supervisor_give_up(tmp_path):
    lines: list[str] = []
    t0 = time.monotonic()
    code = supervise("broken", [sys.executable, "-c", "import sys; sys.exit(3)"], 2,
                     dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "m")), lines.append)
    assert code == 1
    assert any(f"{MAX_QUICK_EXITS} times in a row" in line for line in lines), lines
    assert time.monotonic() - t0 < 30
    assert not [f for f in os.listdir(tmp_path / "m") if f.endswith(".db")]


def test_a_killed_supervisor_takes_its_workers_with_it_and_the_next_start_its_metrics(tmp_path):
    script = ("import sys; from services.workers import supervise; "
              "sys.exit(supervise('sleepers', [sys.executable, '-c', 'import time; time.sleep(60)'],"
              " 2, dict(__import__('os').environ)))")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    sup = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           env={**env, "TMPDIR": str(tmp_path)})
    line = sup.stdout.readline()
    pids = [int(p) for p in line.split("pids", 1)[1].split()]
    assert len(pids) == 2
    ns = os.stat("/proc/self/ns/pid").st_ino
    left = [p for p in tmp_path.iterdir()
            if p.name.startswith(f"clickloop-sleepers-metrics-{ns}-{sup.pid}-")]
    assert len(left) == 1
    sup.kill()
    sup.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    assert left[0].is_dir()  # nobody removed it: the supervisor was killed outright
    # The next supervisor's start removes it, and leaves a live one's alone.
    mine = tmp_path / f"clickloop-other-metrics-{ns}-{os.getpid()}-abc"
    elsewhere = tmp_path / f"clickloop-other-metrics-{ns + 1}-{sup.pid}-abc"   # another namespace
    elsewhere.mkdir()
    mine.mkdir()
    again = subprocess.run([sys.executable, "-c", "import sys; from services.workers import supervise; "
                            "sys.exit(supervise('broken', [sys.executable, '-c', 'raise SystemExit(3)'],"
                            " 1, dict(__import__('os').environ)))"],
                           env={**env, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, text=True,
                           timeout=60)
    lines = again.stdout.splitlines()
    assert again.returncode == 1
    assert f"[broken] removed {left[0]}: its supervisor is gone" in lines
    assert not left[0].exists() and mine.is_dir() and elsewhere.is_dir()
    assert not [p for p in tmp_path.iterdir() if "-metrics-" in p.name and p not in (mine, elsewhere)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is not alive
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
