"""The recommender against the real Kafka and Redis: model path, fallback, breaker, hot swap,
exposures, shadow, staleness, precomputed top-k, bad parameters.

Models are real artifacts (services/model/artifact.py) announced on `models` as
the trainer announces them; features are written with the features worker's
Lua script. Tests that stop or pause Redis run a private redis-server."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import fastjsonschema
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer

from schemas import json_schema
from services.recommender.app import make_app
from services.recommender.request import in_shadow
from services.recommender.synthetic import (PrivateRedis, announce, item_id, random_model,
                                            user_id, write_popular, write_user)
from streams import topics
from tests.integration.helpers import eventually

pytestmark = pytest.mark.integration
DAY = 86_400_000


def now_ms() -> int:
    return int(time.time() * 1000)


async def records_of(settings, topic: str, until, timeout_s: float = 30) -> list[tuple[bytes, dict]]:
    """(key, JSON value) of a topic from the start until `until(records)` holds."""
    consumer = AIOKafkaConsumer(settings.topic(topic), bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[tuple[bytes, dict]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(out):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: condition not met in {timeout_s} s; got {len(out)}")
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                out += [(r.key, orjson.loads(r.value)) for r in batch]
    finally:
        await consumer.stop()
    return out


def tuned(settings, **kw):
    """Test settings: models under the test's tmp dir, a fast breaker, no feature cache."""
    base = dict(model_dir=str(settings.state_dir / "models"), breaker_window_ms=1000,
                breaker_min_requests=5, breaker_sleep_ms=500, feature_cache_ms=0,
                popular_refresh_ms=200)
    base.update(kw)
    return dataclasses.replace(settings, **base)


async def seed(settings, redis, versions=("v1",), name="als", n_items=300):
    """Model versions announced, one known and one unknown user with recent items, popularity."""
    arts = []
    for i, version in enumerate(versions):
        art = random_model(settings.model_root, name, version, n_items=n_items, factors=8,
                           n_users=20, seed=i)
        await announce(settings, art)
        arts.append(art)
    ts = now_ms()
    await write_user(redis, settings, user_id(1), [(item_id(3), "click", ts), (item_id(7), "view", ts)], ts)
    await write_user(redis, settings, "anon-1", [(item_id(5), "view", ts), (item_id(9), "click", ts)], ts)
    await write_popular(redis, settings, 0, [(item_id(j), 100.0 - j) for j in range(50)], ts)
    return arts


async def get(client, **params):
    resp = await client.get("/v1/recommendations", params={k: str(v) for k, v in params.items()})
    return resp.status, await resp.json()


async def test_model_cold_start_exposures(settings):
    s = tuned(settings)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis, n_items=100)
    async with TestClient(TestServer(make_app(s))) as client:
        status, known = await get(client, user_id=user_id(1), k=5)
        assert status == 200 and known["path"] == "model" and known["source"] == "online"
        assert known["model_version"] == "v1" and len(known["items"]) == 5
        assert not {item_id(3), item_id(7)} & {i["item_id"] for i in known["items"]}, "seen excluded"
        scores = [i["score"] for i in known["items"]]
        assert scores == sorted(scores, reverse=True)
        _, folded = await get(client, anonymous_id="anon-1", k=5)
        assert folded["path"] == "model" and folded["source"] == "online", "folded in from recent"
        assert not {item_id(5), item_id(9)} & {i["item_id"] for i in folded["items"]}
        _, unseen = await get(client, anonymous_id="anon-1", k=100, exclude_seen="false")
        assert {item_id(5), item_id(9)} <= {i["item_id"] for i in unseen["items"]}, \
            "with 100 of 100 items, seen ones are kept when asked"
        _, cold = await get(client, anonymous_id="nobody-at-all", k=4)
        assert cold["path"] == "cold_start" and cold["features"] == {"activity": "missing",
                                                                    "recent": "missing"}
        health = await (await client.get("/health")).json()
        assert health["models"]["served"]["version"] == "v1"
        assert health["breakers"]["redis"]["state"] == "closed"
        metrics = await (await client.get("/metrics")).text()
        assert 'clickloop_recommender_responses_total{path="model"} 3.0' in metrics
        assert 'clickloop_recommender_breaker_state{dependency="redis"} 0.0' in metrics
    responses = [known, folded, unseen, cold]
    got = await records_of(s, topics.EXPOSURES, lambda rs: len(rs) >= len(responses))
    validate = fastjsonschema.compile(json_schema("exposures"))
    by_id = {v["request_id"]: (k, v) for k, v in got}
    for resp in responses:
        key, record = by_id[resp["request_id"]]
        validate(record)
        assert key == resp["visitor"].encode()
        assert record["path"] == resp["path"] and record["model_version"] == resp["model_version"]
        assert [i["item_id"] for i in record["items"]] == [i["item_id"] for i in resp["items"]]
        assert [i["position"] for i in record["items"]] == list(range(len(resp["items"])))
        assert record["experiment"] is None and record["arm"] is None
    assert by_id[known["request_id"]][1]["user_id"] == user_id(1)
    assert by_id[folded["request_id"]][1]["anonymous_id"] == "anon-1"
    await redis.aclose()


