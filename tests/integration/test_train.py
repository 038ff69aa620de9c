"""`clickloop train` end to end on the real broker and Redis: clicks produced to Kafka, archived
to Parquet by the archive worker, trained on as a subprocess; the artifact, the announcement on
`models` and the precomputed top-k lists in Redis are checked, and so are the clean errors."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import subprocess
import sys

import fastjsonschema
import orjson
import pyarrow.parquet as pq
import pytest
import redis

from bench._common import produce
from schemas import json_schema
from services.demo import click_records
from services.model import artifact
from services.replay.command import ARCHIVER
from streams import topics
from schemas.archive import SCHEMAS
from streams.archive_layout import FileRange
from streams.archive_store import ArchiveStore
from streams.archive_table import Columns, split_by_hour
from tests.integration.helpers import eventually, read_topic

pytestmark = pytest.mark.integration

DAY = 86_400_000
GROUPS, PER_GROUP, USERS, PER_USER = 4, 12, 160, 14
END = 1_795_528_800_000 + 3 * DAY     # 2026-11-27T14:00Z: event times end here
START = END - 4 * DAY


def planted_clicks(seed: int = 3) -> tuple[list[dict], dict[str, int]]:
    """Click events with planted tastes: users of a group view and click that group's items (5 %
    noise); group 0 holds 40 % of the users, so its items are the most popular overall. One user
    in eight was active only on the first day. Searches (no item) are mixed in. Returns the events
    and each user's last item-interaction time."""
    rng = random.Random(seed)
    items = [[f"g{g}-item{j:02d}" for j in range(PER_GROUP)] for g in range(GROUPS)]
    events, last = [], {}
    for u in range(USERS):
        user = f"user-{u:03d}"
        group = 0 if u < USERS * 0.4 else 1 + u % (GROUPS - 1)
        dormant = u % 8 == 7
        for n in range(PER_USER):
            ts = rng.randrange(START, START + DAY if dormant else END)
            pool = items[rng.randrange(GROUPS)] if rng.random() < 0.05 else items[group]
            name = "Product Clicked" if rng.random() < 0.3 else "Product Viewed"
            events.append(event(f"m-{u}-{n}", user, ts, name, {"item_id": rng.choice(pool)}))
            last[user] = max(last.get(user, ts), ts)
            if n % 5 == 0:
                events.append(event(f"s-{u}-{n}", user, ts + 1, "Products Searched", {"query": "x"}))
    events.sort(key=lambda e: e["timestamp"])
    return events, last


def event(message_id: str, user: str, ts: int, name: str, properties: dict) -> dict:
    return {"message_id": message_id, "type": "track", "event": name, "user_id": user,
            "anonymous_id": f"anon-{user}", "timestamp": ts, "received_at": ts + 50,
            "context": {"page": {"path": "/"}}, "properties": properties}


def archived_rows(store: ArchiveStore, topic: str) -> int:
    total = 0
    for path in store.list_topic(topic):
        if path.endswith(".parquet"):
            try:
                total += pq.read_metadata(path, filesystem=store.fs).num_rows
            except FileNotFoundError:
                pass    # recovery deleted an uncommitted flush between listing and reading
    return total


def train(settings, *args: str) -> subprocess.CompletedProcess:
    """`clickloop train ARGS` as a subprocess with the test's settings."""
    return subprocess.run([sys.executable, "-m", "services.cli", "train", *args],
                          env={**os.environ, **settings.as_env()}, capture_output=True, text=True,
                          timeout=120)


async def archive(settings, workers, events: list[dict]) -> None:
    """Produce the events to `clicks`, run the archive worker until every event is in Parquet
    and its offsets are committed, then stop it."""
    await topics.ensure_topics(settings)
    topic = settings.topic(topics.CLICKS)
    records = click_records(events, settings.partitions, per_record=50)
    await produce(settings, topic, records)
    workers.start("archive")
    store = ArchiveStore(settings.archive_root)
    await eventually(lambda: asyncio.to_thread(archived_rows, store, topic),
                     lambda n: n >= len(events), timeout_s=60, what="every event archived")
    group = topics.group_id(settings, ARCHIVER)
    await eventually(lambda: topics.committed_offsets(settings, group, topic),
                     lambda c: sum(c.values()) == len(records), timeout_s=30,
                     what="archived offsets committed")
    workers.stop()
    assert archived_rows(store, topic) == len(events)


