"""`clickloop cdc resnapshot`'s Kafka side: where the table topics end before the new
snapshot, when Debezium says it completed, and the deletes it cannot show
(services/cdc/reconcile.py) written onto the table topics."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from services.cdc.reconcile import Cut, Current, gap_deletes
from services.cdc.snapshot import produce
from streams import topics
from streams.debezium import BadChangeEvent, ChangeEvent, decode

Ends = dict[TopicPartition, int]


async def _consumer(bootstrap: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    return consumer


async def ends(bootstrap: str, names: list[str]) -> Ends:
    """The next offset of every partition of the topics that exist (absent topics: none)."""
    consumer = await _consumer(bootstrap)
    try:
        tps = [tp for t in names for tp in await topics.partitions_of(consumer, t)]
        return dict(await consumer.end_offsets(tps)) if tps else {}
    finally:
        await consumer.stop()


async def batches(bootstrap: str, topic: str) -> AsyncIterator[list]:
    """The records of `topic` from its beginning to its end when called, a fetch at a time."""
    consumer = await _consumer(bootstrap)
    try:
        tps = await topics.partitions_of(consumer, topic)
        if not tps:
            return
        stop = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while any([await consumer.position(tp) < stop[tp] for tp in tps]):
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                yield [r for r in records if r.offset < stop[tp]]
    finally:
        await consumer.stop()


async def snapshot_done(bootstrap: str, notifications: str, since: Ends, timeout_s: float,
                        failed: Callable[[], str | None]) -> None:
    """Wait for Debezium's "Initial Snapshot" COMPLETED notification after `since` (one
    consumer, following the topic; Connect creates it with its first notification);
    raises RuntimeError when the snapshot is ABORTED or SKIPPED, when `failed()` names a
    failure, or on timeout."""
    deadline = time.monotonic() + timeout_s
    consumer = await _consumer(bootstrap)
    try:
        tps: list[TopicPartition] = []
        while True:
            if not tps and (tps := await topics.partitions_of(consumer, notifications)):
                consumer.assign(tps)
                for tp in tps:
                    consumer.seek(tp, since.get(tp, 0))
            for records in (await consumer.getmany(timeout_ms=500)).values() if tps else ():
                for record in records:
                    note = orjson.loads(record.value) if record.value else {}
                    if note.get("aggregate_type") != "Initial Snapshot":
                        continue
                    if note.get("type") == "COMPLETED":
                        return
                    if note.get("type") in ("ABORTED", "SKIPPED"):  # nothing to compare with
                        raise RuntimeError(f"Debezium did not take the new snapshot: {note}")
            why = failed()
            if why:
                raise RuntimeError(why)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no \"Initial Snapshot\" COMPLETED on {notifications} "
                                   f"within {timeout_s:.0f} s")
            if not tps:
                await asyncio.sleep(0.5)
    finally:
        await consumer.stop()


def _event(record) -> ChangeEvent | None:
    """The record's change event; None for a tombstone or a record that is not one (the
    history worker sent it to its dead letters: it is no row's last state either)."""
    try:
        return decode(record.key, record.value, record.headers or ())
    except BadChangeEvent:
        return None


async def reconcile(bootstrap: str, tables: list[str], marks: Ends,
                    fallback_cut: Callable[[], Cut], has_rows: Callable[[str], bool]) -> dict[str, int]:
    """Write the gap's deletes onto each table topic; how many keys each lost.

    `marks`: where the topics ended before the new snapshot. The snapshot's cut is the
    position and time of its reads (the same for all of them), else `fallback_cut()`
    (no table had a row to read). A table whose snapshot read nothing though it had
    current keys is asked `has_rows(topic)`: if the table still has rows, nothing is
    deleted and this raises (a snapshot that skipped a table must not empty it)."""
    found: dict[str, tuple[dict, set[str], dict | None]] = {}
    cut = None
    for topic in tables:
        fold, reads, source = Current(), set(), None
        async for records in batches(bootstrap, topic):
            for r in records:
                event = _event(r)
                if r.offset < marks.get(TopicPartition(r.topic, r.partition), 0):
                    fold.add(r.key, event)
                    if event is not None and source is None:
                        source = orjson.loads(r.value)["source"]
                elif event is not None and event.op == "r":
                    reads.add(event.key_id)  # type: ignore[arg-type]
                    cut = cut or Cut(event.position[1], event.ts_ms)
        found[topic] = (fold.held(), reads, source)
    cut = cut or fallback_cut()
    deleted: dict[str, int] = {}
    for topic, (held, reads, source) in found.items():
        if held and not reads and has_rows(topic):
            raise RuntimeError(f"the new snapshot read no row of {topic}'s table, which has "
                               "rows: no delete written")
        records = gap_deletes(held, reads, cut, source or {})
        if records:
            try:
                await produce(bootstrap, topic, records)
            except KafkaError as exc:
                raise RuntimeError(f"writing {len(records) // 2} deletes onto {topic}: {exc!r}") from exc
        deleted[topic] = len(records) // 2
    return deleted
