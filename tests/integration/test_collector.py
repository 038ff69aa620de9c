"""Collector and recommender HTTP errors: a clear 4xx with the reason."""
from __future__ import annotations

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.collector.app import make_app as collector_app
from services.recommender.app import make_app as recommender_app

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("data,status,message", [
    (b"{not json", 400, "not valid JSON"),
    (orjson.dumps({"batch": [{"type": "track", "userId": "u"}]}), 400, "must contain ['event']"),
    (orjson.dumps({"batch": [{"type": "page", "userId": "u", "properties": {"x": "y" * 600_000}}]}),
     413, "larger than"),
])
async def test_collector_refuses_bad_bodies_with_the_reason(settings, data, status, message):
    async with TestClient(TestServer(collector_app(settings))) as client:
        resp = await client.post("/v1/batch", data=data)
        body = await resp.json()
    assert resp.status == status
    assert body["success"] is False and message in body["error"]


@pytest.mark.parametrize("query,message", [
    ({}, "user_id or anonymous_id"),
    ({"user_id": "u", "k": "x"}, "not a whole number"),
    ({"user_id": "u", "k": "0"}, "between 1 and 100"),
])
async def test_recommender_refuses_bad_queries(settings, query, message):
    async with TestClient(TestServer(recommender_app(settings))) as client:
        resp = await client.get("/v1/recommendations", params=query)
        assert resp.status == 400 and message in (await resp.json())["error"]
