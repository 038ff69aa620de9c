"""Recommender HTTP service: `GET /v1/recommendations?user_id=…&k=…`.

One Redis round trip per request (a pipeline): the top-k popular items and the
user's feature hash, which is returned in `debug`.
"""
from __future__ import annotations

import uuid

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from services.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
MAX_K = 100


def _json(status: int, body: dict) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def parse_query(query) -> tuple[str, int]:
    """The visitor and k from the query string; ValueError with the reason."""
    visitor = query.get("user_id") or query.get("anonymous_id")
    if not visitor:
        raise ValueError("give user_id or anonymous_id")
    raw_k = query.get("k", "10")
    try:
        k = int(raw_k)
    except ValueError:
        raise ValueError(f"k={raw_k!r} is not a whole number") from None
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={k} must be between 1 and {MAX_K}")
    return visitor, k


async def recommendations(request: web.Request) -> web.Response:
    try:
        visitor, k = parse_query(request.query)
    except ValueError as exc:
        return _json(400, {"error": str(exc)})
    settings = request.app[SETTINGS]
    pipe = request.app[REDIS].pipeline(transaction=False)
    pipe.zrevrange(settings.redis_key("items", "popular"), 0, k - 1, withscores=True)
    pipe.hgetall(settings.redis_key("user", visitor))
    try:
        popular, features = await pipe.execute()
    except RedisError as exc:
        return _json(503, {"error": f"feature store unavailable: {exc}"})
    return _json(200, {
        "request_id": uuid.uuid4().hex,
        "visitor": visitor,
        "path": "popular",
        "items": [{"item_id": item.decode(), "score": score} for item, score in popular],
        "debug": {"features": {f.decode(): v.decode() for f, v in features.items()}},
    })


async def health(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


def make_app(settings: Settings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings

    async def redis(app: web.Application):
        # A bounded pool that waits for a free connection instead of raising
        # "Too many connections" under a burst (DESIGN.md, serving notes).
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=32,
                                                        timeout=1.0)
        app[REDIS] = aioredis.Redis(connection_pool=pool)
        yield
        await app[REDIS].aclose()

    app.cleanup_ctx.append(redis)
    app.router.add_get("/v1/recommendations", recommendations)
    app.router.add_get("/health", health)
    return app
