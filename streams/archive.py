"""Faust agent `archive`: topics → Parquet files, exactly once (`clickloop worker archive`).

A thin loop over pure parts: `streams.archive_layout` (names, hour folders,
recovery plan, flush policy), `streams.archive_table` (records → Arrow tables
per hour), the writer processes `streams.archive_writer` and the filesystem
shell `streams.archive_store`.

Per (topic, partition) the agent buffers raw records; a *flush* (enough rows
or bytes, or the oldest record waited `CLICKLOOP_ARCHIVE_INTERVAL_S`) cuts the
buffer — a contiguous offset range [first, last] — and, in the writer process
(streams/archive_writer.py), decodes it and writes one
file per event-time hour under a temporary name and makes it durable; then bad
rows go to `<topic>.dlq`, the files are renamed into place, and only then are
the range's records acked, so Faust commits their offsets only once they are
archived. One flush per partition is in flight at a time; the agent goes on
buffering meanwhile.

The first record of a partition after a (re)start or a rebalance triggers
recovery (`plan_recovery`): files of flushes that were never committed and
temporary leftovers are deleted (their records are redelivered and written
again), and redelivered records that complete files already hold are skipped.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.archive import RECORD_TIME, SCHEMAS, ArchiveSchema
from services.settings import Settings
from streams.app import now
from streams.archive_layout import FileRange, FlushPolicy, parse_time_rules, plan_recovery, time_field
from streams.archive_store import ArchiveStore
from streams.archive_table import check_time_field
from streams.archive_writer import Done, Job, Writer
from streams.dlq import dlq_record
from streams.meter import Meter

log = logging.getLogger("clickloop.archive")
PROCESSOR = "archive"


@dataclass
class Unit:
    """One flush: a partition's records [first, last], undecoded, and their events to ack."""

    job: Job
    keys: dict[int, bytes | None]      # offset -> record key (for dead letters)
    acks: list


@dataclass
class Sink:
    """The buffer of one (topic, partition) and its flush in flight."""

    topic: str
    logical: str
    partition: int
    time_field: str
    envelope: bool
    archived_through: int
    values: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    record_times: list = field(default_factory=list)
    keys: dict = field(default_factory=dict)
    acks: list = field(default_factory=list)
    nbytes: int = 0
    rows: int = 0
    opened: float = 0.0
    flushing: asyncio.Task | None = None

    def add(self, offset: int, record_ms: int, key: bytes | None, value: bytes | None, event) -> None:
        if not self.acks:
            self.opened = now()
        self.acks.append(event)
        self.values.append(value)
        self.offsets.append(offset)
        self.record_times.append(record_ms)
        self.keys[offset] = key
        if value:
            self.nbytes += len(value)
            # Events of an envelope, counted without decoding (the writer process
            # decodes): an estimate for rotation only.
            self.rows += value.count(b'"message_id"') if self.envelope else 1

    def cut(self, uri: str) -> Unit | None:
        if not self.acks:
            return None
        job = Job(uri, self.topic, self.logical,
                  FileRange(self.partition, self.offsets[0], self.offsets[-1]),
                  self.time_field, self.values, self.offsets, self.record_times)
        unit = Unit(job, self.keys, self.acks)
        self.values, self.offsets, self.record_times, self.keys, self.acks = [], [], [], {}, []
        self.nbytes = self.rows = 0
        return unit


def _at(reason: str, index: int | None) -> str:
    return reason if index is None else f"event {index}: {reason}"


