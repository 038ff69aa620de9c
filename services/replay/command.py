"""`clickloop replay`: plan (dry run by default), then re-feed a topic range.

Sources: the live topic (`--source live`, the default: by offset or by record
time) or the Parquet archive (`--source archive`, services/replay/archive.py:
by offset or by the archive's time column).

Targets:
- `topic:<name>`: copy the range, record for record (same partition, key and
  value), into a backfill topic that is created when missing;
- `processor:<name>`: rebuild that processor from its input. Its consumer group
  is moved to the start of the range (the input's retention start, or `--from`
  / `--from-offset`) and everything it wrote is reset first, so the rebuilt
  result equals a fresh run from that point on, not a double count: its state
  changelog is recreated empty, its output topics truncated, and the
  processors downstream of those outputs (and their Redis keys) are reset the
  same way. Each reset group resumes the replayed topic at the range's start,
  a truncated output at its new beginning and any other input at `--from`.
  There is no end: the processor goes on with its live input, so `--to` and
  `--to-offset` are refused; nor is a processor rebuilt from the archive
  (`refuse_archive_processor` says why and what to run instead).
Refuses to touch a processor whose consumer group has active members.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from services.replay.archive import ArchiveSource
from services.replay.plan import (AT_TIME, BEGINNING, START_OF_RANGE, GroupStart, PartitionRange,
                                  Plan, ReplayError, check_processor_range, parse_time, ranges,
                                  refuse_archive_processor, refuse_if_active, start_rule)
from services.replay.sink import TopicSink
from services.settings import Settings
from streams import topics


@dataclass(frozen=True, slots=True)
class Owned:
    """What a processor reads and writes: what a rebuild must reset."""

    inputs: tuple[str, ...]
    state: tuple[str, ...] = ()          # changelog topics (recreated empty)
    outputs: tuple[str, ...] = ()        # topics it writes (truncated)
    redis: tuple[str, ...] = ()          # key patterns it writes (deleted)


PROCESSORS = {
    "sessionize": Owned(inputs=(topics.CLICKS,), state=(topics.SESSIONIZE_STATE,),
                        outputs=(topics.SESSIONS, topics.CLICKS_LATE)),
    # features: FEATURES_ITEMS is its own repartition topic (written by the users
    # agent, read by the items agent): truncated like an output, its state recreated.
    "features": Owned(inputs=(topics.CLICKS, topics.SESSIONS), state=(topics.FEATURES_STATE,),
                      outputs=(topics.FEATURES_ITEMS,),
                      redis=("user:*", "item:*", "popular:*")),
    # cdc_history: its inputs (cdc.<server>.<schema>.<table>) and outputs (history.<table>,
    # <input>.dlq) are per captured table, found at run time (CLICKLOOP_CDC_TOPICS), so
    # only its state is named here.
    "cdc_history": Owned(inputs=(), state=(topics.CDC_HISTORY_STATE,)),
    "attribution": Owned(inputs=(topics.EXPOSURES, topics.CLICKS), state=(topics.ATTRIBUTION_STATE,),
                         outputs=(topics.REWARDS, topics.EXPOSURES_DLQ)),
    "bandits": Owned(inputs=(topics.REWARDS,), state=(topics.BANDITS_STATE,),
                     outputs=(topics.BANDIT_POSTERIORS, topics.REWARDS_DLQ)),
}


def downstream(processor: str) -> list[str]:
    """The processor and, transitively, every processor reading what it writes."""
    order, todo = [], [processor]
    while todo:
        name = todo.pop(0)
        if name in order:
            continue
        order.append(name)
        outputs = PROCESSORS[name].outputs
        todo += [p for p, owned in PROCESSORS.items() if set(owned.inputs) & set(outputs)]
    return order


ARCHIVER = "archive"     # the archive worker (streams/archive.py): its group commits archived offsets


async def _offsets(settings: Settings, topic: str, from_: str | None, to: str | None,
                   from_offset: int | None, to_offset: int | None,
                   partitions: set[int] | None) -> tuple[PartitionRange, ...]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                isolation_level="read_committed")
    await consumer.start()
    try:
        tps = await topics.partitions_of(consumer, topic)
        if not tps:
            raise ReplayError(f"topic {topic} does not exist on {settings.kafka_bootstrap}")
        begins = {tp.partition: o for tp, o in (await consumer.beginning_offsets(tps)).items()}
        ends = {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}

        async def at(text: str | None, explicit: int | None) -> dict[int, int | None]:
            if text is None:
                return {p: explicit for p in ends}
            found = await consumer.offsets_for_times({tp: parse_time(text) for tp in tps})
            return {tp.partition: (ends[tp.partition] if o is None else o.offset)
                    for tp, o in found.items()}

        return ranges(begins, ends, await at(from_, from_offset), await at(to, to_offset),
                      partitions)
    finally:
        await consumer.stop()


async def _active_members(admin: AIOKafkaAdminClient, group: str) -> int:
    described = await admin.describe_consumer_groups([group])
    # groups: (error_code, group, state, protocol_type, protocol, members)
    return sum(len(g[5]) for response in described for g in response.groups)


def target_of(text: str) -> tuple[str, str]:
    kind, _, name = text.partition(":")
    if kind not in ("topic", "processor") or not name:
        raise ReplayError(f"--target {text!r}: use topic:<name> or processor:<name>")
    if kind == "processor" and name not in PROCESSORS:
        raise ReplayError(f"unknown processor {name!r}; choose {', '.join(PROCESSORS)}")
    return kind, name


def partitions_of(args) -> set[int] | None:
    return {int(p) for p in args.partitions.split(",")} if args.partitions else None


async def plan(settings: Settings, args) -> Plan:
    """The plan of a replay from the live topic."""
    topic = settings.topic(args.topic)
    parts = partitions_of(args)
    kind, name = target_of(args.target)
    if kind == "processor":
        if args.topic not in PROCESSORS[name].inputs:
            raise ReplayError(f"{name} does not read {args.topic}")
        check_processor_range(args.to_time, args.to_offset, parts)
    rngs = await _offsets(settings, topic, args.from_time, args.to_time,
                          args.from_offset, args.to_offset, parts)
    if kind == "topic":
        return Plan(topic=topic, source=args.source, target=args.target, ranges=rngs)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        for proc in downstream(name):
            refuse_if_active(topics.group_id(settings, proc),
                             await _active_members(admin, topics.group_id(settings, proc)), proc)
    finally:
        await admin.close()
    truncated = {t for proc in downstream(name) for t in PROCESSORS[proc].outputs}
    starts: list[GroupStart] = []
    resets: list[str] = []
    for proc in downstream(name):
        owned = PROCESSORS[proc]
        for t in owned.inputs:
            rule = start_rule(t, args.topic, truncated, args.from_time, args.from_offset, proc)
            offsets: tuple[tuple[int, int], ...] = ()
            if rule == START_OF_RANGE:
                offsets = tuple((r.partition, r.start) for r in rngs)
            elif rule == AT_TIME:
                at = await _offsets(settings, settings.topic(t), args.from_time, None, None, None, None)
                offsets = tuple((r.partition, r.start) for r in at)
            starts.append(GroupStart(proc, topics.group_id(settings, proc), settings.topic(t), rule, offsets))
        resets += [f"state changelog {settings.topic(t)}: recreated empty" for t in owned.state]
        resets += [f"output topic {settings.topic(t)}: truncated" for t in owned.outputs]
        resets += [f"Redis keys {settings.redis_key(k)}: deleted" for k in owned.redis]
    return Plan(topic=topic, source=args.source, target=args.target, ranges=rngs,
                resets=tuple(resets), starts=tuple(starts))


async def _reset_processor(settings: Settings, proc: str, starts: list[GroupStart]) -> None:
    owned = PROCESSORS[proc]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        if owned.state:
            names = [settings.topic(t) for t in owned.state]
            await admin.delete_topics(names)
            for _ in range(100):  # deletion is asynchronous on the broker
                if not set(names) & set(await admin.list_topics()):
                    break
                await asyncio.sleep(0.1)
            await topics.ensure_topics(settings, owned.state)
        if owned.outputs:
            consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None)
            await consumer.start()
            try:
                tps = [tp for t in owned.outputs for tp in await topics.partitions_of(consumer, settings.topic(t))]
                ends = await consumer.end_offsets(tps)
            finally:
                await consumer.stop()
            await admin.delete_records({tp: RecordsToDelete(before_offset=o)
                                        for tp, o in ends.items() if o})
    finally:
        await admin.close()
    # Move the group to where each input starts (the group is empty: checked).
    group = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             group_id=topics.group_id(settings, proc), enable_auto_commit=False)
    await group.start()
    try:
        positions: dict[TopicPartition, int] = {}
        for start in starts:
            tps = await topics.partitions_of(group, start.topic)
            if start.rule == BEGINNING:     # truncated just now: its new beginning
                positions.update(await group.beginning_offsets(tps))
            else:
                positions.update({TopicPartition(start.topic, p): o for p, o in start.offsets})
        group.assign(list(positions))   # manual assignment: commits as a simple consumer of an empty group
        await group.commit(positions)
    finally:
        await group.stop()
    if owned.redis:
        redis = aioredis.Redis.from_url(settings.redis_url)
        try:
            for pattern in owned.redis:
                batch = []
                async for key in redis.scan_iter(match=settings.redis_key(pattern), count=1000):
                    batch.append(key)
                    if len(batch) >= 1000:
                        await redis.unlink(*batch)
                        batch = []
                if batch:
                    await redis.unlink(*batch)
        finally:
            await redis.aclose()


async def _copy_live(settings: Settings, plan_: Plan, sink: TopicSink) -> None:
    """Copy the planned range, record for record, into `sink`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                isolation_level="read_committed", enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        live = [r for r in plan_.ranges if r.records]
        consumer.assign([TopicPartition(plan_.topic, r.partition) for r in live])
        for r in live:
            consumer.seek(TopicPartition(plan_.topic, r.partition), r.start)
        remaining = {r.partition: r.end for r in live}
        while remaining:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for tp, records in batches.items():
                end = remaining.get(tp.partition)
                if end is None:
                    continue
                for record in records:
                    if record.offset >= end:
                        break
                    await sink.send(tp.partition, record.key, record.value)
                if await consumer.position(tp) >= end:
                    remaining.pop(tp.partition, None)
                    consumer.pause(tp)
    finally:
        await consumer.stop()


