"""The walking skeleton end to end, on the real broker (9092) and Redis (6379):
POST a batch → a session on `sessions` → features in Redis → GET recommendations."""
from __future__ import annotations

import base64
import dataclasses

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.admin import AIOKafkaAdminClient

from services.collector.app import make_app as collector_app
from services.recommender.app import make_app as recommender_app
from schemas.times import iso_to_ms
from streams import topics
from streams.feature_store import FEATURE_SET_VERSION, POPULAR, USER, read
from tests.integration.helpers import eventually, read_topic

pytestmark = pytest.mark.integration

MIN = 60_000


def at(minute: int) -> str:
    return f"2026-01-05T{10 + minute // 60:02d}:{minute % 60:02d}:00Z"


def event(user: str, minute: int, mid: str, name: str | None = None, item: str | None = None):
    e = {"type": "track" if name else "page", "userId": user, "messageId": mid,
         "timestamp": at(minute), "context": {"page": {"path": f"/p/{item}" if item else "/"}},
         "properties": {"item_id": item} if item else {}}
    if name:
        e["event"] = name
    return e


async def test_click_to_recommendation(settings, workers):
    workers.start("sessionize")
    workers.start("features")
    batch = [
        event("alice", 0, "a1"),
        event("alice", 1, "a2", "Product Viewed", "item-1"),
        event("alice", 2, "a3", "Product Viewed", "item-2"),
        event("bob", 3, "b1", "Product Viewed", "item-2"),
        # 40 minutes later: the partition's watermark passes alice's and bob's end + 30 min.
        event("carol", 45, "c1"),
    ]
    auth = {"Authorization": "Basic " + base64.b64encode(b"slice-key:").decode()}
    async with TestClient(TestServer(collector_app(
            dataclasses.replace(settings, write_keys=("slice-key",))))) as collector:
        resp = await collector.post("/v1/batch", data=orjson.dumps({"batch": batch}), headers=auth)
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"success": True}

    sessions = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS),
                                lambda got: len(got) >= 2, timeout_s=90)
    by_visitor = {s["visitor"]: s for s in sessions}
    assert set(by_visitor) == {"alice", "bob"}, workers.logs()
    alice = by_visitor["alice"]
    assert (alice["event_count"], alice["duration_ms"], alice["items"], alice["landing_page"]) == \
        (3, 2 * MIN, ["item-1", "item-2"], "/")

    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        # Clicks and sessions are two topics, read in no set order: a worker that starts
        # behind may apply the session first and the clicks in a later flush.
        raw = await eventually(lambda: redis.hgetall(settings.redis_key("user", "alice")),
                               lambda f: f.get(b"activity:sessions_7d") == b"1"
                               and len(orjson.loads(f.get(b"recent:items", b"[]"))) == 2,
                               what="alice's features")
        alice_features = read(USER, FEATURE_SET_VERSION, raw, now=0).groups
        assert alice_features["activity"].values["last_seen"] == iso_to_ms(at(2))
        assert [i for i, _, _ in alice_features["recent"].values["items"]] == ["item-2", "item-1"]
        popular = await eventually(lambda: redis.hgetall(settings.redis_key("popular", "0")),
                                   lambda f: b"top:items" in f, what="popular items")
        top = read(POPULAR, FEATURE_SET_VERSION, popular, now=0).groups["top"].values["items"]
        assert [item for item, _ in top] == ["item-2", "item-1"]   # viewed twice, once
    finally:
        await redis.aclose()

    async with TestClient(TestServer(recommender_app(settings))) as recommender:
        resp = await recommender.get("/v1/recommendations",
                                     params={"user_id": "alice", "k": "2", "exclude_seen": "false"})
        assert resp.status == 200
        body = await resp.json()
    assert [i["item_id"] for i in body["items"]] == ["item-2", "item-1"]

    # It really ran on the real broker and Redis server the settings name
    # (127.0.0.1:9092 and 6379 unless CLICKLOOP_KAFKA / CLICKLOOP_REDIS_URL say otherwise).
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        assert settings.topic(topics.SESSIONS) in await admin.list_topics()
        broker = next(iter(admin._client.cluster.brokers()))
        assert f"{broker.host}:{broker.port}" == settings.kafka_bootstrap
    finally:
        await admin.close()
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        info = await redis.info("server")
        assert info["tcp_port"] == redis.connection_pool.connection_kwargs["port"]
    finally:
        await redis.aclose()