class Positions:
    """The group's committed offsets (admin API), else the partition's beginning."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self.bootstrap, self.group = bootstrap, group
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def committed(self, topic: str, partition: int) -> int:
        tp = TopicPartition(topic, partition)
        if self._admin is None:
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await self._admin.start()
        offsets = await self._admin.list_consumer_group_offsets(self.group, partitions=[tp])
        meta = offsets.get(tp)
        if meta is not None and meta.offset >= 0:
            return meta.offset
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                              enable_auto_commit=False)
            await self._consumer.start()
        return (await self._consumer.beginning_offsets([tp]))[tp]

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()
        if self._consumer is not None:
            await self._consumer.stop()


def _time_fields(settings: Settings) -> dict[str, tuple[ArchiveSchema, str]]:
    """logical topic -> (schema, time column), or exit naming what to fix."""
    rules = parse_time_rules(settings.archive_time)
    out = {}
    for logical in settings.archive_topics:
        spec = SCHEMAS.get(logical)
        if spec is None:
            raise SystemExit(f"CLICKLOOP_ARCHIVE_TOPICS: {logical!r} has no archive schema "
                             f"(schemas/archive.py knows {', '.join(SCHEMAS)})")
        column = time_field(rules, logical, spec.event_time, RECORD_TIME)
        try:
            check_time_field(spec, column)
        except ValueError as exc:
            raise SystemExit(f"CLICKLOOP_ARCHIVE_TIME={settings.archive_time!r}: {exc}") from None
        out[logical] = (spec, column)
    return out


def build(app: faust.App, settings: Settings, meter: Meter) -> None:
    specs = _time_fields(settings)
    logical_of = {settings.topic(logical): logical for logical in specs}
    source = app.topic(*logical_of, key_serializer="raw", value_serializer="raw")
    store = ArchiveStore(settings.archive_root)
    policy = FlushPolicy(settings.archive_max_rows, settings.archive_max_bytes,
                         settings.archive_interval_s * 1000)
    positions = Positions(settings.kafka_bootstrap, app.conf.id)
    sinks: dict[tuple[str, int], Sink] = {}
    lock = asyncio.Lock()   # an agent step, a timer flush and a revocation exclude each other
    dlq: list[AIOKafkaProducer] = []
    writer = Writer()

    async def send_dead(unit: Unit, done: Done) -> None:
        dead = [(offset, unit.keys.get(offset), row, _at(reason, index))
                for offset, index, reason, row in done.dead]
        if not dead:
            return
        if not dlq:
            producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                        enable_idempotence=True)
            await producer.start()
            dlq.append(producer)
        job = unit.job
        topic = settings.topic(f"{job.logical}.dlq")
        sends = [await dlq[0].send(topic, key=key, value=dlq_record(
            job.topic, job.range.partition, offset, reason, key, value, PROCESSOR))
            for offset, key, value, reason in dead]
        await asyncio.gather(*sends)

    async def flush(unit: Unit) -> None:
        job = unit.job
        try:
            done = await writer(job)
            # Dead letters before the rename: a crash in between sends them again
            # (at least once), but never loses one.
            await send_dead(unit, done)
            await asyncio.to_thread(store.publish, done.written)
        except BaseException as exc:  # noqa: BLE001 (nothing is acked: a restart redoes it)
            log.critical("archive flush of %s[%d] %d-%d failed (%r): exiting so that a restart "
                         "recovers", job.topic, job.range.partition, job.range.first,
                         job.range.last, exc)
            os._exit(70)
        for event in unit.acks:
            event.ack()
        meter.update(done.rows, now())

    async def start_flush(sink: Sink) -> None:
        if sink.flushing is not None:
            await sink.flushing    # one flush per partition at a time, in offset order
            sink.flushing = None
        unit = sink.cut(store.uri)
        if unit is not None:
            sink.flushing = asyncio.ensure_future(flush(unit))

    async def open_sink(tp) -> Sink | None:
        if tp not in app.consumer.assignment():
            return None     # a record of a partition revoked meanwhile
        topic, partition = tp.topic, tp.partition
        logical = logical_of[topic]
        spec, column = specs[logical]
        committed = await positions.committed(topic, partition)
        paths = await asyncio.to_thread(store.list_topic, topic)
        plan = plan_recovery(partition, paths, committed)
        if plan.delete:
            await asyncio.to_thread(store.delete, plan.delete)
        print(f"[{PROCESSOR}] {topic}[{partition}]: committed offset {committed}, archived "
              f"through {plan.archived_through}, deleted {len(plan.delete)} uncommitted or "
              f"temporary file(s)", flush=True)
        sink = sinks[(topic, partition)] = Sink(topic, logical, partition, column, spec.envelope,
                                                plan.archived_through)
        return sink

    @app.agent(source, name=PROCESSOR)
    async def archive(stream):
        async for event in stream.noack().events():
            msg = event.message
            async with lock:
                if meter.first is None:
                    meter.first = now()
                sink = sinks.get((msg.topic, msg.partition))
                if sink is None:
                    sink = await open_sink(msg.tp)
                    if sink is None:
                        continue
                if msg.offset <= sink.archived_through:
                    event.ack()     # already in a complete file
                    continue
                sink.add(msg.offset, round(msg.timestamp * 1000), event.key, event.value, event)
                if policy.full(sink.rows, sink.nbytes):
                    await start_flush(sink)

    @app.timer(min(1.0, settings.archive_interval_s / 2))
    async def rotate() -> None:
        async with lock:
            t = now()
            for sink in sinks.values():
                if (sink.flushing is None or sink.flushing.done()) and policy.due(
                        sink.rows, sink.nbytes, len(sink.acks), (t - sink.opened) * 1000):
                    await start_flush(sink)

    @app.on_partitions_revoked.connect
    async def on_revoked(app, revoked, **kwargs) -> None:  # noqa: ARG001 (signal signature)
        # Wait for flushes in flight (they ack before Faust's revocation commit);
        # what is only buffered is dropped unacked: the next owner reads it again.
        async with lock:
            for tp in revoked:
                sink = sinks.pop((tp.topic, tp.partition), None)
                if sink is not None and sink.flushing is not None:
                    await sink.flushing

    @app.on_before_shutdown.connect
    async def on_shutdown(app, **kwargs) -> None:  # noqa: ARG001
        for sink in list(sinks.values()):
            if sink.flushing is not None:
                await sink.flushing
        writer.close()
        if dlq:
            await dlq[0].stop()
        await positions.close()
