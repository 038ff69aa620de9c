"""Experiments in the recommender against the real Kafka and Redis.

Experiments are records on the compacted `experiments` topic (what the
experiments API writes), posteriors are snapshots on `bandit.posteriors` (what
the bandits worker writes); the recommender follows both in the background and
allocates from memory. Models and features as in test_recommender.py."""
from __future__ import annotations

import time
from collections import Counter

import fastjsonschema
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from schemas import json_schema
from services.experiments.allocation import assign
from services.experiments.bandit import ThompsonSampler
from services.recommender.app import make_app
from services.recommender.experiments import posterior_arrays
from services.recommender.synthetic import user_id
from streams import topics
from tests.integration.helpers import eventually
from tests.integration.test_recommender import get, records_of, seed, tuned

pytestmark = pytest.mark.integration
ARMS = ["popular", "personalized"]


def experiment(id: str, kind: str, **over) -> dict:
    now = int(time.time() * 1000)
    record = {
        "v": 1, "revision": 1, "id": id, "name": "Popular vs personalized", "owner": "it",
        "hypothesis": "The model beats popular items", "surface": "home.recommendations",
        "population": {}, "unit": "user_id",
        "arms": [{"name": a, "weight": 0.5, "description": None} for a in ARMS],
        "kind": kind, "epsilon": None, "primary_metric": "click_through", "start": now,
        "planned_end": now + 86_400_000, "ended": None, "status": "running", "namespace": None,
        "updated": now,
    }
    record.update(over)
    return record


async def produce(settings, topic: str, key: str, value: dict) -> None:
    await topics.ensure_topics(settings, (topics.EXPERIMENTS, topics.BANDIT_POSTERIORS))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic(topic), orjson.dumps(value), key=key.encode())
    finally:
        await producer.stop()


async def held(client) -> dict:
    return await (await client.get("/v1/experiments")).json()


async def test_ab_experiment_arms_behaviour_and_exposures(settings):
    s = tuned(settings)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis, n_items=100)
    await produce(s, topics.EXPERIMENTS, "home-ab", experiment("home-ab", "ab"))
    users = [user_id(1)] + [f"ab-user-{i}" for i in range(40)]
    async with TestClient(TestServer(make_app(s))) as client:
        state = await held(client)
        assert [e["id"] for e in state["running"]] == ["home-ab"], "caught up at start-up"
        responses = []
        for u in users:
            status, body = await get(client, user_id=u, k=5)
            assert status == 200
            responses.append(body)
            assert body["experiment"] == "home-ab"
            assert body["arm"] == ARMS[assign("home-ab", u, [0.5, 0.5])]
            if body["arm"] == "popular":
                assert (body["path"], body["source"], body["reason"]) == ("fallback", "popular", None)
            else:
                assert body["path"] in ("model", "cold_start") and body["reason"] is None
        assert set(Counter(b["arm"] for b in responses)) == set(ARMS)
        _, outside = await get(client, anonymous_id="anon-1", k=5)
        assert outside["experiment"] is None and outside["arm"] is None, "unit user_id"
        _, again = await get(client, user_id=users[5], k=5)
        assert again["arm"] == responses[5]["arm"]
        health = await (await client.get("/health")).json()
        assert health["experiments"]["running"] == ["home-ab"]
        text = await (await client.get("/metrics")).text()
        for arm, n in Counter(b["arm"] for b in responses + [again]).items():
            assert (f'clickloop_recommender_experiment_responses_total{{arm="{arm}",'
                    f'experiment="home-ab"}} {float(n)}') in text
    everything = responses + [outside, again]
    got = await records_of(s, topics.EXPOSURES, lambda rs: len(rs) >= len(everything))
    validate = fastjsonschema.compile(json_schema("exposures"))
    by_id = {v["request_id"]: v for _, v in got}
    for body in everything:
        record = by_id[body["request_id"]]
        validate(record)
        assert (record["experiment"], record["arm"]) == (body["experiment"], body["arm"])
        assert (record["path"], record["source"]) == (body["path"], body["source"])
        assert (record["posterior_version"], record["seed"], record["draw"]) == (None, None, None)
    await redis.aclose()


