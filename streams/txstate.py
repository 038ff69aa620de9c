"""Exactly-once state for a Faust agent: per input partition, outputs, state changes
and the input position they reflect are committed in one Kafka transaction.

Faust's own `exactly_once` guarantee did not make progress on this stack
(faust-streaming 0.15.3, aiokafka 0.14, Kafka 4.4: the worker recovered, then
processed nothing), so clickloop keeps Faust for consuming, rebalancing and
offset tracking and does the transactional part itself, as Kafka Streams does:

- each input partition has its own transactional producer, with a
  transactional id derived from the group and the partition; starting it
  fences a zombie that still owned the partition and aborts its open
  transaction;
- the agent appends outputs to local batches and the state tracks which of
  its keys changed; a checkpoint (every `interval_s`, or sooner under load)
  cuts a unit — those batches, the changed keys serialized at that instant
  including the next input
  offset, the events to ack — and commits it in one transaction while the
  agent goes on filling fresh batches (a commit never stalls processing);
  only after the commit are the unit's input events acked, so Faust commits
  their offsets once their effects are durable;
- a partition's state is restored from its compacted changelog
  (read_committed) the first time one of its records is seen; records below
  the restored `next_offset` were already applied and are skipped, which
  makes a replay after a crash (or a lagging Faust offset commit) exactly-once;
- a failed commit leaves the in-memory state ahead of what is durable, so the
  process exits at once and its restart restores from the changelog.

Consumers of the outputs read with isolation_level=read_committed.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.partitioning import key_partition

log = logging.getLogger("clickloop.txstate")

# The state's changelog entries changed since the last call (None value: deleted).
Dump = Callable[[Any], list[tuple[bytes, bytes | None]]]

META = b"\x00meta"


def restore_keyed(make: Callable[..., Any], entries: dict[bytes, bytes]) -> Any:
    """A keyed partition state from its changelog entries: the meta entry's fields
    build it (`make(**meta)`), every other entry is one key's state (`load(key, bytes)`).
    The layout of the sessionizer, attribution and bandits states."""
    meta = orjson.loads(entries.pop(META)) if META in entries else {}
    part = make(**meta)
    for key, state in entries.items():
        part.load(key.decode(), state)
    return part


def dump_keyed(part: Any) -> list[tuple[bytes, bytes | None]]:
    """Changelog entries of a keyed state: the keys changed since the last dump
    (`take_dirty`) and the meta entry."""
    return [*part.take_dirty(), (META, orjson.dumps(part.meta()))]


@dataclass
class Unit:
    """What one transaction commits: output batches, changelog entries, events to ack."""

    batches: dict
    acks: list


@dataclass
class PartitionTxn:
    """One input partition: its producer, its state, and what is not yet committed.

    Outputs go to aiokafka batches, one per destination partition (about 1 µs a
    record, against about 8 µs for a `producer.send()` call each; profiled).
    """

    partition: int
    producer: AIOKafkaProducer
    state: Any
    changelog: str
    pending_acks: list = field(default_factory=list)
    batches: dict = field(default_factory=dict)     # (topic, partition) -> [BatchBuilder, ...]
    partition_counts: dict = field(default_factory=dict)

    async def partition_count(self, topic: str) -> int:
        count = self.partition_counts.get(topic)
        if count is None:
            count = self.partition_counts[topic] = len(await self.producer.partitions_for(topic))
        return count

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None,
                   partition: int | None = None) -> None:
        """Add a record to the transaction, to Kafka's default partition for its key."""
        if partition is None:
            count = await self.partition_count(topic)
            partition = key_partition(key, count) if key is not None else 0
        self.append(topic, partition, key, value)

    def append(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> None:
        """`send` without the partitioner, for a hot path that hashed the key already."""
        builders = self.batches.get((topic, partition))
        if builders is None:
            builders = self.batches[(topic, partition)] = [self.producer.create_batch()]
        if builders[-1].append(key=key, value=value, timestamp=None) is None:  # full
            builders.append(self.producer.create_batch())
            builders[-1].append(key=key, value=value, timestamp=None)

    def cut(self, dump: Dump) -> Unit | None:
        """Take what is uncommitted as one unit; the agent goes on with fresh buffers."""
        if not (self.batches or self.pending_acks):
            return None
        for key, value in dump(self.state):
            self.append(self.changelog, self.partition, key, value)
        unit = Unit(self.batches, self.pending_acks)
        self.batches, self.pending_acks = {}, []
        return unit

    async def commit(self, unit: Unit) -> None:
        sends = []
        for (topic, partition), builders in unit.batches.items():
            for builder in builders:
                sends.append(await self.producer.send_batch(builder, topic, partition=partition))
        await asyncio.gather(*sends)
        await self.producer.commit_transaction()
        await self.producer.begin_transaction()
        for event in unit.acks:
            event.ack()


class TransactionalState:
    """Per-partition transactional producers and changelog-backed state of one processor."""

    def __init__(self, bootstrap: str, group: str, changelog: str,
                 restore: Callable[[dict[bytes, bytes]], Any], dump: Dump,
                 interval_s: float = 1.0, max_pending: int = 200_000) -> None:
        self.bootstrap, self.group, self.changelog = bootstrap, group, changelog
        self._restore, self._dump = restore, dump
        self.interval_s, self.max_pending = interval_s, max_pending
        self.partitions: dict[int, PartitionTxn] = {}
        self.assigned: set[int] = set()  # input partitions this worker owns (`assign`)
        self.lock = asyncio.Lock()      # the agent's step and cutting a unit exclude each other
        self.pending_events = 0
        self._last = 0.0
        self._committing: asyncio.Task | None = None

    async def partition(self, partition: int) -> PartitionTxn:
        """The partition's transaction, fencing any previous owner and restoring state.

        The first record of a partition opens all assigned partitions not yet
        open at once (each open is a few round trips: InitProducerId, the
        changelog read), rather than one stall per partition as each first
        record arrives.
        """
        txn = self.partitions.get(partition)
        if txn is None:
            wanted = sorted({partition} | (self.assigned - self.partitions.keys()))
            opened = await asyncio.gather(*(self._open(p) for p in wanted))
            self.partitions.update(zip(wanted, opened))
            txn = self.partitions[partition]
        return txn

    async def _open(self, partition: int) -> PartitionTxn:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, transactional_id=f"{self.group}-{partition}",
            acks="all", enable_idempotence=True, linger_ms=5, max_batch_size=512 * 1024,
            max_request_size=8 * 1024 * 1024)
        await producer.start()      # InitProducerId: fences zombies, aborts their txn
        state = self._restore(await self._read_changelog(partition))
        await producer.begin_transaction()
        return PartitionTxn(partition, producer, state, self.changelog)

    async def _read_changelog(self, partition: int) -> dict[bytes, bytes]:
        tp = TopicPartition(self.changelog, partition)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                    enable_auto_commit=False, isolation_level="read_committed",
                                    max_partition_fetch_bytes=8 * 1024 * 1024)
        await consumer.start()
        entries: dict[bytes, bytes] = {}
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            while await consumer.position(tp) < end:
                for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                    for record in records:
                        if record.value is None:
                            entries.pop(record.key, None)
                        else:
                            entries[record.key] = record.value
        finally:
            await consumer.stop()
        return entries

    def maybe_checkpoint(self, now: float, force: bool = False) -> None:
        """Start committing what is pending when due and no commit is in flight.

        Call with the lock held (the cut must not interleave with an agent step).
        """
        if self.committing:
            return
        if not (force or self.pending_events >= self.max_pending
                or (self.pending_events and now - self._last >= self.interval_s)):
            return
        self._last = now
        self.pending_events = 0
        units = [(txn, unit) for txn in self.partitions.values()
                 if (unit := txn.cut(self._dump)) is not None]
        if units:
            self._committing = asyncio.ensure_future(self._commit(units))

    async def _commit(self, units: list[tuple[PartitionTxn, Unit]]) -> None:
        try:
            await asyncio.gather(*(txn.commit(unit) for txn, unit in units))
        except BaseException as exc:  # noqa: BLE001 (any failure leaves memory ahead of Kafka)
            log.critical("commit failed (%r): exiting so that a restart restores the "
                         "committed state", exc)
            os._exit(70)

    @property
    def committing(self) -> bool:
        """Whether a commit is in flight (a checkpoint now would wait for the next one)."""
        return self._committing is not None and not self._committing.done()

    def assign(self, assigned, topics: Collection[str]) -> None:
        """Faust's assigned topic-partitions: those of `topics` are this state's inputs."""
        self.assigned |= {tp.partition for tp in assigned if tp.topic in topics}

    async def revoke(self, revoked, topics: Collection[str]) -> None:
        """Commit everything, then close the revoked partitions of `topics` (lock held)."""
        await self.release({tp.partition for tp in revoked if tp.topic in topics})

    def attach(self, app, topics: Collection[str]) -> None:
        """Wire the state to a Faust app whose only state it is: assignment, revocation
        and shutdown. (A processor with several states orders their flushes and
        releases in its own handlers, with `assign` and `revoke`: Faust calls the
        receivers of one signal in no fixed order.)"""

        @app.on_partitions_assigned.connect
        async def on_assigned(app, assigned, **kwargs) -> None:  # noqa: ARG001 (signal signature)
            self.assign(assigned, topics)

        @app.on_partitions_revoked.connect
        async def on_revoked(app, revoked, **kwargs) -> None:  # noqa: ARG001 (signal signature)
            async with self.lock:
                await self.revoke(revoked, topics)

        @app.on_before_shutdown.connect
        async def on_shutdown(app, **kwargs) -> None:  # noqa: ARG001 (signal signature)
            async with self.lock:
                await self.release(list(self.partitions))

    async def drain(self) -> None:
        """Wait for the commit in flight, then commit everything pending."""
        if self._committing is not None:
            await self._committing
        self.maybe_checkpoint(0.0, force=True)
        if self._committing is not None:
            await self._committing

    async def release(self, partitions) -> None:
        """Commit everything, then close the given partitions (rebalance, shutdown)."""
        await self.drain()
        for partition in list(partitions):
            self.assigned.discard(partition)
            txn = self.partitions.pop(partition, None)
            if txn is not None:
                await txn.producer.stop()
