"""The collector on the real broker: every error path, what reaches `clicks` and
`clicks.dlq`, partitioning and packing, Kafka unreachable, and the real
Segment Python SDK. (Plus the recommender's 4xx paths.)"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import time

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from schemas.clicks import partition_of
from services.collector.app import make_app as collector_app
from services.recommender.app import make_app as recommender_app
from services.settings import SettingsError
from streams import topics
from tests.integration.helpers import consume, eventually, read_topic

pytestmark = pytest.mark.integration

KEY = "test-write-key"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
          "like Gecko) Version/17.5 Mobile/15E148 Safari/604.1")


def track(user: str, mid: str, **more) -> dict:
    return {"type": "track", "event": "Product Viewed", "userId": user, "messageId": mid,
            "timestamp": "2026-01-05T10:00:00Z", "properties": {"item_id": "i1"}, **more}


def batch(*events, **top) -> bytes:
    return orjson.dumps({"batch": list(events), **top})


@pytest.fixture
def csettings(settings):
    return dataclasses.replace(settings, write_keys=(KEY,), trusted_proxies=2)


async def ready(client: TestClient, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (await client.get("/health")).status != 200:
        assert time.monotonic() < deadline, "collector did not connect to Kafka"
        await asyncio.sleep(0.05)


async def read_records(bootstrap: str, topic: str, events: int, timeout_s: float = 30):
    """(partition, key, ClickBatch) of `topic` until `events` events were read."""
    return await consume(bootstrap, topic, lambda got: sum(len(v["events"]) for _, _, v in got) >= events,
                         lambda r: (r.partition, r.key.decode() if r.key else None, orjson.loads(r.value)),
                         timeout_s)


BIG = {"x": "y" * 40_000}
# (reason, path, headers, body, status, part of the error message)
ERRORS = [
    ("no write key", "/v1/batch", {}, batch(track("u", "m")), 401, "no write key"),
    ("unknown write key", "/v1/batch",
     {"Authorization": "Basic " + base64.b64encode(b"nope:").decode()}, batch(track("u", "m")),
     401, "unknown write key"),
    ("unknown writeKey in the body", "/v1/batch", {}, batch(track("u", "m"), writeKey="nope"),
     401, "unknown write key"),
    ("not Basic auth", "/v1/batch", {"Authorization": "Bearer x"}, batch(track("u", "m")),
     401, "not supported"),
    ("no key and not JSON", "/v1/batch", {}, b"{", 401, "no write key"),
    ("malformed JSON", "/v1/batch", AUTH, b"{not json", 400, "not valid JSON"),
    ("not a batch", "/v1/batch", AUTH, b'{"events": []}', 400, '"batch" array'),
    ("empty batch", "/v1/batch", AUTH, batch(), 400, '"batch" is empty'),
    ("every event invalid", "/v1/batch", AUTH, batch({"type": "track", "userId": "u"}),
     400, 'batch[0]: a track event needs an event name'),
    ("single event invalid", "/v1/alias", AUTH, b'{"userId": "u"}', 400, "needs a previousId"),
    ("single endpoint, not an object", "/v1/track", AUTH, b"[]", 400, "one track event"),
    ("batch over 500 KB", "/v1/batch", AUTH,
     batch(*[track("u", f"m{i}", properties={"x": "y" * 30_000}) for i in range(20)]),
     413, "larger than the 512000-byte limit"),
    ("event over 32 KB", "/v1/track", AUTH, orjson.dumps(track("u", "m", properties=BIG)),
     413, "over the 32768-byte limit"),
    ("only event of a batch over 32 KB", "/v1/batch", AUTH,
     batch(track("u", "m", properties=BIG)), 413, "batch[0]: event is"),
    ("gzip body over 500 KB once inflated", "/v1/batch", {**AUTH, "Content-Encoding": "gzip"},
     gzip.compress(batch(*[track("u", f"m{i}", properties={"x": "y" * 30_000}) for i in range(20)])),
     413, "larger than"),
    ("corrupt gzip body", "/v1/batch", {**AUTH, "Content-Encoding": "gzip"},
     b"\x1f\x8b\x08\x00not gzip at all", 400, "body cannot be read as gzip"),
    ("gzip body cut short", "/v1/batch", {**AUTH, "Content-Encoding": "gzip"},
     gzip.compress(batch(track("u", "m")))[:-12], 400, "cut short"),
    ("an encoding the collector does not inflate", "/v1/batch", {**AUTH, "Content-Encoding": "br"},
     batch(track("u", "m")), 415, "'br' is not supported"),
    ("a batch context repeated in every event over 500 KB", "/v1/batch", AUTH,
     batch(*[track("u", f"m{i}") for i in range(30)], context={"library": {"name": "x" * 20_000}}),
     413, "batch context (20"),
]


async def test_every_error_path_answers_with_the_reason(csettings):
    async with TestClient(TestServer(collector_app(csettings))) as client:
        await ready(client)
        for reason, path, headers, data, status, message in ERRORS:
            resp = await client.post(path, data=data, headers=headers)
            body = await resp.json()
            assert (resp.status, body["success"]) == (status, False), (reason, body)
            assert message in body["error"] and body["message"] == body["error"], (reason, body)
        resp = await client.get("/v1/batch")
        assert resp.status == 405
        text = await (await client.get("/metrics")).text()
    assert 'clickloop_collector_requests_rejected_total{reason="unauthorized"} 5.0' in text
    assert 'clickloop_collector_requests_rejected_total{reason="too_large"} 5.0' in text
    assert 'clickloop_collector_events_accepted_total 0.0' in text


async def test_bad_events_go_to_the_dlq_and_the_good_ones_are_accepted(csettings):
    bad = {"type": "track", "userId": "u2", "messageId": "bad"}
    async with TestClient(TestServer(collector_app(csettings))) as client:
        resp = await client.post("/v1/batch", data=batch(track("u1", "ok1"), bad, track("u1", "ok2")),
                                 headers=AUTH)
        body = await resp.json()
        metrics = await (await client.get("/metrics")).text()
    assert resp.status == 200 and body["success"] is True and body["accepted"] == 2
    assert body["rejected"] == [{"position": "batch[1]",
                                 "error": 'a track event needs an event name ("event")'}]
    (record,) = await read_topic(csettings.kafka_bootstrap, csettings.topic(topics.CLICKS),
                                 lambda got: len(got) >= 1)
    assert [e["message_id"] for e in record["events"]] == ["ok1", "ok2"]
    (dead,) = await read_topic(csettings.kafka_bootstrap, csettings.topic(topics.CLICKS_DLQ),
                               lambda got: len(got) >= 1)
    assert dead["position"] == "POST /v1/batch batch[1]" and dead["processor"] == "collector"
    assert "event name" in dead["error"]
    assert orjson.loads(base64.b64decode(dead["value_b64"])) == bad
    assert 'clickloop_collector_events_rejected_total{reason="invalid"} 1.0' in metrics
    assert 'clickloop_collector_events_accepted_total 2.0' in metrics
    assert 'clickloop_collector_dlq_records_total 1.0' in metrics


async def test_events_are_enriched_on_the_topic(csettings):
    events = [
        # client clock one hour behind; sent 2 s after the event
        {"type": "track", "event": "Signed Up", "userId": "u1", "messageId": "skewed",
         "timestamp": "2026-01-05T09:00:00Z", "sentAt": "2026-01-05T09:00:02Z",
         "context": {"userAgent": IPHONE, "page": {"path": "/"}, "locale": "de-DE"},
         "traits": {"plan": "pro"}, "brandNew": [1, 2]},
        # no identity: the collector's cookie gives one
        {"type": "page", "name": "Home", "messageId": "cookie", "context": {"ip": "203.0.113.77"}},
    ]
    headers = {"Content-Encoding": "gzip", "X-Forwarded-For": "198.51.100.23, 10.0.0.1",
               "X-Forwarded-Proto": "https"}
    async with TestClient(TestServer(collector_app(csettings))) as client:
        t0 = int(time.time() * 1000)
        resp = await client.post("/v1/batch", data=gzip.compress(batch(*events, writeKey=KEY)),
                                 headers=headers)
        t1 = int(time.time() * 1000)
        assert resp.status == 200, await resp.text()
        cookie = resp.headers["Set-Cookie"]
    (record,) = await read_topic(csettings.kafka_bootstrap, csettings.topic(topics.CLICKS),
                                 lambda got: len(got) >= 1)
    skewed, paged = record["events"]
    assert t0 <= skewed["received_at"] <= t1
    assert skewed["timestamp"] == skewed["received_at"] - 2000
    assert skewed["original_timestamp"] == 1_767_603_600_000 and skewed["sent_at"] == 1_767_603_602_000
    assert skewed["context"]["ip"] == "198.51.100.0"          # two trusted proxies' client
    assert skewed["context"]["ua"] == {"browser": "Mobile Safari", "os": "iOS",
                                       "device": "mobile", "is_bot": False}
    assert skewed["context"]["locale"] == "de-DE" and skewed["traits"] == {"plan": "pro"}
    assert skewed["extra"] == {"brandNew": [1, 2]}
    assert paged["context"]["ip"] == "203.0.113.0" and paged["name"] == "Home"
    anonymous_id = paged["anonymous_id"]
    assert anonymous_id and f"cl_anonymous_id={anonymous_id}" in cookie
    for attribute in ("Max-Age=31536000", "SameSite=Lax", "Secure", "Path=/"):
        assert attribute in cookie


async def test_forwarded_headers_are_not_believed_without_a_trusted_proxy(csettings):
    """By default (CLICKLOOP_TRUSTED_PROXIES=0) a client cannot claim another address or
    https by sending X-Forwarded-For / -Proto itself: the peer's address is stored."""
    s = dataclasses.replace(csettings, trusted_proxies=0)
    headers = {"X-Forwarded-For": "198.51.100.23", "X-Forwarded-Proto": "https"}
    async with TestClient(TestServer(collector_app(s))) as client:
        resp = await client.post("/v1/batch", headers=headers, data=batch(
            {"type": "page", "name": "Home", "messageId": "spoof"}, writeKey=KEY))
        assert resp.status == 200, await resp.text()
        assert "Secure" not in resp.headers["Set-Cookie"]
    (record,) = await read_topic(s.kafka_bootstrap, s.topic(topics.CLICKS), lambda got: len(got) >= 1)
    assert record["events"][0]["context"]["ip"] == "127.0.0.0"


