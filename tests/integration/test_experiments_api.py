"""The experiments service on the real broker: the lifecycle with read-your-writes,
collision refusal, a second instance rebuilding the registry from the topic, two
instances racing to start colliding experiments, results from a produced
`bandit.posteriors` snapshot, the OpenAPI document, bad input and Kafka away."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from services.experiments.api.app import make_app
from services.experiments.results import read_snapshot, results
from streams import topics
from tests.integration.helpers import eventually, read_topic

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


def body(exp_id: str, surface: str = "home.recommendations", **more) -> dict:
    return {"id": exp_id, "name": f"Experiment {exp_id}", "owner": "ann",
            "hypothesis": "personalized items get more clicks than popular ones",
            "surface": surface,
            "arms": [{"name": "popular", "weight": 0.5}, {"name": "personalized", "weight": 0.5}],
            "planned_end": int(time.time() * 1000) + 14 * DAY_MS, **more}


async def ready(client: TestClient, timeout_s: float = 30) -> None:
    async def probe():
        return (await client.get("/health")).status
    await eventually(probe, lambda s: s == 200, timeout_s, "experiments service ready")


async def post(client: TestClient, path: str, payload=None) -> tuple[int, dict]:
    resp = await client.post(path, data=b"" if payload is None else orjson.dumps(payload))
    return resp.status, await resp.json()


async def get(client: TestClient, path: str) -> tuple[int, dict]:
    resp = await client.get(path)
    return resp.status, await resp.json()


async def test_lifecycle_collision_and_rebuild_by_a_second_instance(settings):
    async with TestClient(TestServer(make_app(settings))) as client:
        await ready(client)
        de = {"country": ["DE", "AT"]}
        status, created = await post(client, "/v1/experiments", body("home-a", population=de))
        assert status == 201, created
        assert created | {"start": 0, "planned_end": 0, "updated": 0} == {
            **body("home-a"), "start": 0, "planned_end": 0, "updated": 0, "v": 1, "revision": 1,
            "status": "draft", "ended": None, "population": de, "unit": "user_id", "kind": "ab",
            "epsilon": None, "primary_metric": "click_through", "namespace": None,
            "arms": [{"name": "popular", "weight": 0.5, "description": None},
                     {"name": "personalized", "weight": 0.5, "description": None}]}
        # Read-your-writes: the very next GET sees it (the answer waited for the fold).
        assert await get(client, "/v1/experiments/home-a") == (200, created)
        assert (await get(client, "/v1/experiments"))[1]["count"] == 1

        status, running = await post(client, "/v1/experiments/home-a/start")
        assert status == 200 and running["status"] == "running" and running["revision"] == 2
        assert (await get(client, "/v1/experiments?status=running"))[1]["experiments"] == [running]
        assert (await get(client, "/v1/experiments?status=draft"))[1]["count"] == 0

        # Another experiment on the same surface for an overlapping population (everyone
        # includes DE): refused, with the reason.
        status, refused = await post(client, "/v1/experiments", body("home-b"))
        assert status == 409 and "experiment collision" in refused["error"] and "home-a" in refused["error"]
        # A disjoint population is fine, and so is another surface; both can start.
        assert (await post(client, "/v1/experiments",
                           body("home-us", population={"country": ["US"]})))[0] == 201
        assert (await post(client, "/v1/experiments", body("search-a", surface="search.results")))[0] == 201
        assert (await post(client, "/v1/experiments/search-a/start"))[0] == 200
        status, started = await post(client, "/v1/experiments/home-us/start")
        assert status == 200, started
        status, refused = await post(client, "/v1/experiments/home-a/start")
        assert status == 409 and "only a draft can start" in refused["error"]

        status, stopped = await post(client, "/v1/experiments/home-a/stop")
        assert status == 200 and stopped["status"] == "stopped" and stopped["ended"] is not None
        assert (await post(client, "/v1/experiments/home-a/stop"))[0] == 409
        assert (await get(client, "/v1/experiments?surface=home.recommendations&status=stopped"))[1]["experiments"] == [stopped]
        listing = (await get(client, "/v1/experiments"))[1]

    # Every write is a record on the topic, keyed by id, in order.
    values = await read_topic(settings.kafka_bootstrap, settings.topic(topics.EXPERIMENTS),
                              lambda v: len(v) >= 7, timeout_s=20)
    assert [(v["id"], v["status"]) for v in values] == [
        ("home-a", "draft"), ("home-a", "running"), ("home-us", "draft"), ("search-a", "draft"),
        ("search-a", "running"), ("home-us", "running"), ("home-a", "stopped")]

    # A second instance (a fresh process's view) rebuilds the same registry from the topic.
    async with TestClient(TestServer(make_app(settings))) as second:
        await ready(second)
        assert (await get(second, "/v1/experiments"))[1] == listing
        status, refused = await post(second, "/v1/experiments", body("home-c"))
        assert status == 409 and "home-us" in refused["error"]


async def test_two_instances_racing_to_start_colliding_experiments_one_wins(settings):
    async with TestClient(TestServer(make_app(settings))) as one, \
            TestClient(TestServer(make_app(settings))) as two:
        await ready(one)
        await ready(two)
        assert (await post(one, "/v1/experiments", body("race-1")))[0] == 201
        assert (await post(one, "/v1/experiments", body("race-2")))[0] == 201

        async def seen_by_two():
            return (await get(two, "/v1/experiments"))[1]["count"]
        await eventually(seen_by_two, lambda n: n == 2, 20, "second instance caught up")
        (s1, b1), (s2, b2) = await asyncio.gather(post(one, "/v1/experiments/race-1/start"),
                                                  post(two, "/v1/experiments/race-2/start"))
        assert sorted([s1, s2]) == [200, 409], (b1, b2)
        loser = b1 if s1 == 409 else b2
        assert "experiment collision" in loser["error"]
        winner = "race-1" if s1 == 200 else "race-2"

        async def running(client):
            return [e["id"] for e in (await get(client, "/v1/experiments?status=running"))[1]["experiments"]]
        # Both instances agree on the one that runs: the topic's order decided.
        for client in (one, two):
            assert await eventually(lambda c=client: running(c), lambda r: r == [winner], 20) == [winner]


async def test_results_from_a_posterior_snapshot(settings):
    async with TestClient(TestServer(make_app(settings))) as client:
        await ready(client)
        arms = [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}, {"name": "c", "weight": 2}]
        assert (await post(client, "/v1/experiments", body("res-1", arms=arms, kind="thompson")))[0] == 201
        assert (await post(client, "/v1/experiments/res-1/start"))[0] == 200
        status, empty = await get(client, "/v1/experiments/res-1/results?seed=5&draws=2000")
        assert status == 200 and empty["snapshot"]["present"] is False
        assert [a["exposures"] for a in empty["arms"]] == [0, 0, 0]

        counts = {"a": (900, 45), "b": (1100, 70), "c": (2400, 190)}
        days = [("2026-11-24", {"a": (400, 20), "b": (500, 30), "c": (1000, 75)}),
                ("2026-11-25", {"a": (500, 25), "b": (600, 40), "c": (1400, 115)})]
        # A record as the bandits processor writes it (schemas/posteriors.py).
        snap = {"v": 1, "experiment": "res-1", "version": 9, "arms": list(counts),
                "alpha": [1.0 + c for _, c in counts.values()],
                "beta": [1.0 + e - c for e, c in counts.values()],
                "exposures": [e for e, _ in counts.values()], "clicks": [c for _, c in counts.values()],
                "prob_best": [0.0, 0.01, 0.99], "champion": "c", "value_remaining": 0.02, "stop": False,
                "draws": 10_000, "seed": 123, "as_of": 1_795_000_000_000,
                "daily": {d: {n: {"exposures": e, "clicks": c} for n, (e, c) in per.items()}
                          for d, per in days}}
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(settings.topic(topics.BANDIT_POSTERIORS), orjson.dumps(snap),
                                         key=b"res-1")
        finally:
            await producer.stop()

        async def fetch():
            return (await get(client, "/v1/experiments/res-1/results?seed=5&draws=2000"))[1]
        got = await eventually(fetch, lambda r: r["snapshot"]["present"], 20, "snapshot consumed")
        status, exp = await get(client, "/v1/experiments/res-1")
        expected = results(exp, read_snapshot(snap, ["a", "b", "c"]), seed=5, draws=2000)
        assert orjson.loads(orjson.dumps(got)) == orjson.loads(orjson.dumps({**expected, "experiment_record": exp}))
        assert [(c["control"], c["treatment"]) for c in got["comparisons"]] == [("a", "b"), ("a", "c")]
        assert got["snapshot"]["version"] == 9 and got["bandit"]["source"] == "snapshot"
        assert [[a["exposures"] for a in d["arms"]] for d in got["history"]] == [[400, 500, 1000], [900, 1100, 2400]]
        assert got["srm"]["checked"] is False  # a bandit's split is not a plan

        status, err = await get(client, "/v1/experiments/res-1/results?alpha=2")
        assert status == 400 and "alpha" in err["error"]
        status, err = await get(client, "/v1/experiments/nope/results")
        assert status == 404 and "nope" in err["error"]


async def test_openapi_document_lists_every_route(settings):
    app = make_app(settings)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/openapi.json")
        assert resp.status == 200
        doc = orjson.loads(await resp.read())
    assert doc["openapi"].startswith("3.1")
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and not r.resource.canonical.startswith("/static")}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (method, path)
            if "{id}" in path:
                assert any(p["name"] == "id" and p["in"] == "path" for p in op["parameters"])
    refs = {v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/components/schemas/")}
    assert refs and all(r.rsplit("/", 1)[1] in doc["components"]["schemas"] for r in refs)
    assert set(doc["components"]["schemas"]["Experiment"]["required"]) >= {"id", "arms", "status"}


def _walk(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)
    else:
        yield node


BAD = [
    (b"{not json", "not JSON"),
    (orjson.dumps([1, 2]), "JSON object"),
    (orjson.dumps({"id": "x"}), "must contain"),
    (orjson.dumps(body("b1", status="running")), "set by the service"),
    (orjson.dumps(body("b2", arms=[{"name": "a", "weight": 1}])), "arms"),
    (orjson.dumps(body("b3", arms=[{"name": "a", "weight": 1}, {"name": "a", "weight": 1}])), "unique"),
    (orjson.dumps(body("b4", planned_end=5)), "planned_end"),
    (orjson.dumps(body("bad:id")), "id"),
    (orjson.dumps(body("b5", kind="ucb")), "kind"),
    (orjson.dumps(body("b6", epsilon=0.1)), "epsilon applies to epsilon_greedy"),
    (orjson.dumps(body("b7", color="red")), "color"),
]


async def test_bad_input_is_400_with_the_reason(settings):
    async with TestClient(TestServer(make_app(settings))) as client:
        await ready(client)
        for payload, reason in BAD:
            resp = await client.post("/v1/experiments", data=payload)
            answer = await resp.json()
            assert resp.status == 400 and reason.lower() in answer["error"].lower(), (payload, answer)
        assert (await get(client, "/v1/experiments?status=paused"))[0] == 400
        assert (await get(client, "/v1/experiments/none"))[0] == 404
        assert (await post(client, "/v1/experiments/none/start"))[0] == 404
        assert (await post(client, "/v1/experiments", body("dup")))[0] == 201
        status, err = await post(client, "/v1/experiments", body("dup"))
        assert status == 409 and "already exists" in err["error"]
        assert (await get(client, "/v1/experiments"))[1]["count"] == 1  # nothing bad was written


async def test_kafka_unreachable_is_503_with_retry_after(settings):
    away = dataclasses.replace(settings, kafka_bootstrap="127.0.0.1:1", produce_timeout_s=2)
    async with TestClient(TestServer(make_app(away))) as client:
        async def kafka():
            resp = await client.get("/health")
            return resp.status, (await resp.json())["kafka"]
        status, reason = await eventually(kafka, lambda h: "unreachable" in h[1], 20, "connect failed")
        assert status == 503
        resp = await client.post("/v1/experiments", data=orjson.dumps(body("x")))
        assert resp.status == 503 and resp.headers["Retry-After"]
        assert "Kafka at 127.0.0.1:1 unreachable" in (await resp.json())["error"]
        assert (await client.get("/health")).status == 503
        assert (await client.get("/v1/experiments")).status == 503


async def test_results_follow_the_bandits_worker(settings, workers):
    """The whole chain: rewards on `rewards` -> the real `clickloop worker bandits` ->
    `bandit.posteriors` -> this service's results (read_committed: the worker's
    snapshots are transactional)."""
    async with TestClient(TestServer(make_app(settings))) as client:
        await ready(client)
        assert (await post(client, "/v1/experiments", body("chain")))[0] == 201
        assert (await post(client, "/v1/experiments/chain/start"))[0] == 200
        day = 1_795_000_000_000
        plan = {"popular": (260, 13), "personalized": (140, 14)}   # 50:50 planned, 65:35 served
        rewards = []
        for arm, (n, clicks) in plan.items():
            for i in range(n):
                ts = day + (i % 2) * DAY_MS + i
                rewards.append({"v": 1, "request_id": f"{arm}-{i}", "experiment": "chain", "arm": arm,
                                "visitor": f"u{i}", "reward": int(i < clicks), "exposure_ts": ts,
                                "reward_ts": ts + 1000, "item": None, "position": None})
        await topics.ensure_topics(settings)
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for r in rewards:
                await producer.send(settings.topic(topics.REWARDS), orjson.dumps(r), key=b"chain")
            await producer.flush()
        finally:
            await producer.stop()
        workers.start("bandits")

        async def fetch():
            return (await get(client, "/v1/experiments/chain/results?seed=1&draws=2000"))[1]
        try:
            got = await eventually(fetch, lambda r: sum(a["exposures"] for a in r["arms"]) == 400, 90,
                                   "the bandits worker's snapshot")
        except TimeoutError:
            raise AssertionError(workers.logs()) from None
    assert [(a["name"], a["exposures"], a["clicks"]) for a in got["arms"]] == [
        ("popular", 260, 13), ("personalized", 140, 14)]
    assert [a["posterior"]["alpha"] for a in got["arms"]] == [14.0, 15.0]
    assert got["bandit"]["source"] == "snapshot" and got["snapshot"]["version"] >= 1
    assert got["srm"]["warning"] is True  # 260:140 against 50:50
    assert len(got["history"]) == 2
    assert [[a["exposures"] for a in d["arms"]] for d in got["history"]][-1] == [260, 140]
