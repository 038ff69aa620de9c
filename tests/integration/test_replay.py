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
from streams.feature_store import FEATURE_SET_VERSION, POPULAR, read
from streams.feature_windows import Popularity
from tests.conftest import Workers
from tests.integration.helpers import eventually, offline_sessions, read_topic

pytestmark = pytest.mark.integration


def replay(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "replay", *args],
                          env={**os.environ, **settings.as_env()}, capture_output=True,
                          text=True, timeout=120)


AS_OF = int(time.time() * 1000)     # popularity snapshots are compared decayed to this time


async def features_snapshot(settings) -> dict:
    """The features worker's hashes without their `_ts:` fields (the watermark of the flush
    that wrote them, which depends on how records fell into flushes), popularity decayed to
    one time and rounded (its float sums depend on the merge order)."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        out: dict[str, dict] = {"user": {}, "item": {}, "popular": {}}
        for kind in out:
            async for key in redis.scan_iter(match=settings.redis_key(kind, "*"), count=1000):
                raw = await redis.hgetall(key)
                fields = {f: v for f, v in raw.items() if not f.startswith(b"_ts:")}
                if kind == "popular":
                    top = read(POPULAR, FEATURE_SET_VERSION, raw, now=0).groups["top"]
                    pop = Popularity.from_snapshot(top.values, top.ts).top(1000, AS_OF)
                    fields = [(i, float(f"{s:.9g}")) for i, s in pop]
                out[kind][key] = fields
        return out
    finally:
        await redis.aclose()


def sessions_counted(snapshot: dict) -> int:
    return sum(int(u.get(b"activity:sessions_7d", 0)) for u in snapshot["user"].values())


async def settled(settings) -> dict:
    """The snapshot once it stops changing (Redis writes are asynchronous)."""
    last = None
    for _ in range(60):
        snap = await features_snapshot(settings)
        if snap == last:
            return snap
        last = snap
        await asyncio.sleep(0.7)
    raise AssertionError("features did not settle in 40 s")


async def run_until_done(settings, workers, n_sessions: int) -> list[dict]:
    workers.start("sessionize")
    workers.start("features")
    sessions = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS),
                                lambda got: len(got) >= n_sessions, timeout_s=90)
    # features are done when every session is counted (all of them are within 7 d)
    await eventually(lambda: features_snapshot(settings),
                     lambda snap: sessions_counted(snap) == n_sessions, timeout_s=60,
                     what="features caught up")
    await settled(settings)
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
    assert await features_snapshot(settings) == {"user": {}, "item": {}, "popular": {}}   # reset

    rebuilt = await run_until_done(settings, workers, len(expected))
    await asyncio.sleep(1)
    rebuilt = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS),
                               lambda got: len(got) >= len(expected))
    key = lambda s: s["session_id"]  # noqa: E731
    assert sorted(rebuilt, key=key) == sorted(first, key=key) == sorted(expected, key=key)
    assert await features_snapshot(settings) == fresh


def unprefixed(snapshot: dict, prefix: str) -> dict:
    return {kind: {key[len(prefix):]: value for key, value in hashes.items()}
            for kind, hashes in snapshot.items()}


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
