"""The `features` worker on the real broker and Redis: after a burst of events the
features in Redis equal an offline recomputation (the pure functions over the same
events, as of the same watermark), windows expire also for entities that sent
nothing since, bad records go to the DLQ with the reason and position, a replay
rebuild does not double count. (SIGKILL and Redis stopped: tests/faults/test_features_faults.py.)"""
from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from bench._common import produce
from schemas.clicks import partition_of, visitor_key
from services.demo import click_records
from streams import topics
from streams.feature_store import FEATURE_SET_VERSION, ITEM, POPULAR, USER, read
from streams.feature_windows import (DAY, HOUR, MINUTE, FeatureBatch, Popularity, item_features,
                                     merged, user_features)
from tests.integration.helpers import eventually, read_topic

pytestmark = pytest.mark.integration

T0 = 1_780_000_000_000 // DAY * DAY    # a midnight, UTC (event time only: the clock is never read)
NAMES = ["Products Searched", "Product Viewed", "Product Clicked", "Page Loaded"]


def ev(visitor: str, ts: int, name: str, item: str | None, mid: str) -> dict:
    return {"message_id": mid, "type": "track", "event": name, "user_id": visitor,
            "anonymous_id": None, "timestamp": ts, "received_at": ts, "context": {},
            "properties": {"item_id": item} if item else {}}


def sess(visitor: str, start: int, duration: int) -> dict:
    return {"v": 1, "session_id": f"{visitor}-{start}", "visitor": visitor, "user_id": visitor,
            "anonymous_id": None, "start": start, "end": start + duration,
            "duration_ms": duration, "event_count": 2}


def offline(events: list[dict], sessions: list[dict], partitions: int):
    """Features as one uninterrupted run computes them: per visitor partition (users,
    popularity, as of that partition's watermark), items as of the largest watermark."""
    by_part: dict[int, FeatureBatch] = {}
    for e in events:
        by_part.setdefault(partition_of(visitor_key(e), partitions), FeatureBatch()).add_clicks([e])
    for s in sessions:
        by_part.setdefault(partition_of(s["visitor"], partitions), FeatureBatch()).add_session(s)
    users, popular, items = {}, {}, FeatureBatch()
    for p, batch in by_part.items():
        for visitor, delta in batch.users.items():
            users[visitor] = user_features(merged(None, delta, batch.max_ts), batch.max_ts)
        popular[p] = (batch.popularity, batch.max_ts)
    top = max(b.max_ts for b in by_part.values())
    for b in by_part.values():
        for item, delta in b.items.items():
            items.items.setdefault(item, delta.__class__()).merge(delta)
    return users, {i: item_features(merged(None, d, top), top) for i, d in items.items.items()}, \
        popular, top


async def in_redis(settings, r: aioredis.Redis) -> dict:
    """Every feature hash under the test's prefix, read by the store's read rule."""
    out: dict[str, dict] = {"user": {}, "item": {}, "popular": {}}
    specs = {"user": USER, "item": ITEM, "popular": POPULAR}
    for kind, spec in specs.items():
        keys = [k async for k in r.scan_iter(match=settings.redis_key(kind, "*"), count=1000)]
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.hgetall(k)
        for k, raw in zip(keys, await pipe.execute()):
            entity = k.decode()[len(settings.redis_key(kind, "")):]
            got = read(spec, FEATURE_SET_VERSION, raw, now=0)
            out[kind][entity] = ({g: gr.values for g, gr in got.groups.items()},
                                 {g: gr.ts for g, gr in got.groups.items()})
    return out


def differences(got: dict, users: dict, items: dict, popular: dict, n_popular: int) -> list[str]:
    """What differs between Redis and the offline run (empty: equal)."""
    diff = []
    got_users = {u: v for u, (v, _) in got["user"].items()}
    got_items = {i: v for i, (v, _) in got["item"].items()}
    if got_users != users:
        bad = sorted(set(got_users) ^ set(users)) or \
            [u for u in users if got_users.get(u) != users[u]]
        diff.append(f"{len(bad)} users differ, e.g. {bad[:1]}: "
                    f"{[(got_users.get(u), users.get(u)) for u in bad[:1]]}")
    if got_items != items:
        bad = sorted(set(got_items) ^ set(items)) or [i for i in items if got_items.get(i) != items[i]]
        diff.append(f"{len(bad)} items differ, e.g. {[(got_items.get(i), items.get(i)) for i in bad[:1]]}")
    for p, (pop, watermark) in popular.items():
        if str(p) not in got["popular"]:
            diff.append(f"popular:{p} missing")
            continue
        values, ts = got["popular"][str(p)]
        back = Popularity.from_snapshot(values["top"], ts["top"]).top(n_popular, watermark)
        want = pop.top(n_popular, watermark)
        if dict(back) != pytest.approx(dict(want), rel=1e-9):
            diff.append(f"popular:{p} differs: {back[:3]} != {want[:3]}")
    return diff