@pytest.mark.parametrize("params,reason", [
    ({}, "give user_id or anonymous_id"),
    ({"user_id": "u", "k": "0"}, "k=0 must be between 1 and 100"),
    ({"user_id": "u", "k": "101"}, "k=101 must be between 1 and 100"),
    ({"user_id": "u", "k": "ten"}, "is not a whole number"),
    ({"user_id": "u", "exclude_seen": "maybe"}, "use true or false"),
    ({"user_id": "u" * 201}, "at most 200"),
])
async def test_bad_parameters_are_400_with_the_reason(settings, params, reason):
    async with TestClient(TestServer(make_app(tuned(settings), model_wait_s=2))) as client:
        resp = await client.get("/v1/recommendations", params=params)
        assert resp.status == 400
        assert reason in (await resp.json())["error"]


async def test_stale_features_are_not_served_as_fresh(settings):
    s = tuned(settings)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis, n_items=100)
    old = now_ms() - 31 * DAY   # `recent` has a 30-day max age, `activity` one day
    await write_user(redis, s, "stale-visitor", [(item_id(5), "click", old)], old)
    async with TestClient(TestServer(make_app(s))) as client:
        _, body = await get(client, anonymous_id="stale-visitor", k=100)
    assert body["features"] == {"activity": "stale", "recent": "stale"}
    assert body["path"] == "cold_start", "no fold-in from stale recent items"
    assert item_id(5) in {i["item_id"] for i in body["items"]}, "stale items are not 'seen' either"
    await redis.aclose()


async def test_precomputed_topk_served_for_the_same_version_only(settings):
    s = tuned(settings)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis)
    topk = [[item_id(j), 1.0 - j / 100] for j in (3, 40, 41, 42, 43)]  # item 3 is seen
    key = s.redis_key("topk", user_id(1))
    async with TestClient(TestServer(make_app(s))) as client:
        await redis.set(key, orjson.dumps({"name": "als", "version": "v1", "items": topk,
                                           "computed_ms": now_ms()}), ex=60)
        _, body = await get(client, user_id=user_id(1), k=4)
        assert body["source"] == "precomputed" and body["path"] == "model"
        assert [i["item_id"] for i in body["items"]] == [item_id(j) for j in (40, 41, 42, 43)]
        _, short = await get(client, user_id=user_id(1), k=5)
        assert short["source"] == "online", "fewer than k unseen precomputed items: ranked online"
        _, everything = await get(client, user_id=user_id(1), k=4, exclude_seen="false")
        assert everything["source"] == "online", "the list left seen items out: not for this request"
        await redis.set(key, orjson.dumps({"name": "als", "version": "v0", "items": topk,
                                           "computed_ms": now_ms()}), ex=60)
        _, other = await get(client, user_id=user_id(1), k=4)
        assert other["source"] == "online", "another version's top-k is not served"
    await redis.aclose()


async def test_no_model_yet_serves_fallback(settings):
    s = tuned(settings)
    redis = aioredis.from_url(s.redis_url)
    await write_popular(redis, s, 0, [(item_id(j), 10.0 - j) for j in range(5)], now_ms())
    async with TestClient(TestServer(make_app(s, model_wait_s=3))) as client:
        await eventually(lambda: client.get("/health"), lambda r: r.status == 200)
        status, body = await get(client, user_id="someone", k=3)
    assert status == 200 and body["path"] == "fallback" and body["reason"] == "no_model"
    assert [i["item_id"] for i in body["items"]] == [item_id(0), item_id(1), item_id(2)]
    await redis.aclose()


