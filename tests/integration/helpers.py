"""Reading topics and polling in integration tests (real broker, real Redis)."""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from streams.sessions import PartitionSessions

T = TypeVar("T")
R = TypeVar("R")


async def consume(bootstrap: str, topic: str, until: Callable[[list[R]], bool],
                  convert: Callable[[ConsumerRecord], R], timeout_s: float = 60) -> list[R]:
    """Every committed record of `topic` from the start, converted, until `until(got)` holds.

    Reads committed records only, as every consumer of clickloop's transactional
    outputs must."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None,
                                isolation_level="read_committed")
    await consumer.start()
    got: list[R] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(got):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: condition not met in {timeout_s} s; got {got}")
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                got.extend(convert(r) for r in records)
    finally:
        await consumer.stop()
    return got


async def read_topic(bootstrap: str, topic: str, until: Callable[[list[dict]], bool],
                     timeout_s: float = 60) -> list[dict]:
    """JSON values of `topic` from the start, until `until(values)` holds."""
    return await consume(bootstrap, topic, until, lambda r: orjson.loads(r.value), timeout_s)


async def read_records(bootstrap: str, topic: str,
                       until: Callable[[list[tuple[bytes | None, bytes | None]]], bool],
                       timeout_s: float = 60) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every record of `topic` from the start, tombstones (value None)
    included, until `until(records)` holds."""
    return await consume(bootstrap, topic, until, lambda r: (r.key, r.value), timeout_s)


async def eventually(probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool],
                     timeout_s: float = 30, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met in {timeout_s} s; last value {value!r}")
        await asyncio.sleep(0.2)


def offline_sessions(records, cfg) -> list[dict]:
    """The sessions a single uninterrupted run produces: the pure core, partition by partition."""
    parts: dict[int, PartitionSessions] = {}
    closed, offsets = [], {}
    for partition, _, value in records:
        offset = offsets.get(partition, 0)
        offsets[partition] = offset + 1
        part = parts.setdefault(partition, PartitionSessions(cfg))
        closed += part.process_record(value, offset + 1).closed
    return closed


def debezium_changes(changes, table: str = "subscriptions", lsn0: int = 40_000_000) -> list[tuple]:
    """Kafka records (key, value, headers) of Debezium PostgreSQL change events, as a
    connector with `schemas.enable=false` writes them, for `changes`: (op, id, row, ts_ms)
    with op c/u/r (row: the new image) or d (row ignored; `before` is the last image,
    a tombstone follows). Positions increase in list order."""
    last: dict = {}
    out: list[tuple] = []
    for i, (op, pk, row, ts_ms) in enumerate(changes):
        lsn = lsn0 + 64 * (i + 1)
        before, after = (last.get(pk), None) if op == "d" else (last.get(pk) if op == "u" else None, row)
        source = {"version": "3.6.1.Final", "connector": "postgresql", "name": "it", "ts_ms": ts_ms,
                  "snapshot": "true" if op == "r" else "false", "db": "it",
                  "sequence": f'[null,"{lsn}"]' if op == "r" else f'["{lsn - 8}","{lsn}"]',
                  "schema": "public", "table": table, "txId": lsn // 16, "lsn": lsn, "xmin": None}
        key = orjson.dumps({"id": pk})
        out.append((key, orjson.dumps({"before": before, "after": after, "source": source, "op": op,
                                       "ts_ms": ts_ms + 5, "transaction": None}), []))
        if op == "d":
            last.pop(pk, None)
            out.append((key, None, []))
        else:
            last[pk] = row
    return out
