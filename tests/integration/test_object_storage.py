"""Object storage end to end, over S3's API (the session's `s3` endpoint, tests/conftest.py).

The shape of a cluster whose hosts share only Kafka, Redis and a bucket: the
archive worker writes its Parquet files to the bucket, `clickloop replay` brings
them back into a topic, `clickloop train` (its own process) reads
them there and writes its artifact there, and a recommender
whose own `CLICKLOOP_MODEL_DIR` is an empty local folder serves the model from
the URI the announcement carries."""
from __future__ import annotations

import dataclasses
import time

import orjson
import pyarrow.fs as pafs
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from services.model import artifact
from services.recommender.app import make_app
from services.recommender.synthetic import write_user
from streams import topics
from streams.archive_store import ArchiveStore
from streams.storage import locate
from tests.integration.helpers import read_topic
from tests.integration.test_replay import replay
from tests.integration.test_replay_archive import read_records, record_count
from tests.integration.test_train import archive, planted_clicks, train

pytestmark = pytest.mark.integration


def events_of(value: bytes) -> list[dict]:
    return [{k: v for k, v in e.items() if v is not None} for e in orjson.loads(value)["events"]]


async def test_archive_train_and_serve_through_a_bucket(settings, workers, s3, tmp_path):
    prefix = settings.prefix.rstrip(".")
    settings = dataclasses.replace(settings, archive_topics=(topics.CLICKS,), archive_interval_s=1,
                                   archive_uri=s3.uri(f"{prefix}/archive"),
                                   model_dir=s3.uri(f"{prefix}/models"))
    workers.settings = settings
    events, last = planted_clicks()

    # 1. The archive worker writes to the bucket (every event once: `archive` checks).
    await archive(settings, workers, events)
    store = ArchiveStore(settings.archive_root)
    assert store.atomic_put and store.root == f"{s3.bucket}/{prefix}/archive"
    files = store.list_topic(settings.topic(topics.CLICKS))
    assert files and all(f.endswith(".parquet") for f in files), "only final objects, no temp names"

    # 2. A backfill from the bucket: the live topic's records (fields the planted events
    #    lack come back as nulls: a column has no "absent").
    clicks = settings.topic(topics.CLICKS)
    live = await read_records(settings.kafka_bootstrap, clicks, await record_count(settings, clicks))
    done = replay(settings, "--topic", "clicks", "--source", "archive", "--target", "topic:clicks.bf",
                  "--execute")
    assert done.returncode == 0, done.stdout + done.stderr
    back = await read_records(settings.kafka_bootstrap, settings.topic("clicks.bf"), len(live))
    assert [(p, k, events_of(v)) for p, k, v in back] == [(p, k, events_of(v)) for p, k, v in live]
    assert await record_count(settings, settings.topic("clicks.bf")) == len(live)

    # 3. Train from the bucket, artifact into the bucket, announced with its URI.
    done = train(settings, "--json", "--factors", "8", "--iterations", "10", "--k", "5")
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout)
    assert out["path"] == s3.uri(f"{prefix}/models/als/{out['version']}")
    assert out["interactions"] == sum(e["event"] != "Products Searched" for e in events)
    root = locate(settings.model_root)
    listed = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True))
    assert sorted(i.path for i in listed if i.type == pafs.FileType.File) == [
        f"{root.path}/als/{out['version']}/{name}" for name in (artifact.ARRAYS, artifact.MANIFEST)]
    written = artifact.read(out["path"])           # verified against its content hash
    assert written.manifest.metrics == out["metrics"]
    metrics = written.manifest.metrics
    assert metrics["model"]["recall@5"] > metrics["popularity"]["recall@5"] + 0.15, metrics
    with pytest.raises(artifact.ArtifactError, match="written once"):
        artifact.write(settings.model_root, written.manifest, written.arrays)
    (announced,) = await read_topic(settings.kafka_bootstrap, settings.topic(topics.MODELS),
                                    lambda got: len(got) >= 1, timeout_s=20)
    assert announced == artifact.announcement(written)

    # 4. A recommender with nothing local serves it, from the announcement's URI.
    elsewhere = tmp_path / "elsewhere"
    serving = dataclasses.replace(settings, model_dir=str(elsewhere), feature_cache_ms=0)
    redis = aioredis.from_url(serving.redis_url)
    user = "user-000"           # planted in group 0: its items are g0-…
    ts = int(time.time() * 1000)
    await write_user(redis, serving, user, [("g0-item00", "view", ts)], ts)
    try:
        async with TestClient(TestServer(make_app(serving))) as client:
            resp = await client.get("/v1/recommendations", params={"user_id": user, "k": "5"})
            body = await resp.json()
            assert resp.status == 200 and body["path"] == "model", body
            assert body["model_version"] == out["version"]
            items = [i["item_id"] for i in body["items"]]
            assert sum(i.startswith("g0-") for i in items) >= 4, items
            health = await (await client.get("/health")).json()
            assert health["models"]["served"]["version"] == out["version"]
    finally:
        await redis.aclose()
    assert not elsewhere.exists() or not any(elsewhere.iterdir()), "nothing was copied locally"


def test_a_large_artifact_loads_from_the_bucket_without_a_second_copy(s3):
    """A remote artifact is read in ranges into its arrays: the load's peak Python
    memory is the arrays, one range (`REMOTE_READ_BYTES`) and the manifest's ids, not
    a second copy of the file (reading it whole first, and hashing a copy of each
    array, made it 3.2 times the arrays)."""
    import tracemalloc

    import numpy as np

    factors = np.random.default_rng(1).standard_normal((100_000, 128)).astype(np.float32)
    manifest = artifact.Manifest(name="big", version="v1", created_ms=0, data_range=None,
                                 params={}, metrics={}, item_ids=[f"i{n}" for n in range(100_000)])
    written = artifact.write(s3.uri("models-big"), manifest,
                             {"item_factors": factors, "user_factors": factors[:10],
                              "user_ids": np.array([f"u{n}" for n in range(10)])})
    size = factors.nbytes
    tracemalloc.start()
    try:
        loaded = artifact.read(written.path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(loaded.arrays["item_factors"], factors)
    assert peak < 1.5 * size, f"peak {peak / 1e6:.1f} MB for {size / 1e6:.1f} MB of arrays"
