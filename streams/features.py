"""Faust agents `features`: `clicks` and `sessions` → Redis (the only writer of these keys).

Redis layout (prefix from CLICKLOOP_PREFIX):
  user:<visitor>   hash: events, sessions, last_seen (epoch ms)
  items:popular    sorted set: item id → views
Each Kafka record becomes one pipeline (MULTI/EXEC) of increments.
"""
from __future__ import annotations

import redis.asyncio as aioredis

import faust

from services.settings import Settings
from streams import topics
from streams.aggregates import FeatureDelta
from streams.app import now
from streams.codec import BadRecord, decode_clicks, decode_session
from streams.dlq import dlq_record
from streams.meter import Meter


def keys(settings: Settings):
    return (lambda visitor: settings.redis_key("user", visitor)), settings.redis_key("items", "popular")


async def apply(redis: aioredis.Redis, settings: Settings, delta: FeatureDelta) -> None:
    user_key, popular = keys(settings)
    pipe = redis.pipeline(transaction=True)
    for visitor, n in delta.user_events.items():
        pipe.hincrby(user_key(visitor), "events", n)
    for visitor, ts in delta.user_last_seen.items():
        # last_seen only moves forward, whatever order records arrive in.
        pipe.eval("local c = tonumber(redis.call('HGET', KEYS[1], 'last_seen') or '-1') "
                  "if tonumber(ARGV[1]) > c then redis.call('HSET', KEYS[1], 'last_seen', ARGV[1]) end",
                  1, user_key(visitor), ts)
    for visitor, n in delta.user_sessions.items():
        pipe.hincrby(user_key(visitor), "sessions", n)
    for item, n in delta.item_views.items():
        pipe.zincrby(popular, n, item)
    await pipe.execute()


def build(app: faust.App, settings: Settings, meter: Meter) -> None:
    clicks = app.topic(settings.topic(topics.CLICKS), key_serializer="raw", value_serializer="raw")
    sessions = app.topic(settings.topic(topics.SESSIONS), key_serializer="raw", value_serializer="raw")
    dlqs = {settings.topic(topics.CLICKS): app.topic(settings.topic(topics.CLICKS_DLQ), value_serializer="raw"),
            settings.topic(topics.SESSIONS): app.topic(settings.topic(topics.SESSIONS_DLQ), value_serializer="raw")}
    redis = aioredis.Redis.from_url(settings.redis_url, max_connections=16)

    async def dead_letter(record, exc: Exception) -> None:
        msg = record.message
        await dlqs[msg.topic].send(value=dlq_record(msg.topic, msg.partition, msg.offset, str(exc),
                                                    record.key, record.value, "features"))

    @app.agent(clicks, name="features-clicks")
    async def from_clicks(stream):
        async for record in stream.events():
            try:
                events = decode_clicks(record.value)
            except BadRecord as exc:
                await dead_letter(record, exc)
                continue
            await apply(redis, settings, FeatureDelta().add_clicks(events))
            meter.update(len(events), now())

    @app.agent(sessions, name="features-sessions")
    async def from_sessions(stream):
        async for record in stream.events():
            try:
                session = decode_session(record.value)
            except BadRecord as exc:
                await dead_letter(record, exc)
                continue
            await apply(redis, settings, FeatureDelta().add_session(session))