async def wait_equal(settings, events, sessions, timeout_s: float = 60) -> dict:
    users, items, popular, _ = offline(events, sessions, settings.partitions)
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            got = await in_redis(settings, r)
            diff = differences(got, users, items, popular, settings.popular_items)
            if not diff:
                return got
            if time.monotonic() > deadline:
                raise AssertionError("Redis differs from the offline recomputation:\n" + "\n".join(diff))
            await asyncio.sleep(0.3)
    finally:
        await r.aclose()


def records_of(events: list[dict], partitions: int, per_record: int) -> list:
    return click_records(events, partitions, per_record)


def session_records(sessions: list[dict], partitions: int) -> list:
    return [(partition_of(s["visitor"], partitions), s["visitor"].encode(), orjson.dumps(s))
            for s in sessions]


def clock_events(ts: int, partitions: int, tag: str) -> list[dict]:
    """One page view at `ts` on every partition: every watermark ends at ts."""
    out, n = [], 0
    while len({partition_of(visitor_key(e), partitions) for e in out}) < partitions:
        visitor = f"clock-{tag}-{n}"
        if partition_of(visitor, partitions) not in {partition_of(visitor_key(e), partitions) for e in out}:
            out.append(ev(visitor, ts, "Page Loaded", None, f"{visitor}-m"))
        n += 1
    return out


async def test_burst_equals_offline_windows_expire_and_bad_records_go_to_the_dlq(settings, workers):
    settings = dataclasses.replace(settings, partitions=3, checkpoint_ms=200)
    workers.settings = settings
    await topics.ensure_topics(settings)
    rng = random.Random(17)
    end = T0 + 9 * DAY + 5 * HOUR
    events = [ev(f"v{rng.randrange(120)}", T0 + rng.randrange(9 * DAY), rng.choice(NAMES),
                 f"i{rng.randrange(40)}", f"m{n}") for n in range(3_000)]
    # The last hour is busy, so the 1 h item windows hold something at the end.
    events += [ev(f"v{rng.randrange(120)}", end - rng.randrange(HOUR), rng.choice(NAMES[1:3]),
                  f"i{rng.randrange(40)}", f"late{n}") for n in range(300)]
    # Quiet ones: only on day 0, nothing after: their 7 d counts must drop on day 8.
    events += [ev("quiet", T0 + HOUR, "Products Searched", None, "q1"),
               ev("quiet", T0 + HOUR + MINUTE, "Product Viewed", "quiet-item", "q2")]
    rng.shuffle(events)                                 # out of order in event time
    events += clock_events(end, settings.partitions, "a")
    sessions = [sess(f"v{rng.randrange(120)}", T0 + rng.randrange(9 * DAY), rng.randrange(1, 2 * HOUR))
                for _ in range(60)] + [sess("quiet", T0 + HOUR, 2 * MINUTE)]
    workers.start("features")
    clicks, sessions_topic = settings.topic(topics.CLICKS), settings.topic(topics.SESSIONS)
    await produce(settings, clicks, [(0, b"x", b"\xffnot json")])
    await produce(settings, sessions_topic, [(0, b"nobody", orjson.dumps({"visitor": "nobody"}))])
    # Two halves, so that the second half arrives after the first was written.
    half = len(events) // 2
    await produce(settings, clicks, records_of(events[:half], settings.partitions, 25))
    await produce(settings, sessions_topic, session_records(sessions, settings.partitions))
    await asyncio.sleep(0.5)
    await produce(settings, clicks, records_of(events[half:], settings.partitions, 25))

    got = await wait_equal(settings, events, sessions)
    assert len(got["user"]) > 120 and len(got["item"]) == 41 and len(got["popular"]) == 3
    engagement = [v["engagement"] for v, _ in got["item"].values()]
    assert sum(e["views_1h"] for e in engagement) > 0 and sum(e["clicks_24h"] for e in engagement) > 0
    assert sum(v["activity"]["sessions_7d"] for v, _ in got["user"].values()) > 0

    quiet, ts = got["user"]["quiet"]
    assert (quiet["activity"]["searches_7d"], quiet["activity"]["searches_30d"],
            quiet["activity"]["sessions_7d"]) == (0, 1, 0), "day 8: out of the 7 d window only"
    assert quiet["activity"]["avg_session_ms_30d"] == 2 * MINUTE
    assert ts["activity"] >= T0 + HOUR + 7 * DAY, "rewritten when its window expired"
    assert got["item"]["quiet-item"][0]["engagement"]["views_24h"] == 0
    assert {u: t["activity"] for u, (_, t) in got["user"].items() if t["activity"] > end} == {}
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        ttl = await r.pttl(settings.redis_key("user", "quiet"))
        assert USER.ttl_ms - 60_000 < ttl <= USER.ttl_ms
        assert 0 < await r.pttl(settings.redis_key("item", "quiet-item")) <= ITEM.ttl_ms
    finally:
        await r.aclose()

    (dead_click,) = await read_topic(settings.kafka_bootstrap, settings.topic(topics.CLICKS_DLQ),
                                     lambda got: len(got) >= 1)
    assert dead_click["position"] == f"{clicks}[0]@0" and dead_click["processor"] == "features"
    assert "not JSON" in dead_click["error"]
    (dead_session,) = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS_DLQ),
                                       lambda got: len(got) >= 1)
    assert dead_session["position"] == f"{sessions_topic}[0]@0"
    assert "start" in dead_session["error"] and dead_session["processor"] == "features"


