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
- the agent sends outputs through it and marks state keys dirty; a checkpoint
  (every `interval_s`, or sooner under load) writes the dirty keys to a
  compacted changelog topic, including the next input offset, and commits the
  transaction; only then are the input events acked, so Faust commits their
  offsets after their effects are durable;
- a partition's state is restored from its changelog (read_committed) the
  first time one of its records is seen; records below the restored
  `next_offset` were already applied and are skipped, which makes a replay
  after a crash (or a Faust offset commit that lagged) exactly-once.

Consumers of the outputs read with isolation_level=read_committed.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2


@dataclass
class PartitionTxn:
    """The open transaction of one input partition and what it has not yet committed.

    Outputs are appended to aiokafka batches, one per destination partition,
    and sent when a batch is full or at commit: about 1 µs per record instead
    of about 8 µs for a `producer.send()` call each (bench, profiled).
    """

    producer: AIOKafkaProducer
    state: Any
    dirty: set = field(default_factory=set)
    pending_acks: list = field(default_factory=list)
    batches: dict = field(default_factory=dict)      # (topic, partition) -> BatchBuilder
    sends: list = field(default_factory=list)
    partition_counts: dict = field(default_factory=dict)

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None,
                   partition: int | None = None) -> None:
        if partition is None:
            count = self.partition_counts.get(topic)
            if count is None:
                count = self.partition_counts[topic] = len(await self.producer.partitions_for(topic))
            partition = (murmur2(key) & 0x7FFFFFFF) % count if key is not None else 0
        batch = self.batches.get((topic, partition))
        if batch is None:
            batch = self.batches[(topic, partition)] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:  # full
            self.sends.append(await self.producer.send_batch(batch, topic, partition=partition))
            batch = self.batches[(topic, partition)] = self.producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)

    async def flush(self) -> None:
        for (topic, partition), batch in self.batches.items():
            if batch.record_count():
                self.sends.append(await self.producer.send_batch(batch, topic, partition=partition))
        self.batches = {}
        await asyncio.gather(*self.sends)
        self.sends = []


class TransactionalState:
    """Per-partition transactional producers and changelog-backed state of one processor."""

    def __init__(self, bootstrap: str, group: str, changelog: str,
                 restore: Callable[[dict[bytes, bytes]], Any],
                 dump: Callable[[Any, set], list[tuple[bytes, bytes | None]]],
                 interval_s: float = 1.0, max_pending: int = 200_000) -> None:
        self.bootstrap, self.group, self.changelog = bootstrap, group, changelog
        self._restore, self._dump = restore, dump
        self.interval_s, self.max_pending = interval_s, max_pending
        self.partitions: dict[int, PartitionTxn] = {}
        self.lock = asyncio.Lock()
        self.pending_events = 0
        self._last = 0.0

    async def partition(self, partition: int) -> PartitionTxn:
        """The partition's transaction, fencing any previous owner and restoring state."""
        txn = self.partitions.get(partition)
        if txn is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, transactional_id=f"{self.group}-{partition}",
                acks="all", enable_idempotence=True, linger_ms=5, max_batch_size=512 * 1024,
                max_request_size=8 * 1024 * 1024)
            await producer.start()      # InitProducerId: fences zombies, aborts their txn
            state = self._restore(await self._read_changelog(partition))
            await producer.begin_transaction()
            txn = self.partitions[partition] = PartitionTxn(producer, state)
        return txn

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

    def due(self, now: float) -> bool:
        return self.pending_events >= self.max_pending or (
            self.pending_events > 0 and now - self._last >= self.interval_s)

    async def checkpoint(self, now: float) -> None:
        """Commit every partition's open transaction: outputs, dirty state, position; then ack."""
        self._last = now
        await asyncio.gather(*(self._commit(p, txn) for p, txn in list(self.partitions.items())
                               if txn.pending_acks or txn.sends or txn.dirty))
        self.pending_events = 0

    async def _commit(self, partition: int, txn: PartitionTxn) -> None:
        for key, value in self._dump(txn.state, txn.dirty):
            await txn.send(self.changelog, value=value, key=key, partition=partition)
        txn.dirty = set()
        await txn.flush()
        await txn.producer.commit_transaction()
        await txn.producer.begin_transaction()
        for event in txn.pending_acks:
            event.ack()
        txn.pending_acks = []

    async def release(self, partitions) -> None:
        """Commit and close the given partitions (rebalance, shutdown)."""
        for partition in list(partitions):
            txn = self.partitions.pop(partition, None)
            if txn is None:
                continue
            try:
                await self._commit(partition, txn)
            finally:
                await txn.producer.stop()