async def test_the_cookie_is_reused_and_every_endpoint_answers_like_segment(csettings):
    async with TestClient(TestServer(collector_app(csettings))) as client:
        client.session.cookie_jar.update_cookies({"cl_anonymous_id": "known-visitor"})
        for kind, extra in [("track", {"event": "E"}), ("page", {}), ("screen", {"name": "S"}),
                            ("identify", {"traits": {"a": 1}}),
                            ("alias", {"userId": "u9", "previousId": "known-visitor"}),
                            ("group", {"groupId": "g1"})]:
            resp = await client.post(f"/v1/{kind}", data=orjson.dumps({"messageId": kind, **extra}),
                                     headers=AUTH)
            assert (resp.status, await resp.json()) == (200, {"success": True}), kind
            assert "Set-Cookie" not in resp.headers
    records = await read_topic(csettings.kafka_bootstrap, csettings.topic(topics.CLICKS),
                               lambda got: sum(len(r["events"]) for r in got) >= 6)
    events = [e for r in records for e in r["events"]]
    assert [e["type"] for e in events] == ["track", "page", "screen", "identify", "alias", "group"]
    assert {e["anonymous_id"] for e in events if e["type"] != "alias"} == {"known-visitor"}


async def test_events_of_a_visitor_land_on_its_partition_packed_across_requests(settings):
    csettings = dataclasses.replace(settings, partitions=4, write_keys=(KEY,), linger_ms=300)
    visitors = [f"visitor-{i}" for i in range(40)]
    requests = [[track(visitors[(r * 7 + j) % 40], f"r{r}-e{j}") for j in range(20)]
                for r in range(30)]
    async with TestClient(TestServer(collector_app(csettings))) as client:
        await ready(client)
        answers = await asyncio.gather(*[client.post("/v1/batch", data=batch(*events), headers=AUTH)
                                         for events in requests])
        assert [a.status for a in answers] == [200] * 30
        metrics = await (await client.get("/metrics")).text()
    records = await read_records(csettings.kafka_bootstrap, csettings.topic(topics.CLICKS), 600)
    assert sum(len(v["events"]) for _, _, v in records) == 600
    # 30 requests, 600 events: one linger window packs them into a record per partition.
    assert len(records) <= 8, len(records)
    for partition, key, value in records:
        owners = {e["user_id"] for e in value["events"]}
        assert {partition_of(v, 4) for v in owners} == {partition}
        assert key == (owners.pop() if len(owners) == 1 else None)
    # A visitor's events keep the order they had in their request.
    seen: dict[tuple[str, str], list[int]] = {}
    for _, _, value in sorted(records, key=lambda r: r[0]):
        for e in value["events"]:
            request, index = e["message_id"].split("-e")
            seen.setdefault((request, e["user_id"]), []).append(int(index))
    assert all(indexes == sorted(indexes) for indexes in seen.values())
    assert "clickloop_collector_record_events_count" in metrics


