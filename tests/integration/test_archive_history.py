"""History rows archived like other topics: the archive worker writes a `history.<table>`
topic to Parquet (schemas/archive.py, `history_schema`: `row`/`key` as JSON text) and
the README's DuckDB queries over it — the table as of a time, and a point-in-time
join — agree with the pure `streams.history.as_of` on the same rows."""
from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timezone

import duckdb
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from bench.cdc_history import T0_MS, change_records
from schemas.archive import SCHEMAS
from streams import topics
from streams.archive_store import ArchiveStore
from streams.cdc_history import offline_history
from streams.history import HistoryConfig, as_of
from tests.integration.helpers import eventually
from tests.integration.test_archive import archived_rows, final_files, row_count

pytestmark = pytest.mark.integration

HISTORY = "history.subscriptions"

# The README's query: every row of the table as it was at a time.
VERSIONS = """
  SELECT * FROM read_parquet('{root}/topic={topic}/*/*/*.parquet', hive_partitioning = true)
  QUALIFY row_number() OVER (PARTITION BY key_id, position ORDER BY revision DESC) = 1"""
AS_OF = """
WITH versions AS ({versions})
SELECT key_id, position, row->>'user_id' AS user_id, row->>'status' AS status
FROM versions
WHERE NOT is_retracted AND NOT is_deleted
  AND valid_from <= TIMESTAMPTZ '{when}' AND (valid_to IS NULL OR TIMESTAMPTZ '{when}' < valid_to)"""
# The README's point-in-time join, with a few clicks as a VALUES table.
JOIN = """
WITH versions AS ({versions}),
     clicks(message_id, user_id, "timestamp") AS (VALUES {clicks})
SELECT c.message_id, v.row->>'status' AS status_then
FROM clicks c LEFT JOIN versions v
  ON v.row->>'user_id' = c.user_id AND NOT v.is_retracted AND NOT v.is_deleted
 AND v.valid_from <= c.timestamp AND (v.valid_to IS NULL OR c.timestamp < v.valid_to)"""


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "+00"


async def test_history_topic_archived_and_queried_as_of_with_duckdb(settings, workers):
    settings = dataclasses.replace(settings, archive_interval_s=1, archive_topics=(HISTORY,))
    workers.settings = settings
    # Late events, duplicates, deletes and snapshot reads: re-cut versions and several
    # revisions per version, as the cdc_history worker writes them.
    rows, late = offline_history(change_records(1500, keys=60, seed=11), HistoryConfig(max_versions=1000))
    assert not late and len({r["key_id"] for r in rows}) > 30
    assert any(r["is_deleted"] for r in rows) and any(r["valid_to"] is not None for r in rows)
    await topics.ensure_topics(settings, (HISTORY, topics.dlq_topic(HISTORY)))
    topic = settings.topic(HISTORY)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                linger_ms=5)
    await producer.start()
    try:
        for r in rows:
            await producer.send(topic, key=r["key_id"].encode(), value=orjson.dumps(r))
        await producer.flush()
    finally:
        await producer.stop()

    workers.start("archive")
    store = ArchiveStore(settings.archive_root)
    await eventually(lambda: asyncio.to_thread(row_count, store, topic),
                     lambda n: n >= len(rows), timeout_s=60, what="every history row archived")
    assert final_files(store, topic), "no Parquet file"

    # Every row archived once, with its content (JSON text decoded, times as epoch ms).
    got = sorted(archived_rows(store, topic, HISTORY), key=lambda r: r["_offset"])
    assert [r["_offset"] for r in got] == list(range(len(rows)))
    assert [{k: v for k, v in r.items() if not k.startswith("_")} for r in got] == rows
    assert SCHEMAS[HISTORY].schema.field("row").type == "string"

    con = duckdb.connect()
    versions = VERSIONS.format(root=settings.archive_root, topic=topic)
    span = max(r["valid_from"] for r in rows) - T0_MS
    checked = 0
    for i in range(12):
        when = T0_MS + span * i // 10 + 137       # before the first change, inside, after the last
        pure = as_of(rows, when)
        sql = con.execute(AS_OF.format(versions=versions, when=iso(when))).fetchall()
        assert {(k, tuple(p)) for k, p, _, _ in sql} == {(k, tuple(v["position"])) for k, v in pure.items()}
        assert {k: s for k, _, _, s in sql} == {k: v["row"]["status"] for k, v in pure.items()}
        checked += len(sql)
    assert checked > 100

    # Point-in-time join: each click gets its user's status at the click's time.
    by_user = {}
    clicks = []
    for i, kid in enumerate(sorted({r["key_id"] for r in rows})[:20]):
        user = next(r["row"]["user_id"] for r in rows if r["key_id"] == kid and r["row"])
        when = T0_MS + span * (i % 7) // 6
        clicks.append(f"('m{i}', '{user}', TIMESTAMPTZ '{iso(when)}')")
        then = {v["row"]["user_id"]: v["row"]["status"] for v in as_of(rows, when).values()}
        by_user[f"m{i}"] = then.get(user)
    joined = dict(con.execute(JOIN.format(versions=versions, clicks=", ".join(clicks))).fetchall())
    assert joined == by_user and len(set(joined.values()) - {None}) >= 2
