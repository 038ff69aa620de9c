"""Faults of the `features` worker on the real broker: SIGKILL mid-stream neither loses nor
double counts (Redis ends equal to the offline recomputation); a Redis server (a private
one: the shared server is never stopped) stopped and restarted without its script cache
while events arrive: the worker carries on, retries, reloads the script, catches up."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import signal

import pytest
import redis.asyncio as aioredis

from bench._common import produce
from schemas.clicks import visitor_key
from services.demo import click_events
from streams import topics
from streams.feature_windows import DAY, HOUR, MINUTE
from tests.integration.helpers import eventually
from tests.integration.test_features import (NAMES, T0, differences, ev, in_redis, offline,
                                             records_of, sess, session_records, wait_equal)

pytestmark = pytest.mark.integration


async def test_sigkill_mid_stream_neither_loses_nor_double_counts(settings, workers):
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=300,
                                   instance_id="features-kill")
    workers.settings = settings
    await topics.ensure_topics(settings)
    events = click_events(80_000, seed=21)
    rng = random.Random(4)
    sessions = [sess(visitor_key(e), e["timestamp"], rng.randrange(1, HOUR))
                for e in rng.sample(events, 400)]
    records = records_of(events, settings.partitions, 20)
    await produce(settings, settings.topic(topics.SESSIONS), session_records(sessions, settings.partitions))
    await produce(settings, settings.topic(topics.CLICKS), records)
    users, items, popular, _ = offline(events, sessions, settings.partitions)

    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        async def written() -> int:
            return len([k async for k in r.scan_iter(match=settings.redis_key("user", "*"), count=1000)])

        for _ in range(2):
            proc = workers.start("features")
            before = await written()
            await eventually(written, lambda n: n > before, timeout_s=60,
                             what="the worker wrote something")
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            unfinished = differences(await in_redis(settings, r), users, items, popular,
                                     settings.popular_items)
            assert unfinished, "killed after the work was done: use more events"
    finally:
        await r.aclose()
    workers.start("features")
    await wait_equal(settings, events, sessions, timeout_s=90)
    await asyncio.sleep(1.5)        # a double count would show up now
    await wait_equal(settings, events, sessions, timeout_s=1)


async def test_redis_down_then_restarted_without_its_scripts_the_writes_catch_up(settings, workers,
                                                                                 tmp_path):
    """A private redis-server (the shared one is never stopped): stopped while events
    arrive, restarted from its dump (data back, script cache empty: NOSCRIPT); the worker
    carries on, retries, reloads the script, and Redis ends equal to the offline run."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "redis"
    data.mkdir()

    def start_redis() -> subprocess.Popen:
        return subprocess.Popen(["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                 "--dir", str(data), "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ping(r) -> bool:
        try:
            return await r.ping()
        except (OSError, aioredis.ConnectionError):
            return False

    server = start_redis()
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=200,
                                   redis_url=f"redis://127.0.0.1:{port}/0")
    workers.settings = settings
    try:
        await topics.ensure_topics(settings)
        r = aioredis.Redis.from_url(settings.redis_url)
        await eventually(lambda: ping(r), bool, what="the private Redis answers")
        await r.aclose()
        workers.start("features")
        first = [ev(f"v{n % 30}", T0 + n * MINUTE, NAMES[n % 3], f"i{n % 7}", f"a{n}") for n in range(300)]
        await produce(settings, settings.topic(topics.CLICKS), records_of(first, 2, 10))
        await wait_equal(settings, first, [])
        r = aioredis.Redis.from_url(settings.redis_url)
        await r.shutdown(save=True)          # data kept in dump.rdb; scripts are never saved
        await r.aclose()
        server.wait(timeout=10)
        second = [ev(f"v{n % 40}", T0 + DAY + n * MINUTE, NAMES[n % 3], f"i{n % 9}", f"b{n}")
                  for n in range(300)]
        await produce(settings, settings.topic(topics.CLICKS), records_of(second, 2, 10))
        await asyncio.sleep(1.5)            # the worker tries, fails, backs off
        server = start_redis()
        r = aioredis.Redis.from_url(settings.redis_url)
        await eventually(lambda: ping(r), bool, what="the private Redis answers")
        assert await r.exists(settings.redis_key("user", "v0")), "restarted with its data"
        await r.aclose()
        await wait_equal(settings, first + second, [])
        assert workers.procs["features"].poll() is None, workers.logs()
        logs = workers.logs()
        assert "Redis write failed" in logs and "lost the write script" in logs, logs
    finally:
        server.terminate()
        server.wait(timeout=10)
