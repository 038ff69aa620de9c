"""`clickloop replay`: plan (dry run by default), then re-feed a topic range.

Targets:
- `topic:<name>`: copy the range, record for record (same partition, key and
  value), into a backfill topic that is created when missing;
- `processor:<name>`: rebuild that processor from its input. Its consumer group
  is moved to the start of the range and everything it wrote is reset first,
  so the rebuilt result equals a fresh run, not a double count: its state
  changelog is recreated empty, its output topics truncated, and the
  processors downstream of those outputs (and their Redis keys) are reset the
  same way. A processor's state at an arbitrary offset is not stored, so a
  processor rebuild starts where the input's retention starts; a partial
  range goes to a backfill topic instead.
Refuses to touch a processor whose consumer group has active members.
"""
from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete
from tqdm import tqdm

from services.replay.plan import Plan, ReplayError, parse_time, ranges, refuse_if_active
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
    "features": Owned(inputs=(topics.CLICKS, topics.SESSIONS),
                      redis=("user:*", "items:popular")),
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


def group_of(settings: Settings, processor: str) -> str:
    return f"{settings.prefix}clickloop-{processor}"


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions, fetching metadata when the consumer has none for it yet."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(parts)]


async def _offsets(settings: Settings, topic: str, from_: str | None, to: str | None,
                   from_offset: int | None, to_offset: int | None, partitions: set[int] | None):
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                isolation_level="read_committed")
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic)
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
                      partitions), begins
    finally:
        await consumer.stop()


async def _active_members(admin: AIOKafkaAdminClient, group: str) -> int:
    described = await admin.describe_consumer_groups([group])
    # groups: (error_code, group, state, protocol_type, protocol, members)
    return sum(len(g[5]) for response in described for g in response.groups)


async def plan(settings: Settings, args) -> Plan:
    topic = settings.topic(args.topic)
    parts = {int(p) for p in args.partitions.split(",")} if args.partitions else None
    rngs, begins = await _offsets(settings, topic, args.from_time, args.to_time,
                                  args.from_offset, args.to_offset, parts)
    kind, _, name = args.target.partition(":")
    resets: list[str] = []
    if kind == "processor":
        if name not in PROCESSORS:
            raise ReplayError(f"unknown processor {name!r}; choose {', '.join(PROCESSORS)}")
        if args.topic not in PROCESSORS[name].inputs:
            raise ReplayError(f"{name} does not read {args.topic}")
        if any(r.start > begins[r.partition] for r in rngs) or args.to_time or args.to_offset:
            raise ReplayError(
                f"a processor rebuild replays its input from the start of retention to the end "
                f"(its state at an arbitrary offset is not stored); for a partial range use "
                f"--target topic:<backfill topic>")
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            for proc in downstream(name):
                refuse_if_active(group_of(settings, proc),
                                 await _active_members(admin, group_of(settings, proc)), proc)
        finally:
            await admin.close()
        for proc in downstream(name):
            owned = PROCESSORS[proc]
            resets.append(f"consumer group {group_of(settings, proc)}: offsets of "
                          f"{', '.join(settings.topic(t) for t in owned.inputs)} to the start")
            resets += [f"state changelog {settings.topic(t)}: recreated empty" for t in owned.state]
            resets += [f"output topic {settings.topic(t)}: truncated" for t in owned.outputs]
            resets += [f"Redis keys {settings.redis_key(k)}: deleted" for k in owned.redis]
    elif kind != "topic" or not name:
        raise ReplayError(f"--target {args.target!r}: use topic:<name> or processor:<name>")
    return Plan(topic=topic, source=args.source, target=args.target, ranges=rngs,
                resets=tuple(resets))


async def _reset_processor(settings: Settings, proc: str) -> None:
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
                tps = [tp for t in owned.outputs for tp in await _partitions(consumer, settings.topic(t))]
                ends = await consumer.end_offsets(tps)
            finally:
                await consumer.stop()
            await admin.delete_records({tp: RecordsToDelete(before_offset=o)
                                        for tp, o in ends.items() if o})
    finally:
        await admin.close()
    # Move the group to the start of every input (the group is empty: checked).
    group = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             group_id=group_of(settings, proc), enable_auto_commit=False)
    await group.start()
    try:
        tps = [tp for t in owned.inputs for tp in await _partitions(group, settings.topic(t))]
        begins = await group.beginning_offsets(tps)
        group.assign(tps)   # manual assignment: commits as a simple consumer of an empty group
        await group.commit({tp: o for tp, o in begins.items()})
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


async def _copy_live(settings: Settings, plan_: Plan, dest: str, rate: float | None) -> int:
    """Copy the planned range record for record into `dest`; returns records copied."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        if dest not in await admin.list_topics():
            await admin.create_topics([NewTopic(dest, max(r.partition for r in plan_.ranges) + 1, 1)])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                isolation_level="read_committed", enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=5, max_batch_size=512 * 1024)
    await consumer.start()
    await producer.start()
    copied, started = 0, time.monotonic()
    bar = tqdm(total=plan_.records, unit="rec", file=sys.stderr, desc=f"replay {plan_.topic}")
    try:
        live = [r for r in plan_.ranges if r.records]
        consumer.assign([TopicPartition(plan_.topic, r.partition) for r in live])
        for r in live:
            consumer.seek(TopicPartition(plan_.topic, r.partition), r.start)
        remaining = {r.partition: r.end for r in live}
        pending = []
        while remaining:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for tp, records in batches.items():
                end = remaining.get(tp.partition)
                if end is None:
                    continue
                for record in records:
                    if record.offset >= end:
                        break
                    pending.append(await producer.send(dest, key=record.key, value=record.value,
                                                       partition=tp.partition))
                    copied += 1
                if await consumer.position(tp) >= end:
                    remaining.pop(tp.partition, None)
                    consumer.pause(tp)
            bar.update(copied - bar.n)
            if len(pending) > 10_000:
                await asyncio.gather(*pending)
                pending.clear()
            if rate:
                ahead = copied / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
    finally:
        bar.close()
        await producer.stop()
        await consumer.stop()
    return copied


async def run(settings: Settings, args) -> int:
    if args.source == "archive":
        raise ReplayError("--source archive: not available yet (needs the archive worker)")
    plan_ = await plan(settings, args)
    print(plan_.render(args.execute), flush=True)
    if not args.execute:
        return 0
    started = time.monotonic()
    kind, _, name = args.target.partition(":")
    if kind == "topic":
        copied = await _copy_live(settings, plan_, settings.topic(name), args.rate)
        elapsed = time.monotonic() - started
        print(f"replayed {copied} records into {settings.topic(name)} in {elapsed:.1f} s "
              f"({copied / max(elapsed, 1e-9):,.0f}/s)")
        return 0
    for proc in downstream(name):
        await _reset_processor(settings, proc)
    workers = " and ".join(f"`clickloop worker {p}`" for p in downstream(name))
    print(f"reset {', '.join(downstream(name))}; start {workers} to rebuild from "
          f"{plan_.records} input records")
    return 0