async def test_posterior_snapshot_moves_a_thompson_allocation(settings):
    s = tuned(settings, bandit_sticky_s=0)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis, n_items=100)
    async with TestClient(TestServer(make_app(s))) as client:
        assert (await held(client))["running"] == []
        await produce(s, topics.EXPERIMENTS, "home-ts", experiment("home-ts", "thompson"))
        await eventually(lambda: held(client), lambda h: [e["id"] for e in h["running"]] == ["home-ts"],
                         what="experiment followed while serving")
        prior = [(await get(client, user_id=f"p-{i}", k=3))[1] for i in range(120)]
        share = Counter(b["arm"] for b in prior)["personalized"] / len(prior)
        assert 0.3 < share < 0.7, "Beta(1, 1) for both arms: about even"
        snap = {"v": 1, "experiment": "home-ts", "version": 1, "arms": ["personalized"],
                "alpha": [900.0], "beta": [100.0], "exposures": [998], "clicks": [899]}
        await produce(s, topics.BANDIT_POSTERIORS, "home-ts", snap)
        await eventually(lambda: held(client),
                         lambda h: h["running"] and h["running"][0]["posterior_version"] == 1,
                         what="snapshot version 1 held")
        after = [(await get(client, user_id=f"q-{i}", k=3))[1] for i in range(120)]
        text = await (await client.get("/metrics")).text()
        assert 'clickloop_recommender_experiment_posterior_version{experiment="home-ts"} 1.0' in text
        # Beta(900, 100) (~0.9) against the absent popular arm's Beta(1, 1): P(popular) = 0.1
        share = Counter(b["arm"] for b in after)["personalized"] / len(after)
        assert share > 0.8, share
    everything = prior + after
    got = await records_of(s, topics.EXPOSURES, lambda rs: len(rs) >= len(everything))
    by_id = {v["request_id"]: v for _, v in got}
    snaps = {0: None, 1: snap}
    for body in everything[::7]:
        record = by_id[body["request_id"]]
        assert record["experiment"] == "home-ts" and record["arm"] == body["arm"]
        alpha, beta = posterior_arrays(ARMS, snaps[record["posterior_version"]])
        assert ARMS[ThompsonSampler.replay(alpha, beta, record["seed"], record["draw"])] == record["arm"]
    assert {by_id[b["request_id"]]["posterior_version"] for b in prior} == {0}
    assert {by_id[b["request_id"]]["posterior_version"] for b in after} == {1}
    await redis.aclose()


async def test_the_loop_closes_clicks_move_the_allocation(settings, workers):
    """exposures (recommender) + clicks -> attribution -> rewards -> bandits ->
    bandit.posteriors -> the recommender's allocation, all real processes but the app."""
    from tests.integration.test_attribution_bandits import click_event

    s = tuned(settings, bandit_sticky_s=0)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis, n_items=100)
    await topics.ensure_topics(s, (topics.CLICKS, topics.EXPOSURES, topics.REWARDS))
    await produce(s, topics.EXPERIMENTS, "home-loop", experiment("home-loop", "thompson"))
    workers.start("attribution")
    workers.start("bandits")
    async with TestClient(TestServer(make_app(s))) as client:
        first = [(await get(client, user_id=f"loop-{i}", k=3))[1] for i in range(60)]
        clicked = [b for b in first if b["arm"] == "personalized" and b["items"]]
        assert len(clicked) >= 15, Counter(b["arm"] for b in first)
        ts = int(time.time() * 1000)
        events = [click_event(b["visitor"], ts + n, b["items"][0]["item_id"], "Product Clicked", n)
                  for n, b in enumerate(clicked)]
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(s.topic(topics.CLICKS),
                                         orjson.dumps({"v": 1, "events": events}), partition=0)
        finally:
            await producer.stop()

        def reflected(h) -> bool:
            post = h["posteriors"].get("home-loop")
            return bool(post and h["running"]) and post["clicks"] == [len(clicked)] \
                and h["running"][0]["posterior_version"] == post["version"]

        state = await eventually(lambda: held(client), reflected, timeout_s=60,
                                 what=f"{len(clicked)} clicks in the allocation\n{workers.logs()}")
        post = state["posteriors"]["home-loop"]
        assert post["arms"] == ["personalized"], "no popular reward yet: its windows are open"
        assert state["running"][0]["alpha"] == [1.0, 1.0 + len(clicked)]
        after = [(await get(client, user_id=f"after-{i}", k=3))[1] for i in range(100)]
        # Beta(1 + n, 1) against Beta(1, 1): personalized wins with P = (n + 1) / (n + 2)
        assert Counter(b["arm"] for b in after)["personalized"] >= 80
    await redis.aclose()