async def test_replay_rebuilds_the_features_without_double_counting(settings, workers):
    """`clickloop replay --topic clicks --target processor:features --execute` resets all the
    worker owns (state changelog, item repartition topic, Redis hashes): the rebuilt
    features equal the offline run again, not twice it."""
    import os
    import subprocess
    import sys

    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=200)
    workers.settings = settings
    await topics.ensure_topics(settings)
    rng = random.Random(8)
    events = [ev(f"v{rng.randrange(50)}", T0 + rng.randrange(2 * DAY), rng.choice(NAMES),
                 f"i{rng.randrange(15)}", f"m{n}") for n in range(1_000)]
    sessions = [sess(f"v{rng.randrange(50)}", T0 + rng.randrange(2 * DAY), rng.randrange(1, HOUR))
                for _ in range(30)]
    await produce(settings, settings.topic(topics.CLICKS), records_of(events, 2, 20))
    await produce(settings, settings.topic(topics.SESSIONS), session_records(sessions, 2))
    workers.start("features")
    await wait_equal(settings, events, sessions)
    workers.stop()
    workers.procs.clear()
    stray = aioredis.Redis.from_url(settings.redis_url)
    await stray.hset(settings.redis_key("user", "gone"), "activity:last_seen", "1")
    await stray.aclose()

    done = subprocess.run([sys.executable, "-m", "services.cli", "replay", "--topic", "clicks",
                           "--target", "processor:features", "--execute"],
                          env={**os.environ, **settings.as_env()}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for reset in (settings.topic(topics.FEATURES_STATE), settings.topic(topics.FEATURES_ITEMS),
                  settings.redis_key("item:*"), settings.redis_key("popular:*")):
        assert reset in done.stdout, done.stdout
    workers.start("features")
    got = await wait_equal(settings, events, sessions)
    assert "gone" not in got["user"], "keys the worker owns are deleted by the reset"
    await asyncio.sleep(1.5)        # a double count would show up now
    await wait_equal(settings, events, sessions, timeout_s=1)


async def test_two_workers_share_the_partitions_and_still_equal_the_offline_run(settings, workers):
    """Scaled out: two `clickloop worker features` processes split the visitor and item
    partitions between them (items come from every visitor partition, whoever owns it)."""
    settings = dataclasses.replace(settings, partitions=4, checkpoint_ms=200)
    workers.settings = settings
    await topics.ensure_topics(settings)
    rng = random.Random(23)
    events = [ev(f"v{rng.randrange(200)}", T0 + rng.randrange(2 * DAY), rng.choice(NAMES),
                 f"i{rng.randrange(30)}", f"m{n}") for n in range(2_000)]
    events += clock_events(T0 + 2 * DAY, settings.partitions, "b")
    first = workers.start("features")
    second = workers.start("features")
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            async def members() -> int:
                described = await admin.describe_consumer_groups([topics.group_id(settings, "features")])
                # groups: (error_code, group, state, protocol_type, protocol, members)
                return sum(len(g[5]) for r in described for g in r.groups if g[2] == "Stable")
            await eventually(members, lambda n: n == 2, timeout_s=60, what="both workers in the group")
        finally:
            await admin.close()
        await produce(settings, settings.topic(topics.CLICKS), records_of(events, 4, 20))
        await wait_equal(settings, events, [])
        assert first.poll() is None and second.poll() is None, workers.logs()
        # Each worker prints its progress on a 1 s timer, so its line may follow the data
        # it wrote to Redis by a second or more on a loaded machine: wait for it.
        for start in (1, 2):
            log = workers.log_of("features", start)

            async def text() -> str:
                return log.read_text()  # noqa: B023 (awaited before `log` changes)
            try:
                await eventually(text, lambda t: "progress events=" in t, timeout_s=20,
                                 what=f"worker {start}'s progress line")
            except TimeoutError:
                pytest.fail(f"worker {start} processed nothing:\n" + workers.logs())
    finally:
        first.terminate()
        first.wait(timeout=20)
