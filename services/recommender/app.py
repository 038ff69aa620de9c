"""Recommender HTTP service: `GET /v1/recommendations`, `GET /v1/experiments`, `GET /health`,
`GET /metrics`.

The handler has the shape of every clickloop handler: parse (`request.py`),
call the flow (`service.Recommender.recommend`: features, model, budget,
breakers, fallback), answer, then queue the exposure and maybe the shadow
scoring, neither awaited. `GET /v1/experiments` shows, read-only, the
experiments the allocation holds (running on the surface, posterior version,
sampler seed, the snapshots' counts). A bad query is a 400 with the reason; a dependency
failure is never a 5xx: it is a `fallback` answer with its `reason`.

BLAS is held to one thread for the whole process: numpy's matrix-vector
product on 10,000 × 64 factors gains nothing from threads and several BLAS
threads per request fought the event loop for 2 cores (DESIGN.md, serving).
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import os
import time

import orjson
from aiohttp import web

from services.recommender.metrics import Metrics
from services.recommender.request import BadRequest, parse_query
from services.recommender.service import Answer, Recommender, breaker_config
from services.settings import Settings, SettingsError
from services.tasks import cancel_and_wait
from services.workers import worker_info

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
RECOMMENDER = web.AppKey("recommender", Recommender)
MAX_REQUEST_ID = 100
GAUGES_EVERY_S = 1.0
NEVER = 1 << 30   # an older generation's threshold that is never reached
_JSON = "application/json"


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}), content_type=_JSON)


# Request ids: 32 hex digits like a uuid4's, from a random per-process prefix and a
# counter (uuid4 read the kernel's random source on every request: a system call).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def _new_id_prefix() -> None:  # a forked worker must not repeat its parent's ids
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_id_prefix)


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    if given and len(given) <= MAX_REQUEST_ID and given.isprintable():
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def body_of(request_id: str, visitor: str, answer: Answer, took_ms: float) -> bytes:
    r, m, p, a = answer.ranking, answer.model, answer.profile, answer.assignment
    return orjson.dumps({
        "request_id": request_id, "visitor": visitor, "path": r.path, "reason": answer.reason,
        "source": answer.source, "model": m.name if m else None,
        "model_version": m.version if m else None,
        "items": [{"item_id": i, "score": s} for i, s in zip(r.items, r.scores)],
        "features": p.status if p is not None else None,
        "experiment": a.experiment if a is not None else None,
        "arm": a.arm if a is not None else None, "took_ms": round(took_ms, 3)})


async def recommendations(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    metrics = request.app[METRICS]
    try:
        query = parse_query(request.query)
    except BadRequest as exc:
        metrics.bad_requests.inc()
        return _error(400, str(exc))
    service = request.app[RECOMMENDER]
    request_id = _request_id(request)
    answer = await service.recommend(query)
    took = time.perf_counter() - t0
    body = body_of(request_id, query.visitor, answer, took * 1000)
    ts = int(time.time() * 1000)
    service.log_exposure(request_id, ts, query, answer)
    service.maybe_shadow(request_id, ts, query, answer)
    metrics.served[answer.ranking.path].inc()
    metrics.source[answer.source].inc()
    if answer.reason is not None:
        metrics.fallback[answer.reason].inc()
    if answer.assignment is not None:
        metrics.arm(answer.assignment.experiment, answer.assignment.arm).inc()
    metrics.latency.observe(took)
    request.app[GC].request_done()
    return web.Response(body=body, content_type=_JSON)


async def health(request: web.Request) -> web.Response:
    report = request.app[RECOMMENDER].health()
    report["worker"] = worker_info()
    return web.Response(body=orjson.dumps(report), content_type=_JSON)


async def experiments(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[RECOMMENDER].experiments.describe()),
                        content_type=_JSON)


async def metrics(request: web.Request) -> web.Response:
    request.app[RECOMMENDER].refresh_metrics()
    return web.Response(body=request.app[METRICS].exposition(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def one_blas_thread() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    threadpool_limits(1, user_api="openmp")


def gc_watch(metrics: Metrics):
    """Record the collector's pauses (a full collection over a big heap stalls every request)."""
    started = [0.0]
    children = {g: metrics.gc_pause.labels(str(g)) for g in range(3)}

    def watch(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            children[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(watch)
    return watch


class GcPolicy:
    """Garbage collection: short young collections, the old generations on a timer.

    A request leaves almost no cyclic garbage (1,000 req/s for 16.5 s with the
    collector off: one `gc.collect()` found 749 unreachable objects), but the
    hot-key cache keeps ~35 tracked objects per entry alive for its TTL. With
    CPython's defaults each young collection walks everything allocated since
    the last one and every older collection walks the whole cache again: at
    (5,000, 20, 100) young pauses averaged 2.6 ms and older ones 20-35 ms, the
    bulk of the p99 at 1,000 req/s (collector off: p99 2.2-2.5 ms instead of 4-6).

    So objects that survive a young collection are never walked again by an
    automatic collection; a full collection runs every `recommender_gc_full_s`
    seconds to reclaim what cycles there are (its pause, tens of ms, is in
    /metrics with the others). Young collections come after every
    `recommender_gc_requests` requests (`request_done`, on the next turn of the
    loop, after the answer left): CPython's own trigger counts allocations minus
    deallocations, and a full cache frees an old entry for every new one, so
    between two of its collections the young generation grew with the requests
    served, to ~270 of them (~9,000 objects, 2.6 ms pauses); every 32 requests it
    is ~0.5 ms. The allocation threshold `recommender_gc_young` stays for work
    outside requests (Kafka consumers, model loads)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.every = settings.recommender_gc_requests
        self._served = 0
        self._thresholds = gc.get_threshold()
        self._full: asyncio.Task | None = None

    def start(self) -> None:
        self._thresholds = gc.get_threshold()
        gc.set_threshold(self.settings.recommender_gc_young, NEVER, NEVER)
        if self.settings.recommender_gc_full_s > 0:
            self._full = asyncio.get_running_loop().create_task(self._full_collections(),
                                                                name="gc-full")

    async def _full_collections(self) -> None:
        while True:
            await asyncio.sleep(self.settings.recommender_gc_full_s)
            gc.collect()

    def request_done(self) -> None:
        self._served += 1
        if self.every and self._served % self.every == 0:
            asyncio.get_running_loop().call_soon(gc.collect, 0)

    async def stop(self) -> None:
        await cancel_and_wait(self._full)
        gc.set_threshold(*self._thresholds)


GC = web.AppKey("gc", GcPolicy)


async def _refresh_gauges(app: web.Application) -> None:
    """With several workers, any one answers /metrics: each keeps its gauges current."""
    while True:
        app[RECOMMENDER].refresh_metrics()
        await asyncio.sleep(GAUGES_EVERY_S)


def check(settings: Settings) -> None:
    """Refuse settings the service cannot run with (before any worker starts)."""
    try:
        breaker_config(settings)
    except ValueError as exc:
        raise SettingsError(f"CLICKLOOP_BREAKER_*: {exc}") from None


def make_app(settings: Settings, model_wait_s: float = 15.0) -> web.Application:
    check(settings)
    one_blas_thread()
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[RECOMMENDER] = Recommender(settings, app[METRICS])
    app[GC] = GcPolicy(settings)

    async def lifecycle(app: web.Application):
        await app[RECOMMENDER].start(model_wait_s)
        # What start-up built (libraries, the model) lives as long as the process: out of
        # the collector's sight, so a full collection does not walk it (53 ms pauses seen
        # at 1,000 req/s before this); then `GcPolicy` for what requests allocate.
        gc.collect()
        gc.freeze()
        watch = gc_watch(app[METRICS])
        app[GC].start()
        gauges = (asyncio.get_running_loop().create_task(_refresh_gauges(app), name="gauges")
                  if app[METRICS].multiprocess_dir else None)
        yield
        await cancel_and_wait(gauges)
        await app[GC].stop()
        gc.callbacks.remove(watch)
        await app[RECOMMENDER].stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/v1/recommendations", recommendations)
    app.router.add_get("/v1/experiments", experiments)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
