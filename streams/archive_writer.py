"""The archive's writers: one flush's raw Kafka records → durable temporary Parquet files.

They run in child processes of the worker (`Writer`, one per core, at most 2),
so that decoding JSON and building Arrow columns, which hold the GIL, neither
compete with Faust's event loop nor with each other; flushes of different
partitions run in parallel. The parent keeps what must happen in order — dead
letters, the renames, the acks — and only sends record bytes and offsets here.

Measured with bench/archive_throughput.py (1 M events, 4 partitions): all in
the worker's process (a thread) 69k events/s; one writer process 67k; two 83k;
two with 50k-row flushes instead of 200k 122k — minor page faults on freshly
touched memory were then most of the writers' CPU time (system > user), and
smaller flushes reuse memory that is already mapped.

A writer gets SIGKILL when the worker dies (Linux `PR_SET_PDEATHSIG`), and its
temporary files carry a token of their own, so a writer outliving a killed
worker could at worst leave a temporary file, which the next recovery deletes.
"""
from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import orjson

from schemas.archive import SCHEMAS, ArchiveSchema
from streams.archive_layout import FileRange
from streams.archive_store import ArchiveStore, Written
from streams.archive_table import BadRow, Columns, split_by_hour
from streams.codec import BadRecord, decode_clicks


@dataclass(frozen=True)
class Job:
    """One flush of one partition: its records [range.first, range.last], undecoded."""

    uri: str
    topic: str              # Kafka topic name (with the prefix): the folder
    logical: str            # its schema in schemas/archive.py
    range: FileRange
    time_field: str
    values: list            # record values (bytes or None), in offset order
    offsets: list[int]
    record_times: list[int]  # epoch ms


@dataclass(frozen=True)
class Done:
    written: list[Written]  # durable under temporary names, to publish
    dead: list[BadRow]      # records or rows that did not fit: (offset, index, reason, bytes)
    rows: int


def decode(spec: ArchiveSchema, value: bytes | None) -> list:
    """The rows of one record: the events of an envelope, or the one object of a plain record."""
    if spec.envelope:
        return decode_clicks(value)
    if value is None:
        raise BadRecord("empty record (a tombstone) on a topic of JSON objects")
    try:
        return [orjson.loads(value)]
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON: {exc}") from None


_stores: dict[str, ArchiveStore] = {}


def write(job: Job) -> Done:
    """Blocking: decode, build the tables, write one durable temporary file per hour."""
    store = _stores.get(job.uri) or _stores.setdefault(job.uri, ArchiveStore(job.uri))
    spec = SCHEMAS[job.logical]
    columns = Columns(spec, job.range.partition)
    dead: list[BadRow] = []
    for value, offset, record_ms in zip(job.values, job.offsets, job.record_times):
        try:
            rows = decode(spec, value)
        except BadRecord as exc:
            dead.append((offset, None, str(exc), value))
            continue
        dead.extend(columns.add(rows, offset, record_ms))
    table, bad = columns.to_table()
    token = uuid.uuid4().hex[:12]
    written = [store.write(job.topic, hour, job.range, part, token)
               for hour, part in split_by_hour(table, job.time_field)]
    return Done(written, dead + bad, table.num_rows)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass    # not Linux: the child then exits when its pipe to the parent closes


class Writer:
    """A pool of writer processes running `write`; `await writer(job)`."""

    def __init__(self, processes: int = min(2, os.cpu_count() or 1)) -> None:
        self._pool = ProcessPoolExecutor(max_workers=processes, initializer=_die_with_parent,
                                         mp_context=multiprocessing.get_context("spawn"))

    async def __call__(self, job: Job) -> Done:
        return await asyncio.get_running_loop().run_in_executor(self._pool, write, job)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