def _range_args(args) -> str:
    """The range options of the command line, to suggest another command with them."""
    pairs = [("--from", args.from_time), ("--to", args.to_time), ("--from-offset", args.from_offset),
             ("--to-offset", args.to_offset), ("--partitions", args.partitions)]
    return "".join(f" {flag} {value}" for flag, value in pairs if value is not None)


async def run(settings: Settings, args) -> int:
    started = time.monotonic()
    kind, name = target_of(args.target)
    source: ArchiveSource | None = None
    if args.source == "archive":
        if kind == "processor":
            refuse_archive_processor(args.topic, name, _range_args(args), settings.prefix)
        committed = await topics.committed_offsets(settings, topics.group_id(settings, ARCHIVER),
                                                   settings.topic(args.topic))
        source = await ArchiveSource.open(settings, args, partitions_of(args), committed)
        plan_ = await source.plan(args.target)
    else:
        plan_ = await plan(settings, args)
    print(plan_.render(args.execute), flush=True)
    if not args.execute:
        return 0
    if kind == "topic":
        dest = settings.topic(name)
        if not plan_.records:
            print(f"nothing to replay into {dest}")
            return 0
        needed = max(r.partition for r in plan_.ranges) + 1
        async with TopicSink(settings, dest, needed, plan_.records, f"replay {plan_.topic}",
                             args.rate) as sink:
            events = await (source.copy(sink) if source else _copy_live(settings, plan_, sink))
        elapsed = time.monotonic() - started
        counted = "" if events is None else f" ({events} events, {events / max(elapsed, 1e-9):,.0f}/s)"
        print(f"replayed {sink.sent} records{counted} into {dest} in {elapsed:.2f} s, plan included "
              f"({sink.sent / max(elapsed, 1e-9):,.0f} records/s)")
        return 0
    for proc in downstream(name):
        await _reset_processor(settings, proc, [s for s in plan_.starts if s.processor == proc])
    workers = " and ".join(f"`clickloop worker {p}`" for p in downstream(name))
    print(f"reset {', '.join(downstream(name))}; start {workers} to rebuild from "
          f"{plan_.records} input records")
    return 0
