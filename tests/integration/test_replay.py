"""`clickloop replay` on the real broker and Redis: dry runs change nothing, a processor
rebuild equals a fresh run (no double count), also from a point in time, an active
processor is refused."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import orjson
import pytest
import redis.asyncio as aioredis

from bench._common import produce
from services.demo import click_events, click_records
from schemas.times import ms_to_iso
from streams import sessionize, topics
from tests.conftest import Workers
from tests.integration.helpers import eventually, offline_sessions, read_topic

pytestmark = pytest.mark.integration


def replay(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "replay", *args],
                          env={**os.environ, **settings.as_env()}, capture_output=True,
                          text=True, timeout=120)


async def features_snapshot(settings) -> dict:
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        users = {}
        async for key in redis.scan_iter(match=settings.redis_key("user", "*")):
            users[key] = await redis.hgetall(key)
        popular = await redis.zrange(settings.redis_key("items", "popular"), 0, -1, withscores=True)
        return {"users": users, "popular": popular}
    finally:
        await redis.aclose()


async def run_until_done(settings, workers, n_sessions: int) -> list[dict]:
    workers.start("sessionize")
    workers.start("features")
    sessions = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS),
                                lambda got: len(got) >= n_sessions, timeout_s=90)
    # features are done when every session is counted
    await eventually(lambda: features_snapshot(settings),
                     lambda snap: sum(int(u.get(b"sessions", 0)) for u in snap["users"].values())
                     == n_sessions, timeout_s=60, what="features caught up")
    workers.stop()
    workers.procs.clear()
    return sessions


async def test_processor_rebuild_equals_a_fresh_run_and_dry_run_changes_nothing(settings, workers):
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=200)
    workers.settings = settings
    await topics.ensure_topics(settings)
    records = click_records(click_events(8_000, seed=3), settings.partitions, per_record=40)
    await produce(settings, settings.topic(topics.CLICKS), records)
    expected = offline_sessions(records, sessionize.config(settings))

    first = await run_until_done(settings, workers, len(expected))
    fresh = await features_snapshot(settings)

    dry = replay(settings, "--topic", "clicks", "--target", "processor:sessionize")
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout and "output topic" in dry.stdout
    assert await features_snapshot(settings) == fresh          # nothing changed
    again = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS),
                             lambda got: len(got) >= len(first))
    assert len(again) == len(first)

    done = replay(settings, "--topic", "clicks", "--target", "processor:sessionize", "--execute")
    assert done.returncode == 0, done.stdout + done.stderr
    assert await features_snapshot(settings) == {"users": {}, "popular": []}   # reset

    rebuilt = await run_until_done(settings, workers, len(expected))
    await asyncio.sleep(1)
    rebuilt = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS),
                               lambda got: len(got) >= len(expected))
    key = lambda s: s["session_id"]  # noqa: E731
    assert sorted(rebuilt, key=key) == sorted(first, key=key) == sorted(expected, key=key)
    assert await features_snapshot(settings) == fresh


def unprefixed(snapshot: dict, prefix: str) -> dict:
    return {"users": {key[len(prefix):]: value for key, value in snapshot["users"].items()},
            "popular": snapshot["popular"]}


async def test_a_rebuild_from_a_time_equals_a_fresh_run_over_the_input_from_then(settings, workers,
                                                                                tmp_path):
    """Batch A, then time T, then batch B (the same visitors, overlapping event times): after
    `replay --from T --target processor:sessionize`, the rebuilt sessions and Redis features
    are those of a fresh deployment that only ever saw B."""
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=200)
    workers.settings = settings
    fresh = Workers(dataclasses.replace(settings, prefix=f"{settings.prefix}fresh."), tmp_path / "fresh")
    fresh.logdir.mkdir()
    await asyncio.gather(topics.ensure_topics(settings), topics.ensure_topics(fresh.settings))
    cfg = sessionize.config(settings)
    a = click_records(click_events(3_000, seed=5), settings.partitions, per_record=30)
    b = click_records(click_events(3_000, seed=6), settings.partitions, per_record=30)
    await produce(settings, settings.topic(topics.CLICKS), a)
    await asyncio.sleep(0.3)
    t = ms_to_iso(int(time.time() * 1000))     # record times of A are before, of B after
    await asyncio.sleep(0.3)
    await produce(settings, settings.topic(topics.CLICKS), b)
    await produce(fresh.settings, fresh.settings.topic(topics.CLICKS), b)
    expected = offline_sessions(b, cfg)
    assert 0 < len(expected) < len(offline_sessions(a + b, cfg))
    try:
        _, from_b_alone = await asyncio.gather(
            run_until_done(settings, workers, len(offline_sessions(a + b, cfg))),
            run_until_done(fresh.settings, fresh, len(expected)))
    finally:
        fresh.stop()
    features_of_b = unprefixed(await features_snapshot(fresh.settings), fresh.settings.prefix)

    refused = replay(settings, "--topic", "clicks", "--from", t, "--to", ms_to_iso(int(time.time() * 1000)),
                     "--target", "processor:sessionize")
    assert refused.returncode == 2 and "cannot stop at --to" in refused.stderr
    done = replay(settings, "--topic", "clicks", "--from", t, "--target", "processor:sessionize",
                  "--execute")
    assert done.returncode == 0, done.stdout + done.stderr
    first_b = [sum(partition == p for partition, _, _ in a) for p in (0, 1)]   # A's record counts
    assert (f"clicks from the start of the replayed range (offsets 0: {first_b[0]}, 1: {first_b[1]})"
            in done.stdout), done.stdout
    assert "sessions from its beginning" in done.stdout

    await run_until_done(settings, workers, len(expected))
    await asyncio.sleep(1)     # a double count would show up now
    rebuilt = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS),
                               lambda got: len(got) >= len(expected))
    key = lambda s: s["session_id"]  # noqa: E731
    assert sorted(rebuilt, key=key) == sorted(expected, key=key) == sorted(from_b_alone, key=key)
    assert unprefixed(await features_snapshot(settings), settings.prefix) == features_of_b


async def test_replay_refuses_while_the_processor_runs(settings, workers):
    await topics.ensure_topics(settings)
    workers.start("sessionize")
    await asyncio.sleep(4)  # joined its group
    out = replay(settings, "--topic", "clicks", "--target", "processor:sessionize")
    assert out.returncode == 2
    assert "active member" in out.stderr and "clickloop worker sessionize" in out.stderr


async def test_replay_range_into_a_backfill_topic(settings):
    await topics.ensure_topics(settings)
    records = click_records(click_events(2_000, seed=4), 1, per_record=10)
    await produce(settings, settings.topic(topics.CLICKS), records)
    out = replay(settings, "--topic", "clicks", "--from-offset", "50", "--to-offset", "150",
                 "--target", "topic:clicks.backfill", "--execute")
    assert out.returncode == 0, out.stderr
    assert "offsets [50, 150) = 100 records" in out.stdout
    copied = await read_topic(settings.kafka_bootstrap, settings.topic("clicks.backfill"),
                              lambda got: len(got) >= 100)
    assert copied == [orjson.loads(v) for _, _, v in records[50:150]]
