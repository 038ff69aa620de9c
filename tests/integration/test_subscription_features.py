"""Subscription features from CDC history on the real broker and Redis: rows of
`history.subscriptions` (two partitions; a user's rows in either) reach the features
worker, are repartitioned by user and folded; `user:<id>` then holds the group
`subscription` equal to the pure fold over the same rows (streams/subscription_features.py),
re-delivered rows and a record that is not a history row change nothing, and a
later change moves the group on."""
from __future__ import annotations

import dataclasses

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from streams import topics
from streams._native import murmur2
from streams.cdc_history import offline_history
from streams.feature_store import DAY, FEATURE_SET_VERSION, USER_SUBSCRIPTION, read
from streams.features_subscriptions import config
from streams.subscription_features import GROUP, features, fold_row, route
from tests.integration.helpers import debezium_changes, eventually

pytestmark = pytest.mark.integration

T0 = 1_790_000_000_000


def sub(pk: int, user: str, status: str) -> dict:
    return {"id": pk, "user_id": user, "plan": "pro", "status": status}


FIRST = [
    ("c", 1, sub(1, "ann", "active"), T0),
    ("c", 2, sub(2, "bob", "trialing"), T0 + DAY),
    ("u", 1, sub(1, "ann", "cancelled"), T0 + 3 * DAY),
    ("u", 2, sub(2, "bob", "active"), T0 + 8 * DAY),
    ("c", 3, sub(3, "bob", "active"), T0 + 9 * DAY),      # bob's second subscription row
    ("u", 1, sub(1, "ann", "active"), T0 + 10 * DAY),
    ("c", 4, sub(4, "cy", "active"), T0 + 11 * DAY),
    ("u", 1, sub(1, "ann", "cancelled"), T0 + 12 * DAY),
    ("u", 2, sub(2, "bob", "cancelled"), T0 + 14 * DAY),
    ("d", 4, None, T0 + 15 * DAY),
    ("r", 5, sub(5, "dee", "past_due"), T0 + 16 * DAY),
]
LATER = [("u", 1, sub(1, "ann", "trialing"), T0 + 40 * DAY)]


def expected(rows: list[dict], cfg) -> dict[str, tuple[int, dict]]:
    """user -> (ts, group values): the pure fold over all rows, grouped by user."""
    states: dict = {}
    for row in rows:
        routed = route(row, cfg)
        if routed is not None:
            states[routed[0]] = fold_row(states.get(routed[0]), row, cfg)
    return {u: (s.ts, features(s, cfg)) for u, s in states.items()}


async def produce(settings, rows: list[dict], extra=()) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for row in rows:    # keyed by key_id, Kafka's default partitioner, as cdc_history writes
            await producer.send_and_wait(settings.topic("history.subscriptions"),
                                         key=row["key_id"].encode(), value=orjson.dumps(row))
        for key, value in extra:
            await producer.send_and_wait(settings.topic("history.subscriptions"), key=key, value=value)
    finally:
        await producer.stop()


async def groups_in_redis(settings, r: aioredis.Redis, users) -> dict[str, tuple[int, dict] | None]:
    out = {}
    for user in users:
        got = read(USER_SUBSCRIPTION, FEATURE_SET_VERSION,
                   await r.hgetall(settings.redis_key("user", user)), now=0).groups[GROUP]
        out[user] = None if got.status == "missing" else (got.ts, got.values)
    return out


async def test_history_rows_become_the_subscription_group_of_each_user(settings, workers):
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=200, features_flush_ms=100)
    workers.settings = settings
    cfg = config(settings)
    records = debezium_changes(FIRST + LATER)
    all_rows, late = offline_history(records)
    first_rows, _ = offline_history(debezium_changes(FIRST))
    assert not late and first_rows == all_rows[:len(first_rows)]
    want = expected(first_rows, cfg)
    # The scenario the issue names: ann cancelled twice; bob has two rows in history.
    assert want["ann"][1] == {"status": "cancelled", "days_since_subscribed": 12, "cancellations": 2}
    assert want["bob"][1]["status"] == "active" and want["cy"][1]["status"] is None
    assert len({r["key_id"] for r in first_rows}) == 5
    # bob's rows 2 and 3 live in different history partitions: only the repartition by
    # user brings them together.
    assert len({(murmur2(k) & 0x7FFFFFFF) % settings.partitions for k in (b"2", b"3")}) == 2

    await topics.ensure_topics(settings, ("history.subscriptions",))
    # Every row, then some again (a re-delivery), and one record that is no history row.
    await produce(settings, first_rows + first_rows[2:6], [(b"x", b"not json"), (b"1", b"{}")])
    workers.start("features")
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        got = await eventually(lambda: groups_in_redis(settings, r, want), lambda g: g == want, 90,
                               "subscription groups in Redis equal the offline fold")
        assert got["ann"][1]["cancellations"] == 2 and got["ann"][0] == T0 + 12 * DAY
        assert got["dee"][1] == {"status": "past_due", "days_since_subscribed": None, "cancellations": 0}

        # A later change: ann subscribes again; the group moves on (timestamp and status).
        await produce(settings, all_rows[len(first_rows):])
        want_later = expected(all_rows, cfg)
        assert want_later["ann"] == (T0 + 40 * DAY, {"status": "trialing", "days_since_subscribed": 40,
                                                      "cancellations": 2})
        await eventually(lambda: groups_in_redis(settings, r, want_later), lambda g: g == want_later,
                         60, "the later change in Redis")
        # The group sits next to the USER groups of the same hash, with its own timestamp.
        raw = await r.hgetall(settings.redis_key("user", "ann"))
        assert {k.decode() for k in raw} >= {"_v", "_ts:subscription", "subscription:status"}
    finally:
        await r.aclose()
    assert "Traceback" not in workers.logs(), workers.logs()
