"""The archive worker on the real broker: exactly once under SIGKILL, layout, readers, dead letters."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import signal

import duckdb
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaProducer

from bench._common import produce
from schemas.archive import SCHEMAS, TIMESTAMP
from services.demo import click_events, click_records
from streams import topics
from streams.archive_layout import parse
from streams.archive_store import ArchiveStore
from tests.integration.helpers import eventually, read_topic

pytestmark = pytest.mark.integration


def final_files(store: ArchiveStore, topic: str) -> list[str]:
    return sorted(p for p in store.list_topic(topic) if p.endswith(".parquet"))


def row_count(store: ArchiveStore, topic: str) -> int:
    """Rows in the topic's final files, from their footers. A file may vanish between the
    listing and its read: a restarted worker's recovery deletes flushes never committed
    (a local folder says FileNotFoundError, S3 an OSError naming RESOURCE_NOT_FOUND)."""
    total = 0
    for path in final_files(store, topic):
        try:
            total += pq.read_metadata(path, filesystem=store.fs).num_rows
        except OSError:
            if store.fs.get_file_info(path).type != pafs.FileType.NotFound:
                raise
    return total


def archived_rows(store: ArchiveStore, topic: str, logical: str) -> list[dict]:
    """Every row of the topic's final files, timestamps as epoch ms, JSON columns decoded."""
    spec = SCHEMAS[logical]
    rows: list[dict] = []
    for path in final_files(store, topic):
        table = pq.read_table(path, filesystem=store.fs)
        assert table.schema.equals(spec.schema, check_metadata=False), path
        table = pa.table({name: table[name].cast(pa.int64()) if table[name].type == TIMESTAMP
                          else table[name] for name in table.column_names})
        for row in table.to_pylist():
            for name in spec.json_fields:
                if row[name] is not None:
                    row[name] = orjson.loads(row[name])
            rows.append(row)
    return rows


def as_event(row: dict) -> dict:
    """The event a row holds (absent and null fields are the same in a column)."""
    return {k: v for k, v in row.items() if not k.startswith("_") and v is not None}


