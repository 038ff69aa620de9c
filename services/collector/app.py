"""Collector HTTP service: Segment's tracking API → enriched events on `clicks`.

`POST /v1/batch`, `/v1/track`, `/v1/page`, `/v1/screen`, `/v1/identify`,
`/v1/alias`, `/v1/group`, so Segment and RudderStack SDKs work unchanged
when pointed at the collector; `GET /health`, `GET /metrics`. A handler has
the shape of every clickloop handler: read, call the pure rules (`ingest`),
hand the events to the sink, await the broker's acknowledgement, answer.
A 2xx is sent only after Kafka acknowledged every record holding the
request's events (see sink.py); otherwise 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import orjson
from aiohttp import web

from services.collector.auth import Unauthorized, basic_user, check_write_key
from services.collector.ingest import (BatchTooLarge, BodyTooLarge, IngestError, Parsed, Request,
                                      UnsupportedEncoding, dlq_value, inflate, parse_request)
from services.collector.ip import client_ip
from services.collector.metrics import Metrics
from services.collector.sink import ClickSink, Unavailable
from services.collector.useragent import warm_up
from services.settings import Settings, SettingsError
from services.workers import worker_info

SETTINGS = web.AppKey("settings", Settings)
SINK = web.AppKey("sink", ClickSink)
METRICS = web.AppKey("metrics", Metrics)

ENDPOINTS: dict[str, str | None] = {"/v1/batch": None, "/v1/track": "track", "/v1/page": "page",
                                    "/v1/screen": "screen", "/v1/identify": "identify",
                                    "/v1/alias": "alias", "/v1/group": "group"}
RETRY_AFTER_S = "5"
COOKIE_MAX_AGE_S = 365 * 24 * 3600
MAX_COOKIE_ID = 200
_OK = orjson.dumps({"success": True})


def _error(status: int, code: str, message: str, **extra) -> web.Response:
    # `code` and `message` are what Segment's SDKs read from an error answer.
    body = {"success": False, "code": code, "message": message, "error": message, **extra}
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                        headers=headers)


def _cookie_id(request: web.Request, name: str) -> tuple[str | None, bool]:
    """The anonymous id from the first-party cookie, and whether it is new."""
    if not name:
        return None, False
    value = request.cookies.get(name)
    if value and len(value) <= MAX_COOKIE_ID and value.isprintable():
        return value, False
    return str(uuid.uuid4()), True


def _tracking(kind: str | None):
    async def handler(request: web.Request) -> web.Response:
        settings, metrics = request.app[SETTINGS], request.app[METRICS]
        metrics.requests.inc()
        try:
            header_key = basic_user(request.headers.get("Authorization"))
        except Unauthorized as exc:
            metrics.requests_rejected["unauthorized"].inc()
            return _error(401, "unauthorized", str(exc))
        if header_key and settings.require_write_key:
            try:
                check_write_key(settings.write_keys, header_key, None)
            except Unauthorized as exc:
                metrics.requests_rejected["unauthorized"].inc()
                return _error(401, "unauthorized", str(exc))
        try:
            body = inflate(await request.read(), request.headers.get("Content-Encoding"),
                           settings.max_batch_bytes)
        except (web.HTTPRequestEntityTooLarge, BodyTooLarge):
            metrics.requests_rejected["too_large"].inc()
            return _error(413, "payload_too_large",
                          f"body larger than the {settings.max_batch_bytes}-byte limit")
        except UnsupportedEncoding as exc:
            metrics.requests_rejected["malformed"].inc()
            return _error(415, "unsupported_encoding", str(exc))
        except IngestError as exc:   # a corrupt gzip stream
            metrics.requests_rejected["malformed"].inc()
            return _error(400, "invalid_request", str(exc))
        cookie_id, new_cookie = _cookie_id(request, settings.cookie_name)
        req = Request(received_at=int(time.time() * 1000),
                      ip=client_ip(request.headers.get("X-Forwarded-For"), request.remote,
                                   settings.trusted_proxies),
                      anonymize_ip=settings.anonymize_ip, cookie_id=cookie_id,
                      max_event_bytes=settings.max_event_bytes,
                      max_batch_bytes=settings.max_batch_bytes,
                      max_ahead_ms=settings.max_clock_ahead_s * 1000)
        try:
            parsed = parse_request(body, kind, req)
        except BatchTooLarge as exc:
            metrics.requests_rejected["too_large"].inc()
            return _error(413, "payload_too_large", str(exc))
        except IngestError as exc:
            if settings.require_write_key and not header_key:
                metrics.requests_rejected["unauthorized"].inc()
                return _error(401, "unauthorized", "no write key: send it as the HTTP Basic user "
                              "name (the body is not JSON with a writeKey either)")
            metrics.requests_rejected["malformed"].inc()
            return _error(400, "invalid_request", str(exc))
        if settings.require_write_key and not header_key:
            try:
                check_write_key(settings.write_keys, None, parsed.write_key)
            except Unauthorized as exc:
                metrics.requests_rejected["unauthorized"].inc()
                return _error(401, "unauthorized", str(exc))
        response = await _store(request, parsed, req.received_at)
        if new_cookie and parsed.used_cookie and response.status == 200:
            secure = request.secure or (settings.trusted_proxies > 0 and
                                        request.headers.get("X-Forwarded-Proto") == "https")
            response.set_cookie(settings.cookie_name, cookie_id, max_age=COOKIE_MAX_AGE_S,  # type: ignore[arg-type]
                                path="/", samesite="Lax", secure=secure, httponly=True)
        return response

    return handler


async def _store(request: web.Request, parsed: Parsed, received_at: int) -> web.Response:
    settings, sink, metrics = request.app[SETTINGS], request.app[SINK], request.app[METRICS]
    events, rejected = parsed.events, parsed.rejected
    where = f"{request.method} {request.path}"
    try:
        await sink.wait_ready(settings.produce_timeout_s)
        waits = sink.submit(events) if events else []
        if rejected:
            waits += await sink.send_dlq([dlq_value(sink.topic, f"{where} {r.position}", r.error,
                                                    r.raw, received_at) for r in rejected])
        if waits:
            done, pending = await asyncio.wait(waits, timeout=settings.produce_timeout_s)
            if pending:
                raise Unavailable(f"Kafka did not acknowledge within {settings.produce_timeout_s} s")
            for fut in done:
                error = fut.exception()
                if error is not None:
                    raise error if isinstance(error, Unavailable) else \
                        Unavailable(f"Kafka did not acknowledge: {error!r}")
    except Unavailable as exc:
        metrics.requests_rejected["unavailable"].inc()
        metrics.events_rejected["unavailable"].inc(len(events))
        return _error(503, "unavailable", str(exc))
    for r in rejected:
        metrics.events_rejected["too_large" if r.too_large else "invalid"].inc()
    metrics.dlq_records.inc(len(rejected))
    named = [{"position": r.position, "error": r.error} for r in rejected]
    if not events:
        too_large = all(r.too_large for r in rejected)
        metrics.requests_rejected["too_large" if too_large else "invalid"].inc()
        message = "; ".join(f"{r.position}: {r.error}" for r in rejected)
        return _error(413 if too_large else 400,
                      "payload_too_large" if too_large else "invalid_request", message,
                      rejected=named)
    metrics.events_accepted.inc(len(events))
    if not rejected:
        return web.Response(body=_OK, content_type="application/json")
    return web.Response(body=orjson.dumps({"success": True, "accepted": len(events),
                                           "rejected": named}),
                        content_type="application/json")


async def health(request: web.Request) -> web.Response:
    sink = request.app[SINK]
    problem = await sink.probe()
    if problem is None:
        body, status = {"status": "ok", "kafka": "connected", "partitions": sink.partitions}, 200
    else:
        body, status = {"status": "unavailable", "kafka": problem}, 503
    body["worker"] = worker_info()
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": "POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type, Authorization, Content-Encoding",
        "Access-Control-Max-Age": "86400"})


@web.middleware
async def cors(request: web.Request, handler) -> web.StreamResponse:
    """Browsers (analytics.js) post from the site's origin, with the cookie."""
    response = await handler(request)
    origin = request.headers.get("Origin")
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
    return response


def check(settings: Settings) -> None:
    """Refuse to start without a write key when one is required."""
    if settings.require_write_key and not settings.write_keys:
        raise SettingsError(
            "the collector requires a write key but CLICKLOOP_WRITE_KEYS is empty: set "
            "CLICKLOOP_WRITE_KEYS=key1[,key2...] (`clickloop up` makes one for local runs), "
            "or CLICKLOOP_REQUIRE_WRITE_KEY=false to accept anonymous traffic")


def make_app(settings: Settings) -> web.Application:
    check(settings)
    # The body limit applies to the body as sent and again after inflation (`inflate`:
    # the handler inflates, not aiohttp).
    app = web.Application(client_max_size=settings.max_batch_bytes, middlewares=[cors],
                          handler_args={"auto_decompress": False})
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[SINK] = ClickSink(settings, app[METRICS])

    async def sink(app: web.Application):
        warm_up()
        await app[SINK].start()
        yield
        await app[SINK].stop()

    app.cleanup_ctx.append(sink)
    for path, kind in ENDPOINTS.items():
        app.router.add_post(path, _tracking(kind))
        app.router.add_route("OPTIONS", path, preflight)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