async def test_bad_popular_snapshots_are_skipped_and_the_refreshes_go_on(settings):
    """A snapshot 400 days ahead (what one future click made the features worker write
    before the collector bounded event times) once stopped the service from starting; a
    half-life of 0 written later killed the background refresh for good."""
    s = tuned(dataclasses.replace(settings, partitions=2))
    redis = aioredis.from_url(s.redis_url)
    await write_popular(redis, s, 0, [("from-the-future", 99.0)], now_ms() + 400 * DAY)
    await write_popular(redis, s, 1, [(item_id(j), 10.0 - j) for j in range(5)], now_ms())
    async with TestClient(TestServer(make_app(s, model_wait_s=1))) as client:
        status, body = await get(client, anonymous_id="nobody", k=2)
        assert status == 200 and [i["item_id"] for i in body["items"]] == [item_id(0), item_id(1)]
        await write_popular(redis, s, 1, [("broken", 1.0)], now_ms(), half_life_ms=0)
        await asyncio.sleep(0.6)   # three refreshes over the broken snapshot: the last list stays
        _, body = await get(client, anonymous_id="nobody", k=1)
        assert [i["item_id"] for i in body["items"]] == [item_id(0)]
        await write_popular(redis, s, 1, [("repaired", 5.0)], now_ms())
        _, body = await eventually(lambda: get(client, anonymous_id="nobody", k=1),
                                   lambda r: r[1]["items"][0]["item_id"] == "repaired",
                                   timeout_s=5, what="the refresh after the repair")
        health = await (await client.get("/health")).json()
    assert health["popular"]["items"] == 1 and health["popular"]["fresh_partitions"] == 1
    await redis.aclose()


async def test_one_visitors_bad_data_never_opens_a_breaker_for_everyone(settings):
    """A `user:` key of another Redis type (WRONGTYPE) and a `topk:` key that is a hash
    are that visitor's bad data, read as absent; odd recent entries are left out. The
    audit saw 25 requests for one such visitor open the Redis or the model breaker."""
    s = tuned(settings)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis)
    await redis.rpush(s.redis_key("user", "list-user"), "x")
    await redis.hset(s.redis_key("topk", "list-user"), "a", "b")
    ts = now_ms()
    await write_user(redis, s, "odd-user", [(item_id(3), "click", ts)], ts)
    await redis.hset(s.redis_key("user", "odd-user"), "recent:items",
                     orjson.dumps([[item_id(4), ["view"], ts], [item_id(5), "view", ts]]))
    async with TestClient(TestServer(make_app(s))) as client:
        for _ in range(25):
            for visitor in ("list-user", "odd-user"):
                status, body = await get(client, user_id=visitor, k=3)
                assert status == 200 and body["path"] in ("model", "cold_start"), body
        status, body = await get(client, user_id=user_id(1), k=3)
        health = await (await client.get("/health")).json()
    assert status == 200 and body["path"] == "model" and body["reason"] is None
    assert {b["state"] for b in health["breakers"].values()} == {"closed"}
    assert health["wrong_type_keys"] == 50
    await redis.aclose()


