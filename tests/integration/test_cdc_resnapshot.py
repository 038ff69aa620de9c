"""`clickloop cdc resnapshot`'s Kafka side on the real broker, with Debezium's records written
by the test (the whole command against real Debezium: test_cdc_postgres.py): which keys get
the deletes a snapshot cannot show, and the refusal to empty a table a snapshot skipped."""
from __future__ import annotations

import dataclasses

import orjson
import pytest

from services.cdc import resnapshot as io
from services.cdc.reconcile import MARK, Cut
from services.cdc.snapshot import produce
from streams import topics
from streams.debezium import decode
from tests.unit.test_cdc_reconcile import record

pytestmark = pytest.mark.integration


@pytest.fixture
async def table(settings):
    """A table topic of 3 partitions holding rows 1-4 before the new snapshot (4 deleted)."""
    settings = dataclasses.replace(settings, partitions=3)
    name = topics.cdc_topic("app", "public", "subscriptions")
    await topics.ensure_topics(settings, (name,))
    topic = settings.topic(name)
    await produce(settings.kafka_bootstrap, topic, [
        record(1, "r", 100), record(2, "r", 100), record(3, "r", 100), record(4, "r", 100),
        record(2, "u", 200, commit=210, plan="pro"), record(4, "d", 220, commit=230),
        record(4, None, 0)])
    return settings, topic


async def everything(settings, topic: str) -> list:
    return [r async for batch in io.batches(settings.kafka_bootstrap, topic) for r in batch]


async def test_keys_current_before_and_not_read_by_the_new_snapshot_are_deleted(table):
    settings, topic = table
    marks = await io.ends(settings.kafka_bootstrap, [topic])
    # The new snapshot reads rows 2 and 3 (row 1 went in the gap), then a stream event.
    await produce(settings.kafka_bootstrap, topic, [
        record(2, "r", 900, ts=8_000, plan="pro"), record(3, "r", 900, ts=8_000),
        record(3, "u", 950, commit=960, ts=8_500, plan="gold")])
    deleted = await io.reconcile(settings.kafka_bootstrap, [topic], marks,
                                 fallback_cut=lambda: pytest.fail("the reads give the cut"),
                                 has_rows=lambda t: pytest.fail("the snapshot read rows"))
    assert deleted == {topic: 1}
    ops = {}
    for r in await everything(settings, topic):  # a key's records are in order on its partition
        event = decode(r.key, r.value)
        ops.setdefault(r.key, []).append(event.op if event else None)
    assert ops == {b'{"id":1}': ["r", "d", None], b'{"id":2}': ["r", "u", "r"],
                   b'{"id":3}': ["r", "r", "u"], b'{"id":4}': ["r", "d", None]}
    (delete,) = [e for r in await everything(settings, topic)
                 if (e := decode(r.key, r.value)) and e.op == "d" and e.key_id == "1"]
    assert (delete.position, delete.ts_ms) == ((900, 900), 8_000)
    assert delete.before == {"id": 1, "plan": "basic"}
    # Again: everything current was read this time, nothing more to delete.
    marks = await io.ends(settings.kafka_bootstrap, [topic])
    await produce(settings.kafka_bootstrap, topic, [record(2, "r", 990), record(3, "r", 990)])
    assert await io.reconcile(settings.kafka_bootstrap, [topic], marks, lambda: Cut(0, 0),
                              lambda t: True) == {topic: 0}


async def test_a_snapshot_that_read_nothing_of_a_table_with_rows_deletes_nothing(table):
    settings, topic = table
    marks = await io.ends(settings.kafka_bootstrap, [topic])
    before = len(await everything(settings, topic))
    with pytest.raises(RuntimeError, match="read no row of .* which has rows"):
        await io.reconcile(settings.kafka_bootstrap, [topic], marks, lambda: Cut(1_000, 9_000),
                           has_rows=lambda t: True)
    assert len(await everything(settings, topic)) == before


async def test_an_emptied_table_loses_every_current_key_at_the_slots_point(table):
    settings, topic = table
    marks = await io.ends(settings.kafka_bootstrap, [topic])
    deleted = await io.reconcile(settings.kafka_bootstrap, [topic], marks, lambda: Cut(1_000, 9_000),
                                 has_rows=lambda t: False)
    assert deleted == {topic: 3}
    events = [decode(r.key, r.value) for r in await everything(settings, topic)]
    deletes = sorted((e.key_id, e.position, e.ts_ms) for e in events
                     if e and e.op == "d" and e.position == (1_000, 1_000))
    assert deletes == [("1", (1_000, 1_000), 9_000), ("2", (1_000, 1_000), 9_000),
                       ("3", (1_000, 1_000), 9_000)]
    assert all(e.before["id"] == int(e.key_id) for e in events if e and e.op == "d")
    assert {orjson.loads(r.value)["source"].get("clickloop") for r in await everything(settings, topic)
            if r.value and orjson.loads(r.value)["op"] == "d"} == {MARK, None}