@pytest.mark.parametrize("where", ["folder", "s3"])
async def test_sigkill_during_writes_neither_loses_nor_duplicates_a_row(settings, workers, request, where):
    """Kill the archive worker with SIGKILL while it writes, several times; the Parquet
    files must then hold every produced event exactly once, with its content. In a local
    folder (temporary names renamed into place) and in an S3 bucket (final keys at once,
    no rename: the recovery alone keeps uncommitted flushes out)."""
    uri = ""
    if where == "s3":
        uri = request.getfixturevalue("s3").uri(f"{settings.prefix.rstrip('.')}/archive")
    settings = dataclasses.replace(settings, partitions=2, instance_id="archive-kill",
                                   archive_topics=(topics.CLICKS,), archive_max_rows=4000,
                                   archive_interval_s=1, archive_uri=uri)
    workers.settings = settings
    await topics.ensure_topics(settings)
    topic = settings.topic(topics.CLICKS)
    records = click_records(click_events(120_000, seed=7), settings.partitions, per_record=50)
    expected: dict[tuple[int, int, int], dict] = {}
    next_offset = [0] * settings.partitions
    for partition, _, value in records:
        for index, event in enumerate(orjson.loads(value)["events"]):
            expected[(partition, next_offset[partition], index)] = as_event(event)
        next_offset[partition] += 1
    await produce(settings, topic, records)
    store = ArchiveStore(settings.archive_root)

    rng = random.Random(3)
    for _ in range(4):
        seen = set(final_files(store, topic))
        proc = workers.start("archive")
        # Kill only once this run has renamed a new file into place, shortly after.
        while not set(final_files(store, topic)) - seen:
            assert proc.poll() is None, workers.logs()
            await asyncio.sleep(0.01)
        await asyncio.sleep(rng.uniform(0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_with = row_count(store, topic)
    assert killed_with < len(expected), "the work was done before the last kill: use more events"

    workers.start("archive")
    await eventually(lambda: asyncio.to_thread(row_count, store, topic),
                     lambda n: n >= len(expected), timeout_s=60, what="every event archived")
    await asyncio.sleep(1.5)   # a duplicate would show up now
    rows = archived_rows(store, topic, topics.CLICKS)
    got = {(r["_partition"], r["_offset"], r["_index"]): as_event(r) for r in rows}
    assert len(got) == len(rows), "a row was archived twice"
    assert got.keys() == expected.keys()
    assert got == expected, "archived content differs from the topic"
    assert all(not parse(p).temp for p in store.list_topic(topic)), "temporary leftovers"
    # At least one restart found files of a flush that was renamed but never committed.
    deleted = [int(m) for m in re.findall(r"deleted (\d+) uncommitted", workers.logs())]
    assert len(deleted) >= 5 * settings.partitions and max(deleted) > 0, workers.logs()


def session(i: int, start: int) -> dict:
    return {"v": 1, "session_id": f"s{i}", "visitor": f"u{i}", "user_id": f"u{i}",
            "anonymous_id": None, "start": start, "end": start + 60_000, "duration_ms": 60_000,
            "event_count": 3, "counts": {"page": 2, "Product Viewed": 1}, "page_views": 2,
            "searches": 0, "landing_page": "/", "exit_page": "/p/1", "referrer": None,
            "utm": {"source": "news"}, "device": "mobile", "items": ["item-1"],
            "session_index": 1, "previous_session_id": None}


async def test_layout_readers_dead_letters_and_idle_flush(settings, workers):
    """Clicks and sessions land in hour folders by event time, an idle partition flushes
    after the interval, bad records and events go to the DLQ, and DuckDB and pandas
    read the archive as it is."""
    settings = dataclasses.replace(settings, archive_interval_s=1)
    workers.settings = settings
    await topics.ensure_topics(settings)
    clicks, sessions = settings.topic(topics.CLICKS), settings.topic(topics.SESSIONS)
    hour = 1_795_528_800_000   # 2026-11-24T14:00:00Z
    events = [{"message_id": f"m{i}", "type": "track", "event": "Product Viewed",
               "user_id": "dana", "anonymous_id": None, "timestamp": hour + i * 20 * 60_000,
               "received_at": hour, "context": {"page": {"path": f"/p/{i}"}},
               "properties": {"item_id": f"item-{i}", "price": 9.5 + i}} for i in range(5)]
    wrong = dict(events[0], message_id="bad-type", user_id=42)
    unknown = dict(events[0], message_id="bad-field", surprise=True)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(clicks, key=b"dana", value=orjson.dumps(
            {"v": 1, "events": events[:3] + [wrong]}))
        await producer.send_and_wait(clicks, key=b"x", value=b"\xffnot json")
        await producer.send_and_wait(clicks, key=b"dana", value=orjson.dumps(
            {"v": 1, "events": [unknown] + events[3:]}))
        for i in range(3):
            await producer.send_and_wait(sessions, key=f"u{i}".encode(),
                                         value=orjson.dumps(session(i, hour + i * 3_600_000)))
    finally:
        await producer.stop()
    workers.start("archive")
    store = ArchiveStore(settings.archive_root)
    await eventually(lambda: asyncio.to_thread(
        lambda: (len(final_files(store, clicks)), len(final_files(store, sessions)))),
        lambda n: n[0] >= 2 and n[1] >= 3, what="idle partitions flushed")

    root = settings.archive_root
    assert [p[len(root):] for p in final_files(store, clicks)] == [
        f"/topic={clicks}/date=2026-11-24/hour=14/0-0-2.parquet",
        f"/topic={clicks}/date=2026-11-24/hour=15/0-0-2.parquet"]
    got = sorted(archived_rows(store, clicks, topics.CLICKS), key=lambda r: (r["_offset"], r["_index"]))
    assert [(r["_offset"], r["_index"]) for r in got] == [(0, 0), (0, 1), (0, 2), (2, 1), (2, 2)]
    assert [as_event(r) for r in got] == [as_event(e) for e in events]
    (s0, s1, s2) = sorted(archived_rows(store, sessions, topics.SESSIONS), key=lambda r: r["start"])
    assert {k: v for k, v in s1.items() if not k.startswith("_")} == \
        dict(session(1, hour + 3_600_000), counts=[("page", 2), ("Product Viewed", 1)],
             utm=[("source", "news")])

    dead = await read_topic(settings.kafka_bootstrap, settings.topic(topics.CLICKS_DLQ),
                            lambda got: len(got) >= 3)
    assert sorted((d["position"], d["processor"]) for d in dead) == [
        (f"{clicks}[0]@0", "archive"), (f"{clicks}[0]@1", "archive"), (f"{clicks}[0]@2", "archive")]
    reasons = " | ".join(sorted(d["error"] for d in dead))
    assert "not JSON" in reasons and "event 0: field(s) not in the archive schema: surprise" in reasons
    assert "event 3: field 'user_id'" in reasons

    # DuckDB over the hive layout, as the README shows it.
    con = duckdb.connect()
    by_hour = con.execute(f"""
        SELECT date, hour, count(*) AS events, count(DISTINCT user_id) AS users,
               sum(CAST(properties->>'price' AS DOUBLE)) AS revenue
        FROM read_parquet('{root}/topic={clicks}/*/*/*.parquet', hive_partitioning = true)
        GROUP BY ALL ORDER BY date, hour""").fetchall()
    assert [(str(d), h, n, u, r) for d, h, n, u, r in by_hour] == [
        ("2026-11-24", 14, 3, 1, 9.5 + 10.5 + 11.5), ("2026-11-24", 15, 2, 1, 12.5 + 13.5)]
    (first,) = con.execute(f"""
        SELECT min(start) FROM read_parquet('{root}/topic={sessions}/*/*/*.parquet',
                                                   hive_partitioning = true)""").fetchone()
    assert str(first) == "2026-11-24 14:00:00+00:00"
    # pandas (pyarrow's dataset reader) over the topic folder, hive columns included.
    frame = pd.read_parquet(f"{root}/topic={clicks}")
    assert len(frame) == 5 and set(frame["hour"].astype(int)) == {14, 15}