async def test_redis_paused_then_stopped_fallback_then_breaker_closes(settings, tmp_path):
    private = PrivateRedis(tmp_path / "redis")
    private.start()
    s = tuned(settings, redis_url=private.url)
    redis = aioredis.from_url(s.redis_url)
    try:
        await seed(s, redis)
        async with TestClient(TestServer(make_app(s))) as client:
            _, body = await get(client, user_id=user_id(1))
            assert body["path"] == "model"
            bodies = []

            async def hammer(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    status, b = await get(client, user_id=user_id(1), k=5)
                    assert status == 200, b
                    bodies.append(b)
                    await asyncio.sleep(0.005)

            async def breaker():
                return (await (await client.get("/health")).json())["breakers"]["redis"]

            async def asking():  # a breaker moves on requests only
                await get(client, user_id=user_id(1))
                return await breaker()

            private.pause()                        # SIGSTOP: every call times out
            await hammer(1.5)
            paused = await breaker()
            private.resume()
            assert paused["state"] in ("open", "half_open") and paused["opened_count"] >= 1
            assert {b["reason"] for b in bodies} <= {"redis_timeout", "redis_open", None}
            assert "redis_timeout" in {b["reason"] for b in bodies}
            assert all(len(b["items"]) == 5 and b["path"] == "fallback"
                       for b in bodies if b["reason"]), "popular items while Redis is away"
            await eventually(asking, lambda b: b["state"] == "closed", 10, "breaker closed")

            bodies.clear()
            private.stop()                         # gone: connections refused
            await hammer(1.5)
            assert "redis_open" in {b["reason"] for b in bodies}
            assert all(b["path"] == "fallback" for b in bodies[10:])
            assert (await breaker())["state"] != "closed"
            private.start()                        # back, empty: features written again
            await seed(s, aioredis.from_url(s.redis_url), versions=())
            await eventually(lambda: get(client, user_id=user_id(1)),
                             lambda r: r[1]["path"] == "model", 15, "model path again")
            assert (await breaker())["state"] == "closed"
    finally:
        private.stop()


async def test_new_model_is_hot_swapped_without_a_failed_request(settings):
    # A roomy budget: this test is about the swap, and the machine's other tests share its CPU.
    s = tuned(settings, budget_ms=500, redis_budget_ms=500)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis)
    # Built before the client starts: writing it blocks this event loop, which the server shares.
    v2 = random_model(s.model_root, "als", "v2", n_items=5000, factors=32, n_users=2000, seed=7)
    async with TestClient(TestServer(make_app(s))) as client:
        seen_versions: list[str] = []
        failures: list = []
        stop = asyncio.Event()

        async def keep_asking() -> None:
            while not stop.is_set():
                status, body = await get(client, user_id=user_id(1), k=5)
                if status != 200 or body["path"] != "model":
                    failures.append((status, body))
                else:
                    seen_versions.append(body["model_version"])

        client_task = asyncio.create_task(keep_asking())
        await asyncio.sleep(0.3)
        await announce(s, v2)
        await eventually(lambda: asyncio.sleep(0, seen_versions[-1:]), lambda v: v == ["v2"], 20,
                         "v2 served")
        await asyncio.sleep(0.2)
        stop.set()
        await client_task
    assert not failures
    first_v2 = seen_versions.index("v2")
    assert set(seen_versions[:first_v2]) == {"v1"} and set(seen_versions[first_v2:]) == {"v2"}
    assert first_v2 > 10, "requests went on while v2 loaded"
    await redis.aclose()


async def test_tampered_model_is_refused_and_the_old_one_kept(settings):
    s = tuned(settings)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis)
    bad = random_model(s.model_root, "als", "v9", n_items=50, factors=8, n_users=5, seed=3)
    manifest = Path(bad.path) / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"synthetic": true', b'"synthetic": false'))
    async with TestClient(TestServer(make_app(s))) as client:
        await announce(s, bad)
        body = await eventually(lambda: _health(client), lambda h: h["model_error"] is not None, 15,
                                "refusal reported")
        assert "v9" in body["model_error"] and body["models"]["served"]["version"] == "v1"
        _, rec = await get(client, user_id=user_id(1))
        assert rec["model_version"] == "v1"
    await redis.aclose()


async def _health(client) -> dict:
    return await (await client.get("/health")).json()


async def test_shadow_rankings_logged_for_the_sampled_fraction(settings):
    s = tuned(settings, shadow_model="als-next", shadow_fraction=0.5)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis)
    shadow = random_model(s.model_root, "als-next", "s1", n_items=300, factors=8, n_users=20, seed=5)
    await announce(s, shadow)
    async with TestClient(TestServer(make_app(s))) as client:
        ids = [f"req-{i}" for i in range(40)]
        served = {}
        for rid in ids:
            resp = await client.get("/v1/recommendations", params={"user_id": user_id(1), "k": "5"},
                                    headers={"X-Request-Id": rid})
            body = await resp.json()
            assert body["request_id"] == rid and body["model_version"] == "v1"
            served[rid] = body
    sampled = {rid for rid in ids if in_shadow(rid, 0.5)}
    assert 5 < len(sampled) < 35
    got = await records_of(s, topics.SHADOW, lambda rs: len(rs) >= len(sampled))
    await asyncio.sleep(0.5)
    validate = fastjsonschema.compile(json_schema("shadow"))
    assert {v["request_id"] for _, v in got} == sampled
    for key, record in got:
        validate(record)
        assert key == user_id(1).encode()
        assert record["served"]["model_version"] == "v1" and record["shadow"]["model_version"] == "s1"
        assert record["served"]["items"] == [i["item_id"] for i in served[record["request_id"]]["items"]]
        assert len(record["shadow"]["items"]) == 5
    await redis.aclose()