async def test_kafka_unreachable_answers_503_with_retry_after_never_2xx(csettings):
    down = dataclasses.replace(csettings, kafka_bootstrap="127.0.0.1:1")
    async with TestClient(TestServer(collector_app(down))) as client:
        health = await client.get("/health")
        assert health.status == 503 and "unreachable" in (await health.json())["kafka"]
        resp = await client.post("/v1/batch", data=batch(track("u", "m")), headers=AUTH)
        assert resp.status == 503 and resp.headers["Retry-After"] == "5"
        assert "127.0.0.1:1" in (await resp.json())["error"]
        metrics = await (await client.get("/metrics")).text()
    assert 'clickloop_collector_requests_rejected_total{reason="unavailable"} 1.0' in metrics
    assert 'clickloop_collector_kafka_ready 0.0' in metrics


async def test_health_is_503_while_the_broker_does_not_answer(csettings, infra):
    """Connected once is not connected now: /health asks the broker (a metadata request,
    at most once a second). The session's broker is paused (SIGSTOP) for a few seconds;
    nothing else runs meanwhile."""
    import os
    import signal

    from services import infra as local

    pid = int(local.kafka_service(infra).pidfile.read_text())
    async with TestClient(TestServer(collector_app(csettings))) as client:
        await ready(client)
        assert (await client.get("/health")).status == 200
        await asyncio.sleep(1.1)   # past the probe's cache
        os.kill(pid, signal.SIGSTOP)
        try:
            health = await client.get("/health")
            body = await health.json()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert health.status == 503 and "did not answer" in body["kafka"], body
        await asyncio.sleep(1.1)
        again = await eventually(lambda: client.get("/health"), lambda r: r.status == 200,
                                 timeout_s=30, what="healthy again")
        assert (await again.json())["kafka"] == "connected"


