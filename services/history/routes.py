"""History query routes, for any aiohttp application (the experiments/API service).

  GET /v1/history                           tables held, keys and rows each, caught_up
  GET /v1/history/<table>/<key>             the key's full history (versions by position)
  GET /v1/history/<table>/<key>?as_of=TIME  the version in effect at TIME (ISO-8601, a
                                            naive time is UTC; or epoch milliseconds)

`<table>` is the history topic's name after `history.` (`subscriptions` for
`history.subscriptions`), `<key>` the row's key_id (streams.debezium.key_id: a
one-column key's value, else the key as compact JSON, URL-encoded).

Answers come from memory: a background consumer reads every `history.*` topic
(under the prefix, read_committed, new topics found within `METADATA_MAX_AGE_MS`)
from the beginning into a `HistoryStore`. 404 says why (unknown table or key,
no version at that time, deleted at that time: the deleted marker is included);
400 for a time that does not parse.
"""
from __future__ import annotations

import asyncio
import logging
import re
from datetime import datetime, timezone

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer

from services.history.store import HistoryStore
from services.settings import Settings
from services.tasks import cancel_and_wait
from streams import topics

log = logging.getLogger("clickloop.history")

METADATA_MAX_AGE_MS = 5000
STORE = web.AppKey("history_store", HistoryStore)
STATUS = web.AppKey("history_status", dict)


class BadTime(ValueError):
    pass


def parse_time(raw: str) -> int:
    """An ISO-8601 time (naive: UTC) or epoch milliseconds, as epoch milliseconds."""
    text = raw.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace(" ", "T", 1) if "T" not in text else text)
    except ValueError:
        raise BadTime(f"as_of={raw!r} is not an ISO-8601 time (2026-11-26T05:30:00Z) or epoch "
                      "milliseconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _json(doc, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def answer(store: HistoryStore, table: str, key_id: str, as_of: str | None) -> tuple[int, dict]:
    """The HTTP status and body of a lookup (the handler without aiohttp)."""
    if table not in store.tables:
        known = ", ".join(sorted(store.tables)) or "none yet"
        return 404, {"error": f"no history table {table!r} (known: {known})"}
    versions = store.history(table, key_id)
    if not versions:
        return 404, {"error": f"no history for key {key_id!r} in table {table!r}"}
    if as_of is None:
        return 200, {"table": table, "key_id": key_id, "versions": versions}
    try:
        when = parse_time(as_of)
    except BadTime as exc:
        return 400, {"error": str(exc)}
    version = store.at(table, key_id, when)
    body = {"table": table, "key_id": key_id, "as_of": _iso(when), "as_of_ms": when}
    if version is None:
        first = versions[0]["valid_from"]
        reason = (f"key {key_id!r} did not exist yet at {_iso(when)}: its history starts at "
                  f"{_iso(first)}") if when < first else f"key {key_id!r} has no version at {_iso(when)}"
        return 404, {**body, "error": reason}
    if version["is_deleted"]:
        return 404, {**body, "error": f"key {key_id!r} was deleted at {_iso(when)} (since "
                                      f"{_iso(version['valid_from'])})", "version": version}
    return 200, {**body, "version": version}


async def _consume(app: web.Application, settings: Settings) -> None:
    store, status = app[STORE], app[STATUS]
    pattern = "^" + re.escape(settings.topic(topics.HISTORY_PREFIX)) + r"[^.]+$"
    cut = len(settings.topic(topics.HISTORY_PREFIX))
    while True:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    isolation_level="read_committed",
                                    metadata_max_age_ms=METADATA_MAX_AGE_MS)
        try:
            await consumer.start()
            consumer.subscribe(pattern=pattern)
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
                for tp, records in batches.items():
                    table = tp.topic[cut:]
                    for record in records:
                        if record.value is None:
                            continue
                        try:
                            store.add(table, orjson.loads(record.value))
                        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                            log.warning("skipping %s[%d]@%d: not a history row (%s)",
                                        tp.topic, tp.partition, record.offset, exc)
                status["caught_up"] = not batches
                status["topics"] = sorted(t for t in consumer.subscription())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (the broker away: retry, keep serving memory)
            log.error("history consumer failed (%r); retrying in 1 s", exc)
            await asyncio.sleep(1.0)
        finally:
            await consumer.stop()


def add_routes(app: web.Application, settings: Settings) -> None:
    """Register the history routes and their background consumer on `app`."""
    app[STORE] = HistoryStore()
    app[STATUS] = {"caught_up": False, "topics": []}

    async def consumer_ctx(app: web.Application):
        task = asyncio.ensure_future(_consume(app, settings))
        yield
        await cancel_and_wait(task)

    async def tables(request: web.Request) -> web.Response:
        store = request.app[STORE]
        return _json({"tables": {t: {"keys": len(keys)} for t, keys in store.tables.items()},
                      "rows": store.rows, **request.app[STATUS]})

    async def lookup(request: web.Request) -> web.Response:
        status, body = answer(request.app[STORE], request.match_info["table"],
                              request.match_info["key"], request.query.get("as_of"))
        return _json(body, status)

    app.cleanup_ctx.append(consumer_ctx)
    app.router.add_get("/v1/history", tables)
    app.router.add_get("/v1/history/{table}/{key}", lookup)