def test_blas_runs_one_thread_in_the_service(settings):
    from threadpoolctl import threadpool_info

    make_app(tuned(settings))
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    assert blas and all(i["num_threads"] == 1 for i in blas), blas


async def test_artifact_with_bad_parameters_is_refused_not_retried_forever(settings):
    import dataclasses as dc

    from services.model import artifact as artifacts

    s = tuned(settings)
    redis = aioredis.from_url(s.redis_url)
    await seed(s, redis)
    good = random_model(f"{s.model_root}/src", "als", "v5", n_items=50, factors=8, n_users=5, seed=4)
    # A verified artifact whose parameters AlsParams cannot take (a TypeError, not a
    # ValueError): refused like any bad artifact, not a crash loop of the watcher.
    bad_manifest = dc.replace(good.manifest, params={**good.manifest.params, "factors": "many"},
                              arrays={}, content_sha256="")
    bad = artifacts.write(s.model_root, bad_manifest, good.arrays)
    async with TestClient(TestServer(make_app(s))) as client:
        await announce(s, bad)
        body = await eventually(lambda: _health(client), lambda h: h["model_error"] is not None, 15,
                                "refusal reported")
        assert "v5" in body["model_error"] and body["models"]["served"]["version"] == "v1"
        _, rec = await get(client, user_id=user_id(1))
        assert rec["path"] == "model" and rec["model_version"] == "v1"
    await redis.aclose()


async def test_gc_policy_young_collections_per_requests_and_timed_full_ones(settings):
    """While serving: a young collection after every `recommender_gc_requests` requests, the
    allocation threshold as configured, older generations never automatically, a full
    collection on the timer (pauses in /metrics); the process's own thresholds come back when
    the app stops."""
    import gc

    before = gc.get_threshold()
    redis = aioredis.from_url(settings.redis_url)
    s = tuned(settings, recommender_gc_young=1_000_000, recommender_gc_requests=5,
              recommender_gc_full_s=1)
    await seed(s, redis)
    async with TestClient(TestServer(make_app(s))) as client:
        young, older, oldest = gc.get_threshold()
        assert young == 1_000_000 and older >= 1 << 30 and oldest >= 1 << 30

        async def pauses(generation: int) -> float:
            text = await (await client.get("/metrics")).text()
            prefix = f'clickloop_recommender_gc_pause_seconds_count{{generation="{generation}"}}'
            return float(next(line for line in text.splitlines()
                              if line.startswith(prefix)).rsplit(" ", 1)[1])

        young_before, full_before = await pauses(0), await pauses(2)
        for _ in range(20):
            assert (await get(client, user_id=user_id(1), k=3))[0] == 200
        await asyncio.sleep(0)   # the collection runs on the loop's next turn
        assert await pauses(0) >= young_before + 4, "one young collection per 5 requests"
        await asyncio.sleep(2.5)
        assert await pauses(2) >= full_before + 1
    assert gc.get_threshold() == before
    await redis.aclose()


