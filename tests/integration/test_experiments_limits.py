"""Limits and error shapes of the experiments service on the real broker (audit):
huge weights and too many arms refused, Monte Carlo cost capped and computed off the
event loop with a timeout, a malformed snapshot is the server's 500 (JSON), aiohttp's
own errors in the JSON shape; and in the recommender, records that cannot be applied
lose only themselves while the other experiments keep being allocated."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from services.experiments.api import app as api
from services.experiments.registry import MAX_ARMS
from services.recommender.app import make_app as recommender_app
from streams import topics
from tests.integration.helpers import eventually
from tests.integration.test_experiments_api import body, get, post, ready
from tests.integration.test_recommender import seed, tuned
from tests.integration.test_recommender_experiments import experiment, held, produce

pytestmark = pytest.mark.integration


def arms(n: int, weight=1) -> list[dict]:
    return [{"name": f"a{i}", "weight": weight} for i in range(n)]


async def test_huge_weights_and_too_many_arms_are_400_and_draws_are_capped(settings):
    async with TestClient(TestServer(api.make_app(settings))) as client:
        await ready(client)
        for bad in ([{"name": "a", "weight": 1e308}, {"name": "b", "weight": 1}],
                    [{"name": "a", "weight": 1e308}, {"name": "b", "weight": 1e308}],
                    arms(MAX_ARMS + 1)):
            status, err = await post(client, "/v1/experiments", body("bad", arms=bad))
            assert status == 400 and "arms" in err["error"], err
        assert (await post(client, "/v1/experiments", body("wide", arms=arms(MAX_ARMS))))[0] == 201
        status, err = await get(client, "/v1/experiments/wide/results?draws=200000")
        assert status == 400 and "at most 50000 draws" in err["error"], err
        assert (await get(client, "/v1/experiments/wide/results?draws=50000&seed=1"))[0] == 200
        assert (await get(client, "/v1/experiments"))[1]["count"] == 1


async def test_results_run_off_the_event_loop_and_time_out_as_503(settings, monkeypatch):
    real = api.results

    def slow(*args, **kwargs):   # stands for an expensive computation
        time.sleep(1.5)
        return real(*args, **kwargs)
    monkeypatch.setattr(api, "results", slow)
    monkeypatch.setattr(api, "RESULTS_TIMEOUT_S", 0.5)
    async with TestClient(TestServer(api.make_app(settings))) as client:
        await ready(client)
        assert (await post(client, "/v1/experiments", body("slow")))[0] == 201
        pending = asyncio.create_task(client.get("/v1/experiments/slow/results?draws=100"))
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        assert (await client.get("/health")).status == 200
        assert time.perf_counter() - t0 < 0.3, "/health waited for the results"
        resp = await pending
        err = await resp.json()
        assert resp.status == 503 and resp.headers["Retry-After"] and "took longer" in err["error"]
        monkeypatch.setattr(api, "RESULTS_TIMEOUT_S", 10.0)
        assert (await get(client, "/v1/experiments/slow/results?draws=100"))[0] == 200


SNAPSHOTS = {   # server data: never the client's 400
    "s-str": {"exposures": ["abc", 1], "clicks": [0, 0]},
    "s-neg": {"alpha": [-1, 1], "beta": [1, 1]},
    "s-daily": {"daily": [5]},
    "s-list": {"alpha": [[1], 1], "beta": [1, 1]},
}


async def test_a_malformed_snapshot_is_a_json_500(settings):
    async with TestClient(TestServer(api.make_app(settings))) as client:
        await ready(client)
        for exp_id, snap in SNAPSHOTS.items():
            assert (await post(client, "/v1/experiments", body(exp_id)))[0] == 201
            await produce(settings, topics.BANDIT_POSTERIORS, exp_id,
                          {"experiment": exp_id, "version": 1, "arms": ["popular", "personalized"], **snap})

        async def answers():
            out = {}
            for exp_id in SNAPSHOTS:
                resp = await client.get(f"/v1/experiments/{exp_id}/results")
                out[exp_id] = (resp.status, resp.content_type, await resp.text())
            return out
        got = await eventually(answers, lambda a: all(s != 200 for s, _, _ in a.values()), 20,
                               "snapshots consumed")
        for exp_id, (status, ctype, text) in got.items():
            assert (status, ctype) == (500, "application/json"), (exp_id, text)
            assert "unreadable" in orjson.loads(text)["error"], text


async def test_aiohttp_errors_answer_the_json_error_shape(settings):
    app = api.make_app(settings)
    async with TestClient(TestServer(app)) as client:
        await ready(client)
        resp = await client.post("/v1/experiments", data=b'{"id":"' + b"x" * 300_000 + b'"}',
                                 headers={"Content-Type": "application/json"})
        assert (resp.status, resp.content_type) == (413, "application/json")
        assert "262144" in (await resp.json())["error"]
        resp = await client.delete("/v1/experiments")
        assert (resp.status, resp.content_type) == (405, "application/json")
        assert "GET" in resp.headers["Allow"] and (await resp.json())["error"]
        for path in ("/v1/nothing", "/static/../app.py"):
            resp = await client.get(path)
            assert (resp.status, resp.content_type) == (404, "application/json"), path
        doc = await (await client.get("/openapi.json")).json()
    assert "413" in doc["paths"]["/v1/experiments"]["post"]["responses"]
    assert "500" in doc["paths"]["/v1/experiments/{id}/results"]["get"]["responses"]


async def test_recommender_keeps_allocating_past_records_it_cannot_apply(settings):
    """The audit's case: a running experiment with a weight of 1e308 (written before the
    registry refused it) and a ragged snapshot stopped the whole experiments feed; now
    they lose only themselves and the healthy experiment is served."""
    s = tuned(settings)
    redis = aioredis.from_url(s.redis_url)
    try:
        await seed(s, redis, n_items=100)
    finally:
        await redis.aclose()
    await produce(s, topics.EXPERIMENTS, "good",
                  experiment("good", "ab", namespace={"name": "ns", "range": [0, 5000]}))
    huge = experiment("huge", "ab", namespace={"name": "ns", "range": [5000, 10000]})
    huge["arms"][0]["weight"] = 1e308
    await produce(s, topics.EXPERIMENTS, "huge", huge)
    await produce(s, topics.BANDIT_POSTERIORS, "good",
                  {"experiment": "good", "version": 1, "arms": ["popular", "personalized"],
                   "alpha": [[1], 1], "beta": [1, 1]})
    async with TestClient(TestServer(recommender_app(s))) as client:
        state = await held(client)
        assert state["caught_up"] and [e["id"] for e in state["running"]] == ["good"], state
        assert state["refused"] == 1 and state["bad_records"] == 1
        served = set()
        for i in range(40):
            served.add((await (await client.get("/v1/recommendations",
                                                 params={"user_id": f"u{i}"})).json())["experiment"])
        assert "good" in served
        await asyncio.sleep(1.5)   # the feed kept its consumer: no reconnect loop
        again = await held(client)
        assert again["error"] is None and again["updates"] == state["updates"], again