async def test_train_evaluates_writes_announces_and_precomputes(settings, workers, tmp_path):
    settings = dataclasses.replace(settings, archive_topics=(topics.CLICKS,), archive_interval_s=1,
                                   model_dir=str(tmp_path / "models"), topk_ttl_s=3600)
    workers.settings = settings
    events, last = planted_clicks()
    await archive(settings, workers, events)
    interactions = sum(e["event"] != "Products Searched" for e in events)

    # 1. Train, evaluate, write and announce.
    done = train(settings, "--json", "--factors", "8", "--iterations", "10", "--k", "5")
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout)
    manifest = artifact.verify(out["path"])            # the content hash holds
    assert (manifest.name, manifest.version) == ("als", out["version"])
    assert out["path"] == str(tmp_path / "models" / "als" / out["version"])
    assert out["data_range"] == list(manifest.data_range) == [
        min(e["timestamp"] for e in events if e["event"] != "Products Searched"), max(last.values())]
    assert (out["users"], out["items"], out["interactions"]) == (USERS, GROUPS * PER_GROUP, interactions)
    metrics = manifest.metrics
    assert out["metrics"] == metrics and metrics["k"] == 5 and metrics["users"] > 50
    assert metrics["train_interactions"] + metrics["test_interactions"] == interactions
    model, popular = metrics["model"], metrics["popularity"]
    assert model["recall@5"] > popular["recall@5"] + 0.15, metrics
    assert model["ndcg@5"] > popular["ndcg@5"] + 0.15, metrics
    params = manifest.params
    assert (params["factors"], params["iterations"], params["k"], params["backend"]) == (8, 10, 5, "implicit")

    arrays = artifact.read(out["path"]).arrays
    assert arrays["item_factors"].shape == (GROUPS * PER_GROUP, 8)
    assert arrays["user_factors"].shape == (USERS, 8)
    assert arrays["item_factors"].dtype == arrays["user_factors"].dtype == "float32"
    assert arrays["user_ids"].dtype.kind == "U" and sorted(arrays["user_ids"]) == sorted(last)
    counts = {}
    for e in events:
        if e["event"] != "Products Searched":
            counts[e["properties"]["item_id"]] = counts.get(e["properties"]["item_id"], 0) + 1
    assert dict(zip(manifest.item_ids, arrays["item_popularity"].tolist())) == counts

    (announced,) = await read_topic(settings.kafka_bootstrap, settings.topic(topics.MODELS),
                                    lambda got: len(got) >= 1, timeout_s=20)
    fastjsonschema.compile(json_schema("models"))(announced)
    assert announced == artifact.announcement(artifact.read(out["path"]))
    assert out["announced"]["topic"] == settings.topic(topics.MODELS)
    keys = await _keys(settings, settings.topic(topics.MODELS))
    assert keys == [b"als"]

    # 2. A second model name, a narrower range, --precompute, and no announcement.
    client = redis.Redis.from_url(settings.redis_url)
    try:
        since = START + DAY
        done = train(settings, "--json", "--name", "als-recent", "--since", str(since),
                     "--factors", "8", "--iterations", "10", "--precompute", "--precompute-k", "6",
                     "--active-days", "2", "--no-announce")
        assert done.returncode == 0, done.stderr
        out = orjson.loads(done.stdout)
        assert out["announced"] is None
        assert out["data_range"][0] >= since
        assert out["data_range"][1] == max(last.values())
        active = {u for u, ts in last.items() if ts >= out["data_range"][1] - 2 * DAY}
        assert out["precomputed"]["users"] == len(active) > 0
        seen = {}
        for e in events:
            if e["event"] != "Products Searched" and e["timestamp"] >= since:
                seen.setdefault(e["user_id"], set()).add(e["properties"]["item_id"])
        for user in sorted(last):
            key = settings.redis_key("topk", user)
            raw = client.get(key)
            if user not in active:
                assert raw is None, f"{user} is not active but has a list"
                continue
            entry = orjson.loads(raw)
            assert (entry["name"], entry["version"]) == ("als-recent", out["version"])
            items = [item for item, _ in entry["items"]]
            assert len(items) == 6 and not set(items) & seen[user], "seen items are excluded"
            scores = [score for _, score in entry["items"]]
            assert scores == sorted(scores, reverse=True)
            assert 3500 < client.ttl(key) <= 3600
        assert len(await _keys(settings, settings.topic(topics.MODELS))) == 1, "--no-announce announced"

        # 3. Too little data in range: a clean error, no artifact.
        done = train(settings, "--since", str(END + DAY))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "no item interactions in the archive" in done.stderr, done.stderr
        assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["als", "als-recent"]
    finally:
        leftovers = list(client.scan_iter(settings.redis_key("topk", "*")))
        if leftovers:
            client.delete(*leftovers)
        client.close()


