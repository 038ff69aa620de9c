"""`clickloop cdc resnapshot`'s Kafka side: where the table topics end before the new
snapshot, when Debezium says it completed, and the deletes it cannot show
(services/cdc/reconcile.py) written onto the table topics."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from services.cdc.reconcile import Cut, current, gap_deletes
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


async def read(bootstrap: str, topic: str, start: Ends, stop: Ends | None = None) -> list:
    """The records of `topic` from `start` (a partition not in it: from its beginning) up to
    `stop` (default: its end now)."""
    consumer = await _consumer(bootstrap)
    try:
        tps = await topics.partitions_of(consumer, topic)
        if not tps:
            return []
        stop = stop if stop is not None else dict(await consumer.end_offsets(tps))
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start.get(tp, 0))
        out = []
        while any([await consumer.position(tp) < stop.get(tp, 0) for tp in tps]):
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                out.extend(r for r in records if r.offset < stop.get(tp, 0))
        return out
    finally:
        await consumer.stop()


async def snapshot_done(bootstrap: str, notifications: str, since: Ends, timeout_s: float,
                        failed: Callable[[], str | None]) -> None:
    """Wait for Debezium's "Initial Snapshot" COMPLETED notification after `since`; raises
    RuntimeError when it reports ABORTED, when `failed()` names a failure, or on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        for record in await read(bootstrap, notifications, since):
            note = orjson.loads(record.value) if record.value else {}
            if note.get("aggregate_type") != "Initial Snapshot":
                continue
            if note.get("type") in ("COMPLETED", "SKIPPED"):
                return
            if note.get("type") == "ABORTED":
                raise RuntimeError(f"Debezium aborted the new snapshot: {note}")
        why = failed()
        if why:
            raise RuntimeError(why)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no \"Initial Snapshot\" COMPLETED on {notifications} "
                               f"within {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


def _event(record) -> ChangeEvent | None:
    """The record's change event; None for a tombstone or a record that is not one (the
    history worker sent it to its dead letters: it is no row's last state either)."""
    try:
        return decode(record.key, record.value, record.headers or ())
    except BadChangeEvent:
        return None


def _split(records: list, marks: Ends) -> tuple[list, list]:
    before, after = [], []
    for r in records:
        (before if r.offset < marks.get(TopicPartition(r.topic, r.partition), 0) else after).append(r)
    return before, after


async def reconcile(bootstrap: str, tables: list[str], marks: Ends,
                    fallback_cut: Callable[[], Cut]) -> dict[str, int]:
    """Write the gap's deletes onto each table topic; how many keys each lost.

    `marks`: where the topics ended before the new snapshot. The snapshot's cut is the
    position and time of its reads (the same for all of them), else `fallback_cut()`
    (no table had a row to read)."""
    read_all = {t: _split(await read(bootstrap, t, {}), marks) for t in tables}
    cut = None
    for _, after in read_all.values():
        for r in after:
            event = _event(r)
            if event is not None and event.op == "r":
                cut = Cut(event.position[1], event.ts_ms)
                break
        if cut is not None:
            break
    cut = cut or fallback_cut()
    deleted: dict[str, int] = {}
    for topic, (before, after) in read_all.items():
        if not before:
            deleted[topic] = 0
            continue
        held = current((r.key, _event(r)) for r in before)
        reads = {e.key_id for e in map(_event, after) if e is not None and e.op == "r"}
        sample = next((r for r in reversed(before) if _event(r) is not None), None)
        if sample is None:
            deleted[topic] = 0
            continue
        records = gap_deletes(held, reads, cut, orjson.loads(sample.value)["source"])
        if records:
            try:
                await produce(bootstrap, topic, records)
            except KafkaError as exc:
                raise RuntimeError(f"writing {len(records) // 2} deletes onto {topic}: {exc!r}") from exc
        deleted[topic] = len(records) // 2
    return deleted