def test_the_collector_refuses_to_start_without_a_write_key(settings):
    with pytest.raises(SettingsError, match="CLICKLOOP_WRITE_KEYS is empty"):
        collector_app(dataclasses.replace(settings, write_keys=(), require_write_key=True))
    collector_app(dataclasses.replace(settings, write_keys=(), require_write_key=False))


@pytest.mark.parametrize("use_gzip", [False, True])
async def test_the_segment_python_sdk_works_unchanged(csettings, use_gzip):
    from segment.analytics import Client

    errors = []
    async with TestClient(TestServer(collector_app(csettings))) as client:
        await ready(client)
        sdk = Client(KEY, host=str(client.make_url("")).rstrip("/"), sync_mode=True, gzip=use_gzip,
                     max_retries=0, on_error=lambda exc, batch: errors.append(exc))

        def send() -> list[str]:
            ids = []
            ids.append(sdk.track("sdk-user", "Product Viewed", {"item_id": "i7"},
                                 context={"userAgent": IPHONE})[1]["messageId"])
            ids.append(sdk.page("sdk-user", "Shop", "Home", {"path": "/"})[1]["messageId"])
            ids.append(sdk.identify("sdk-user", {"plan": "pro"})[1]["messageId"])
            ids.append(sdk.track(anonymous_id="sdk-anon", event="Searched")[1]["messageId"])
            return ids

        ids = await asyncio.to_thread(send)
    assert not errors
    records = await read_topic(csettings.kafka_bootstrap, csettings.topic(topics.CLICKS),
                               lambda got: sum(len(r["events"]) for r in got) >= 4)
    events = {e["message_id"]: e for r in records for e in r["events"]}
    assert set(events) == set(ids)
    viewed, page, identify, searched = (events[i] for i in ids)
    assert viewed["properties"] == {"item_id": "i7"} and viewed["context"]["ua"]["os"] == "iOS"
    assert viewed["context"]["library"]["name"] == "analytics-python"
    assert page["name"] == "Home" and page["extra"]["category"] == "Shop"
    assert identify["traits"] == {"plan": "pro"}
    assert searched["anonymous_id"] == "sdk-anon" and searched["user_id"] is None
    assert all(e["sent_at"] is not None and abs(e["timestamp"] - e["received_at"]) < 60_000
               for e in events.values())


@pytest.mark.parametrize("query,message", [
    ({}, "user_id or anonymous_id"),
    ({"user_id": "u", "k": "x"}, "not a whole number"),
    ({"user_id": "u", "k": "0"}, "between 1 and 100"),
])
async def test_recommender_refuses_bad_queries(settings, query, message):
    async with TestClient(TestServer(recommender_app(settings))) as client:
        resp = await client.get("/v1/recommendations", params=query)
        assert resp.status == 400 and message in (await resp.json())["error"]