async def _keys(settings, topic: str) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=3000)
        return [r.key for records in batches.values() for r in records]
    finally:
        await consumer.stop()


def test_empty_archive_and_bad_options_are_clean_errors(settings, tmp_path):
    settings = dataclasses.replace(settings, model_dir=str(tmp_path / "models"))
    for args, message in [
        ((), "the archive is empty"),
        (("--since", "2026-11-27", "--until", "2026-11-26"), "is not before --until"),
        (("--since", "yesterday"), "give an ISO-8601 time"),
        (("--factors", "0"), "factors, iterations and threads must be >= 1"),
    ]:
        done = train(settings, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert done.stdout == ""
    assert not (tmp_path / "models").exists()


def build_archive(settings, events: list[dict]) -> None:
    """The archive the worker would write for these events on partition 0, one flush, built with
    the worker's own table and store code (for tests that need no broker)."""
    spec, per_record = SCHEMAS[topics.CLICKS], 50
    columns = Columns(spec, 0)
    for offset, start in enumerate(range(0, len(events), per_record)):
        assert not columns.add(events[start:start + per_record], offset, END)
    table, bad = columns.to_table()
    assert not bad
    store = ArchiveStore(settings.archive_root)
    flush = FileRange(0, 0, (len(events) - 1) // per_record)
    store.publish([store.write(settings.topic(topics.CLICKS), hour, flush, part, "test")
                   for hour, part in split_by_hour(table, spec.event_time)])


def test_kafka_or_redis_down_is_a_clean_error_after_the_artifact_is_written(settings, tmp_path):
    """Training reads the archive without Kafka (every published file: the committed offsets
    are unknown); announcing or precomputing then fails with what was done and what to do."""
    settings = dataclasses.replace(settings, model_dir=str(tmp_path / "models"))
    build_archive(settings, planted_clicks()[0])
    no_kafka = dataclasses.replace(settings, kafka_bootstrap="127.0.0.1:1")
    no_redis = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")

    done = train(no_kafka, "--factors", "4", "--iterations", "3")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "but announcing it on" in done.stderr and "--no-announce" in done.stderr, done.stderr
    (written,) = (tmp_path / "models" / "als").iterdir()
    assert artifact.verify(written).params["factors"] == 4

    done = train(no_kafka, "--factors", "4", "--iterations", "3", "--no-announce")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("model als version ")
    heads = [line.split()[0] for line in lines[1:]]
    assert heads == ["data", "archive", "trained", "ALS", "hold-out", "recall@10", "model",
                     "popularity", "artifact", "announced"], done.stdout
    assert f"{USERS} users, {GROUPS * PER_GROUP} items" in done.stdout
    assert "announced    no (--no-announce)" in done.stdout

    done = train(no_redis, "--precompute", "--no-announce", "--factors", "4", "--iterations", "3")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "writing top-k lists to Redis at redis://127.0.0.1:1/0 failed" in done.stderr, done.stderr
    assert len(list((tmp_path / "models" / "als").iterdir())) == 3
