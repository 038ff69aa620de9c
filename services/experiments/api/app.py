"""Experiments HTTP service: the registry API, results and the dashboard.

  POST /v1/experiments               create a draft (201)
  POST /v1/experiments/{id}/start    draft -> running (its start becomes now)
  POST /v1/experiments/{id}/stop     draft|running -> stopped
  GET  /v1/experiments[?status=&surface=]
  GET  /v1/experiments/{id}
  GET  /v1/experiments/{id}/results[?alpha=&power=&mde=&seed=&draws=]
  GET  /v1/history/{table}/{key}[?as_of=]   CDC history (services/history/routes.py)
  GET  /openapi.json, /health, /metrics
  GET  /  and  /experiments/{id}     the dashboard (static HTML + JS drawing SVG)

Handlers have the shape of every clickloop handler: parse, call the pure rules
(registry, results), hand the record to the store (which answers only after
the broker acknowledged it and the fold accepted it, see store.py), answer.
Errors are JSON `{"error": reason}`: 400 bad input, 404 unknown id (or route),
405 wrong method, 409 refused by the registry (collision, state machine, existing
id), 413 body over 256 KB, 500 unreadable server data (a posterior snapshot) or a
bug, 503 with Retry-After when Kafka cannot take or confirm the write or results
took longer than RESULTS_TIMEOUT_S. aiohttp's own errors (413, 405, unknown routes)
go through `json_errors` to keep that shape.

Results are computed in a small thread pool of their own, not on the event loop:
their Monte Carlo work (bounded by results.MAX_DRAW_CELLS) would otherwise hold up
/health and writes for as long as it runs.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
from aiohttp import web

from services.experiments import ExperimentError, registry
from services.experiments.api.metrics import Metrics
from services.experiments.api.openapi import document
from services.experiments.api.store import Conflict, ExperimentStore, Unavailable
from services.experiments.bayesian import UNIFORM
from services.experiments.report import parse_mde
from services.experiments.results import SnapshotError, check_draws, read_snapshot, results
from services.history import routes as history_routes
from schemas.experiments import SCHEMA_VERSION, Experiment
from services.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", ExperimentStore)
METRICS = web.AppKey("metrics", Metrics)
RESULTS_POOL = web.AppKey("results_pool", ThreadPoolExecutor)

log = logging.getLogger("clickloop.experiments.api")

STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = "5"
MAX_DRAWS = 200_000
MAX_BODY = 256 * 1024
RESULTS_WORKERS = 2            # results computed at once; more wait their turn (in the timeout)
RESULTS_TIMEOUT_S = 10.0       # waiting plus computing; then 503 with Retry-After
SERVER_FIELDS = ("v", "revision", "status", "ended", "updated")
DEFAULTS = {"population": {}, "unit": "user_id", "kind": "ab", "epsilon": None,
            "primary_metric": "click_through", "namespace": None}
STATUSES = ("draft", "running", "stopped")
_JSON = "application/json"


class BadRequest(ExperimentError):
    """The request itself is wrong (400)."""


class NotFound(ExperimentError):
    """No experiment with that id (404)."""


def _json(body, status: int = 200, headers=None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                        content_type=_JSON, headers=headers)


def _error(status: int, message: str) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return _json({"error": message}, status, headers)


def _now_ms() -> int:
    return int(time.time() * 1000)


def draft(body: object, now: int) -> dict:
    """The first record of an experiment from a create request (defaults filled in)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object describing the experiment")
    given = sorted(k for k in SERVER_FIELDS if k in body)
    if given:
        raise BadRequest(f"{', '.join(given)} are set by the service, not by the request")
    record = {**DEFAULTS, "start": now, **body}
    arms = record.get("arms")
    if isinstance(arms, list):
        record["arms"] = [{**a, "description": a.get("description")} if isinstance(a, dict) else a
                          for a in arms]
    record.update(v=SCHEMA_VERSION, revision=1, status="draft", ended=None, updated=now)
    # The schema's field order first (what a reader of the topic sees), unknown fields
    # last (validation refuses them with their names).
    order = list(Experiment.__annotations__)
    return {**{k: record[k] for k in order if k in record},
            **{k: v for k, v in record.items() if k not in order}}


