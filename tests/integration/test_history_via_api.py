"""The history routes served by the experiments/API service (issue 7, "Queries"): rows
produced on `history.<table>` (twice, in reverse order: the store keeps the highest
revision of each version) answer full history and as-of lookups through the
experiments app, next to its own routes, with the pure fold's answers."""
from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from services.experiments.api.app import make_app
from services.history.routes import parse_time
from streams import topics
from streams.cdc_history import offline_history
from streams.history import resolve, version_at
from tests.integration.helpers import debezium_changes, eventually

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
T0 = parse_time("2026-01-05T09:00:00Z")


def row(pk: int, user: str, status: str, plan: str = "pro") -> dict:
    return {"id": pk, "user_id": user, "plan": plan, "status": status}


CHANGES = [
    ("r", 1, row(1, "ann", "active"), T0),
    ("c", 2, row(2, "bob", "trialing"), T0 + DAY_MS),
    ("u", 2, row(2, "bob", "active"), T0 + 8 * DAY_MS),
    ("u", 1, row(1, "ann", "cancelled"), T0 + 10 * DAY_MS),
    ("u", 2, row(2, "bob", "active", "team"), T0 + 12 * DAY_MS),
    ("d", 1, None, T0 + 20 * DAY_MS),
]


async def produce(settings, table: str, rows: list[dict]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for r in rows:
            await producer.send(settings.topic(f"history.{table}"), key=r["key_id"].encode(),
                                value=orjson.dumps(r))
        await producer.flush()
    finally:
        await producer.stop()


async def get(client: TestClient, path: str) -> tuple[int, dict]:
    resp = await client.get(path)
    return resp.status, orjson.loads(await resp.read())


async def test_history_lookups_through_the_experiments_service(settings):
    rows, late = offline_history(debezium_changes(CHANGES))
    assert not late and len(rows) > len(CHANGES)  # versions re-written when closed
    expected = resolve(rows)
    await topics.ensure_topics(settings, ("history.subscriptions",))
    # Every row twice, the second pass in reverse: the highest revision still wins.
    await produce(settings, "subscriptions", rows + rows[::-1])

    app = make_app(settings)
    async with TestClient(TestServer(app)) as client:
        await eventually(lambda: get(client, "/v1/history"),
                         lambda r: r[0] == 200 and r[1]["rows"] == 2 * len(rows), 60,
                         "history rows read by the experiments service")
        # The experiments routes still answer (the registry caught up) next to history.
        await eventually(lambda: get(client, "/health"), lambda r: r[0] == 200, 60, "registry ready")
        assert (await get(client, "/v1/experiments"))[1]["count"] == 0

        tables = (await get(client, "/v1/history"))[1]
        assert tables["tables"] == {"subscriptions": {"keys": 2}}
        for kid in ("1", "2"):
            status, body = await get(client, f"/v1/history/subscriptions/{kid}")
            assert status == 200 and body["versions"] == expected[kid], kid
        assert [v["row"]["status"] for v in expected["1"]] == ["active", "cancelled", "cancelled"]
        assert [v["is_deleted"] for v in expected["1"]] == [False, False, True]

        # As of a time inside each version: the version the pure lookup finds.
        for kid, when, status_then in (("1", T0 + 5 * DAY_MS, "active"),
                                       ("1", T0 + 15 * DAY_MS, "cancelled"),
                                       ("2", T0 + 3 * DAY_MS, "trialing"),
                                       ("2", T0 + 30 * DAY_MS, "active")):
            for as_of in (str(when), _iso(when)):
                status, body = await get(client, f"/v1/history/subscriptions/{kid}?as_of={as_of}")
                assert status == 200, body
                assert body["version"] == version_at(expected[kid], when)
                assert body["version"]["row"]["status"] == status_then and body["as_of_ms"] == when
        # Deleted then, not yet created then, an unknown key or table, a time that does not parse.
        status, body = await get(client, f"/v1/history/subscriptions/1?as_of={_iso(T0 + 25 * DAY_MS)}")
        assert status == 404 and "deleted" in body["error"] and body["version"]["is_deleted"]
        status, body = await get(client, f"/v1/history/subscriptions/2?as_of={_iso(T0)}")
        assert status == 404 and "did not exist yet" in body["error"]
        assert (await get(client, "/v1/history/subscriptions/99"))[0] == 404
        assert "no history table" in (await get(client, "/v1/history/plans/1"))[1]["error"]
        assert (await get(client, "/v1/history/subscriptions/1?as_of=yesterday"))[0] == 400

        # The OpenAPI document covers the mounted history routes.
        paths = (await get(client, "/openapi.json"))[1]["paths"]
        assert {"/v1/history", "/v1/history/{table}/{key}"} <= set(paths)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
