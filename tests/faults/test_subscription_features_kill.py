"""SIGKILL of the `features` worker while history rows arrive: the subscription groups
in Redis end equal to the pure fold over every row (nothing lost), and the committed
repartition topic holds each routable history row exactly once (the routing stage's
transactions: no duplicate after a replay)."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import signal

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from streams import topics
from streams.cdc_history import offline_history
from streams.feature_store import DAY
from streams.features_subscriptions import config
from tests.integration.helpers import debezium_changes, eventually, read_topic
from tests.integration.test_subscription_features import expected, groups_in_redis

pytestmark = pytest.mark.integration

T0 = 1_790_000_000_000
STATUSES = ("active", "trialing", "cancelled", "past_due")


def changes(n: int, keys: int, users: int, seed: int) -> list[tuple]:
    """Creates, status changes and deletes of `keys` subscription rows of `users` users."""
    rng = random.Random(seed)
    live: dict[int, dict] = {}
    out, t = [], T0
    for _ in range(n):
        t += rng.randint(1, DAY // 4)
        pk = rng.randint(1, keys)
        if pk not in live:
            live[pk] = {"id": pk, "user_id": f"u{pk % users}", "status": rng.choice(STATUSES)}
            out.append(("c", pk, live[pk], t))
        elif rng.random() < 0.05:
            out.append(("d", pk, None, t))
            del live[pk]
        else:
            live[pk] = {**live[pk], "status": rng.choice(STATUSES)}
            out.append(("u", pk, live[pk], t))
    return out


async def test_sigkill_while_history_arrives_loses_nothing_and_routes_once(settings, workers):
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=200, features_flush_ms=50,
                                   instance_id="features-subs-kill")
    workers.settings = settings
    cfg = config(settings)
    rows, late = offline_history(debezium_changes(changes(5000, keys=600, users=200, seed=9)))
    assert not late
    want = expected(rows, cfg)
    assert max(v["cancellations"] for _, v in want.values()) >= 3
    await topics.ensure_topics(settings, ("history.subscriptions",))

    async def feed() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                    linger_ms=5)
        await producer.start()
        try:
            for i in range(0, len(rows), 250):
                for row in rows[i:i + 250]:
                    await producer.send(settings.topic("history.subscriptions"),
                                        key=row["key_id"].encode(), value=orjson.dumps(row))
                await producer.flush()
                await asyncio.sleep(0.5)
        finally:
            await producer.stop()

    feeding = asyncio.ensure_future(feed())
    r = aioredis.Redis.from_url(settings.redis_url)
    rng = random.Random(2)
    try:
        async def written() -> int:
            """Progress: the groups' timestamps only grow as rows are folded in."""
            got = await groups_in_redis(settings, r, want)
            return sum(v[0] for v in got.values() if v is not None)

        for _ in range(3):
            proc = workers.start("features")
            before = await written()
            await eventually(written, lambda n: n > before, timeout_s=60, what="the worker wrote")
            await asyncio.sleep(rng.uniform(0.1, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert not feeding.done(), "the history was complete before a kill: feed it slower"
        await feeding
        workers.start("features")
        await eventually(lambda: groups_in_redis(settings, r, want), lambda g: g == want, 90,
                         "subscription groups equal the offline fold after the kills")
    finally:
        feeding.cancel()
        await r.aclose()
    routed = await read_topic(settings.kafka_bootstrap, settings.topic(topics.FEATURES_SUBSCRIPTIONS),
                              lambda got: len(got) >= len(rows), 30)
    assert sorted(map(orjson.dumps, routed)) == sorted(
        orjson.dumps([r["key_id"], r["position"], r["revision"], r["valid_from"], r["row"]["status"],
                      r["is_deleted"], r["is_retracted"]]) for r in rows)