async def _write(request: web.Request, make, status: int = 200) -> web.Response:
    metrics = request.app[METRICS]
    try:
        record = await request.app[STORE].write(make)
    except (BadRequest, registry.RecordError) as exc:
        metrics.writes["invalid"].inc()
        return _error(400, str(exc))
    except NotFound as exc:
        metrics.writes["not_found"].inc()
        return _error(404, str(exc))
    except Conflict as exc:
        metrics.writes["conflict"].inc()
        return _error(409, str(exc))
    except Unavailable as exc:
        metrics.writes["unavailable"].inc()
        return _error(503, str(exc))
    metrics.writes["ok"].inc()
    headers = {"Location": f"/v1/experiments/{record['id']}"} if status == 201 else None
    return _json(record, status, headers)


async def create(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        return _error(400, f"the body is not JSON: {exc}")
    try:
        record = draft(body, _now_ms())
    except BadRequest as exc:
        return _error(400, str(exc))

    def make(reg: registry.Registry) -> dict:
        if isinstance(record.get("id"), str) and record["id"] in reg.experiments:
            existing = reg.experiments[record["id"]]
            raise Conflict(f"experiment {record['id']!r} already exists ({existing['status']}); "
                           "choose another id")
        return record

    return await _write(request, make, 201)


def _transition(rule):
    async def handler(request: web.Request) -> web.Response:
        exp_id = request.match_info["id"]

        def make(reg: registry.Registry) -> dict:
            current = reg.experiments.get(exp_id)
            if current is None:
                raise NotFound(f"no experiment {exp_id!r}")
            try:
                return rule(current, _now_ms())
            except registry.RecordError as exc:  # not a draft, already stopped, end passed
                raise Conflict(str(exc)) from None

        return await _write(request, make)

    return handler


def _current(request: web.Request) -> dict:
    exp_id = request.match_info["id"]
    exp = request.app[STORE].registry.experiments.get(exp_id)
    if exp is None:
        raise NotFound(f"no experiment {exp_id!r}")
    return exp


async def _ready(request: web.Request) -> web.Response | None:
    store = request.app[STORE]
    if not store.ready.is_set():
        return _error(503, f"the registry is still being read from {store.topic}: {store.last_error}")
    return None


async def list_experiments(request: web.Request) -> web.Response:
    if (busy := await _ready(request)) is not None:
        return busy
    status, surface = request.query.get("status"), request.query.get("surface")
    if status is not None and status not in STATUSES:
        return _error(400, f"status={status!r}: use one of {', '.join(STATUSES)}")
    exps = [e for _, e in sorted(request.app[STORE].registry.experiments.items())
            if (status is None or e["status"] == status) and (surface is None or e["surface"] == surface)]
    return _json({"experiments": exps, "count": len(exps)})


async def get_experiment(request: web.Request) -> web.Response:
    if (busy := await _ready(request)) is not None:
        return busy
    try:
        return _json(_current(request))
    except NotFound as exc:
        return _error(404, str(exc))


def _number(query, name: str, default, kind=float, low=None, high=None):
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise BadRequest(f"{name}={raw!r} is not a {'whole ' if kind is int else ''}number") from None
    if kind is float and not math.isfinite(value):
        raise BadRequest(f"{name}={raw!r} is not a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadRequest(f"{name}={raw!r} must be between {low} and {high}")
    return value


async def get_results(request: web.Request) -> web.Response:
    if (busy := await _ready(request)) is not None:
        return busy
    try:
        exp = _current(request)
    except NotFound as exc:
        return _error(404, str(exc))
    q = request.query
    try:
        alpha = _number(q, "alpha", 0.05, low=1e-9, high=1 - 1e-9)
        power = _number(q, "power", 0.8, low=1e-9, high=1 - 1e-9)
        draws = _number(q, "draws", None, int, 1, MAX_DRAWS)
        seed = _number(q, "seed", None, int, 0, 2 ** 53 - 1)
        mde = parse_mde(q["mde"]) if q.get("mde") else None
        kwargs = {"draws": draws} if draws is not None else {}
        if draws is not None:
            check_draws(len(exp["arms"]), draws)
        snap = read_snapshot(request.app[STORE].snapshots.get(exp["id"]),
                             [a["name"] for a in exp["arms"]])
    except SnapshotError as exc:
        return _unreadable(exp, exc)
    except ExperimentError as exc:
        return _error(400, str(exc))
    compute = functools.partial(results, exp, snap, alpha=alpha, power=power, mde=mde,
                                prior=UNIFORM, seed=seed, **kwargs)
    loop = asyncio.get_running_loop()
    try:
        body = await asyncio.wait_for(loop.run_in_executor(request.app[RESULTS_POOL], compute),
                                      RESULTS_TIMEOUT_S)
    except TimeoutError:
        return _error(503, f"the results of {exp['id']!r} took longer than {RESULTS_TIMEOUT_S:g} s "
                           "(other results requests are being computed); retry later, or with "
                           "fewer draws")
    except ExperimentError as exc:
        # The request was checked above: what is left is the data (the registry's record
        # or the snapshot), which the client cannot fix.
        return _error(500, f"the results of {exp['id']!r} cannot be computed from its record "
                           f"and latest bandit.posteriors snapshot: {exc}")
    body["experiment_record"] = exp
    return _json(body)


def _unreadable(exp: dict, exc: Exception) -> web.Response:
    return _error(500, f"the latest bandit.posteriors snapshot of {exp['id']!r} is unreadable: {exc}")


_TEXT = {"type": "string"}
_OBJECT = {"type": "object"}
# The history routes mounted from services/history/routes.py (their own module
# documents the answers); listed here so that the document covers every route.
HISTORY_PATHS = {
    "/v1/history": {"get": {
        "operationId": "historyTables", "summary": "CDC history tables held, keys and rows each",
        "responses": {"200": {"description": "tables, rows, caught_up, topics",
                              "content": {_JSON: {"schema": _OBJECT}}}}}},
    "/v1/history/{table}/{key}": {"get": {
        "operationId": "getHistory",
        "summary": "a row's SCD2 history (history.<table>), or its version at as_of",
        "parameters": [
            {"name": "table", "in": "path", "required": True, "schema": _TEXT,
             "description": "the history topic's suffix (subscriptions for history.subscriptions)"},
            {"name": "key", "in": "path", "required": True, "schema": _TEXT,
             "description": "the row's key_id (a one-column key's value, else compact JSON)"},
            {"name": "as_of", "in": "query", "required": False, "schema": _TEXT,
             "description": "ISO-8601 time (naive: UTC) or epoch milliseconds"}],
        "responses": {
            "200": {"description": "versions (full history) or version (as_of)",
                    "content": {_JSON: {"schema": _OBJECT}}},
            "400": {"description": "as_of does not parse", "content": {_JSON: {"schema": _OBJECT}}},
            "404": {"description": "unknown table or key, no version or deleted at as_of",
                    "content": {_JSON: {"schema": _OBJECT}}}}}},
}


async def openapi(request: web.Request) -> web.Response:
    doc = document()
    return _json({**doc, "paths": {**doc["paths"], **HISTORY_PATHS}})


async def health(request: web.Request) -> web.Response:
    store = request.app[STORE]
    ok = store.producer is not None and store.ready.is_set()
    body = {"status": "ok" if ok else "unavailable",
            "kafka": "connected" if store.producer is not None else store.producer_error,
            "registry": "caught up" if store.ready.is_set() else "reading",
            "experiments": len(store.registry.experiments), "snapshots": len(store.snapshots),
            "applied_offset": store.applied}
    return _json(body, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    m, store = request.app[METRICS], request.app[STORE]
    m.observe(store)
    return web.Response(body=m.exposition(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _page(name: str):
    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
    return handler


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own errors (413 body too large, 405, 404 of unknown routes) and
    unexpected exceptions in the documented JSON shape, not text/plain."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.text or exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:  # noqa: BLE001  a bug: logged with its traceback, answered as JSON
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, f"internal error ({type(exc).__name__}); the service logged it")


@web.middleware
async def count(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    route = request.match_info.route.resource
    request.app[METRICS].requests.labels(request.method, route.canonical if route else "other",
                                         str(response.status)).inc()
    return response


def make_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[count, json_errors], client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[STORE] = ExperimentStore(settings)
    app[RESULTS_POOL] = ThreadPoolExecutor(RESULTS_WORKERS, thread_name_prefix="results")

    async def lifecycle(app: web.Application):
        await app[STORE].start()
        yield
        await app[STORE].stop()
        app[RESULTS_POOL].shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(lifecycle)
    r = app.router
    r.add_post("/v1/experiments", create)
    r.add_get("/v1/experiments", list_experiments)
    r.add_get("/v1/experiments/{id}", get_experiment)
    r.add_post("/v1/experiments/{id}/start", _transition(registry.start))
    r.add_post("/v1/experiments/{id}/stop", _transition(registry.stop))
    r.add_get("/v1/experiments/{id}/results", get_results)
    r.add_get("/openapi.json", openapi)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/", _page("index.html"))
    r.add_get("/experiments/{id}", _page("experiment.html"))
    r.add_static("/static/", STATIC)
    # CDC history lookups (issue 7): their consumer of history.* starts and stops with the app.
    history_routes.add_routes(app, settings)
    return app
