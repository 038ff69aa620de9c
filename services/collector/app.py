"""Collector HTTP service: `POST /v1/batch` → validate → `clicks` (acks=all).

The answer is sent only after the broker acknowledged every record of the
request, so a 2xx is never lost; if Kafka cannot take the records in time the
answer is 503 with Retry-After, never 2xx.
"""
from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.collector.ingest import IngestError, by_visitor, parse_batch
from services.settings import Settings
from streams import topics

SETTINGS = web.AppKey("settings", Settings)
PRODUCER = web.AppKey("producer", AIOKafkaProducer)
PRODUCE_TIMEOUT_S = 10.0


def _json(status: int, body: dict, **headers: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body),
                        content_type="application/json", headers=headers)


async def batch(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _json(413, {"success": False,
                           "error": f"batch larger than {settings.max_batch_bytes} bytes"})
    try:
        events = parse_batch(body, received_at=int(time.time() * 1000))
    except IngestError as exc:
        return _json(400, {"success": False, "error": str(exc)})
    producer = request.app[PRODUCER]
    topic = settings.topic(topics.CLICKS)
    try:
        async with asyncio.timeout(PRODUCE_TIMEOUT_S):
            acks = [await producer.send(topic, key=visitor.encode(), value=orjson.dumps(record))
                    for visitor, record in by_visitor(events).items()]
            await asyncio.gather(*acks)
    except (KafkaError, TimeoutError) as exc:
        return _json(503, {"success": False, "error": f"Kafka did not acknowledge: {exc!r}"},
                     **{"Retry-After": "5"})
    return _json(200, {"success": True})


async def health(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


def make_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.max_batch_bytes)
    app[SETTINGS] = settings

    async def kafka(app: web.Application):
        await topics.ensure_topics(settings)
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                    enable_idempotence=True, linger_ms=2)
        await producer.start()
        app[PRODUCER] = producer
        yield
        await producer.stop()

    app.cleanup_ctx.append(kafka)
    app.router.add_post("/v1/batch", batch)
    app.router.add_get("/health", health)
    return app