async def test_requests_ready_in_one_turn_score_in_one_batch_with_their_own_answers(settings):
    """The scorings of requests that reach the model in the same turn of the event loop run
    as one batch (turn_batch.py), each answer the one it gets alone; /health counts them."""
    from services.recommender.app import RECOMMENDER
    from services.recommender.request import parse_query

    redis = aioredis.from_url(settings.redis_url)
    s = tuned(settings, feature_cache_ms=60_000)   # cached profiles: no await before scoring
    await seed(s, redis)
    async with TestClient(TestServer(make_app(s))) as client:
        asks = [{"user_id": user_id(1), "k": "3"}, {"anonymous_id": "anon-1", "k": "5"},
                {"user_id": user_id(1), "k": "4", "exclude_seen": "false"}]
        alone = [await get(client, **ask) for ask in asks]   # also fills the hot-key cache
        assert all(status == 200 and body["path"] == "model" for status, body in alone)
        service = client.server.app[RECOMMENDER]
        before = (await (await client.get("/health")).json())["scoring"]
        assert before == {"batches": 3, "scored": 3}
        # Asked again, the same questions are answered from the rankings memoized on the
        # cached profiles, at once, without scoring:
        again = await asyncio.gather(*(service.recommend(parse_query(ask)) for ask in asks))
        assert (service.scoring.batches, service.scoring.jobs) == (3, 3), "memo hits score nothing"
        assert [a.ranking.items for a in again] == [[i["item_id"] for i in body["items"]]
                                                    for _, body in alone]
        for visitor in (user_id(1), "anon-1"):   # forget them: now every request scores
            service.cache.get(visitor, time.monotonic_ns() // 1_000_000).rankings.clear()
        answers = await asyncio.gather(*(service.recommend(parse_query(ask)) for ask in asks * 2))
        assert (service.scoring.batches, service.scoring.jobs) == (4, 9), "one batch of six"
        for answer, (_, body) in zip(answers, alone * 2):
            assert answer.reason is None and answer.ranking.path == "model"
            assert answer.ranking.items == [i["item_id"] for i in body["items"]]
        health = await (await client.get("/health")).json()
        assert health["scoring"] == {"batches": 4, "scored": 9}
    await redis.aclose()


async def test_model_breaker_counts_scoring_cpu_time_not_waiting(settings, monkeypatch):
    """Scoring that waits (the GIL held by a model loading in a thread, a busy core) past the
    budget never fails the model breaker; scoring that computes past it does, and opens it."""
    import services.recommender.service as service_module

    real_score = service_module.score
    redis = aioredis.from_url(settings.redis_url)
    s = tuned(settings, budget_ms=30, redis_budget_ms=10, breaker_min_requests=3,
              breaker_window_ms=10_000, breaker_sleep_ms=10_000)
    await seed(s, redis)

    def waiting(*args):
        time.sleep(0.04)          # 40 ms of wall time, no CPU
        return real_score(*args)

    def computing(*args):
        end = time.thread_time() + 0.04
        while time.thread_time() < end:   # 40 ms of this thread's CPU
            pass
        return real_score(*args)

    async with TestClient(TestServer(make_app(s))) as client:
        async def model_breaker() -> dict:
            return (await (await client.get("/health")).json())["breakers"]["model"]

        monkeypatch.setattr(service_module, "score", waiting)
        for _ in range(4):
            _, body = await get(client, user_id=user_id(1), k=3)
            assert body["path"] == "model" and body["reason"] is None
        assert (await model_breaker())["state"] == "closed"
        assert (await model_breaker())["error_rate"] == 0.0

        monkeypatch.setattr(service_module, "score", computing)
        for _ in range(4):
            await get(client, user_id=user_id(1), k=3)
        assert (await model_breaker())["state"] == "open"
        _, body = await get(client, user_id=user_id(1), k=3)
        assert body["path"] == "fallback" and body["reason"] == "model_open"

        # An answer that calls no model is not the breaker's: a precomputed top-k by the
        # served version is still served while it is open, and not counted by it.
        before = await model_breaker()
        topk = [[item_id(j), 1.0 - j / 100] for j in (40, 41, 42)]
        await redis.set(s.redis_key("topk", user_id(1)), orjson.dumps(
            {"name": "als", "version": "v1", "items": topk, "computed_ms": now_ms()}), ex=60)
        _, body = await get(client, user_id=user_id(1), k=3)
        assert (body["path"], body["source"], body["reason"]) == ("model", "precomputed", None)
        assert [i["item_id"] for i in body["items"]] == [item_id(j) for j in (40, 41, 42)]
        after = await model_breaker()
        assert (after["state"], after["requests"], after["rejected"]) == \
            ("open", before["requests"], before["rejected"])
    await redis.aclose()
