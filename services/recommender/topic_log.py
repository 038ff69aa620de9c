"""A fire-and-forget Kafka log for the request path: a bounded buffer and a background producer.

The handler calls `log(key, value)`: an append to a deque, nothing awaited, so
a slow or absent broker never slows an answer. A background task drains the
buffer into an aiokafka producer (acks=all, idempotent) as record batches
(`create_batch` / `send_batch`: ~5 µs of CPU per record where `send` took ~12,
its future and partitioner call per record; the partition is the one `send`
would pick, `streams.partitioning.key_partition`). The drain waits LINGER_MS after the
first record of a round, so a request to the broker carries ~LINGER_MS of
records, as the producer's own linger gave `send`. When the
buffer is full — Kafka down or far behind — records are
dropped and counted (`dropped`, exported in /metrics): the service keeps
answering, and the loss is visible instead of silent. Records are keyed by
visitor, so a visitor's exposures keep their order on one partition.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.producer.message_accumulator import BatchBuilder

from services.settings import Settings
from services.tasks import cancel_and_wait
from streams.partitioning import key_partition

log = logging.getLogger("clickloop.recommender.topic_log")


# What arrives within this many ms goes in one produce request (batches per partition):
# at 1,000 req/s, 10 ms meant 100 requests/s to encode, send and acknowledge on the
# serving event loop; 50 ms took 5-10 % off the recommender's CPU per request
# (bench/serve_latency.py) and is nothing next to attribution's 30-minute window or
# the bandits' 2 s propagation target.
LINGER_MS = 50


class TopicLog:
    """`log(key, value)` from anywhere on the event loop; `start()` / `stop()` around it."""

    def __init__(self, settings: Settings, topic: str, capacity: int = 100_000) -> None:
        self.settings = settings
        self.topic = topic
        self.capacity = capacity
        self.buffer: deque[tuple[bytes, bytes]] = deque()
        self.sent = 0          # acknowledged by the broker
        self.dropped = 0       # buffer full, or the broker refused them
        self.ready = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._producer: AIOKafkaProducer | None = None
        self._draining = False  # records taken from the buffer, not all handed to the producer

    def log(self, key: bytes, value: bytes) -> None:
        """Queue one record; dropped (and counted) when the buffer is full."""
        if len(self.buffer) >= self.capacity:
            self.dropped += 1
            return
        self.buffer.append((key, value))
        if not self._wake.is_set():
            self._wake.set()

    def _delivered(self, builder: BatchBuilder, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.dropped += builder.record_count()
        else:
            self.sent += builder.record_count()

    async def _connect(self) -> AIOKafkaProducer:
        while True:
            producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                        enable_idempotence=True, max_batch_size=256 * 1024,
                                        request_timeout_ms=10_000)
            try:
                await producer.start()
                return producer
            except KafkaError as exc:
                log.warning("%s: Kafka unavailable, buffering (%d queued): %r", self.topic,
                            len(self.buffer), exc)
                await producer.stop()
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        self._producer = producer = await self._connect()
        self.ready = True
        buf = self.buffer
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let records gather, as the producer's linger would: the batches below are
            # closed, so the producer sends them at once. A batch must not take records
            # once submitted: the idempotent producer numbers a batch's records when it
            # takes the batch, before it encodes it (records added in between put the
            # partition out of sequence).
            await asyncio.sleep(LINGER_MS / 1000)
            while buf:
                try:
                    partitions = sorted(await producer.partitions_for(self.topic))
                except KafkaError as exc:  # metadata unavailable: the records wait
                    log.warning("%s: no partitions (%d queued): %r", self.topic, len(buf), exc)
                    await asyncio.sleep(1.0)
                    continue
                self._draining = True
                filling: dict[int, BatchBuilder] = {}
                for _ in range(len(buf)):  # what is queued now; later records, next round
                    key, value = buf.popleft()
                    partition = partitions[key_partition(key, len(partitions))]
                    builder = filling.get(partition)
                    if builder is not None and builder.append(key=key, value=value,
                                                              timestamp=None) is not None:
                        continue
                    if builder is not None:  # full (it closed itself): send it
                        await self._submit(builder, partition)
                    builder = filling[partition] = producer.create_batch()
                    builder.append(key=key, value=value, timestamp=None)  # an empty batch takes any
                for partition, builder in filling.items():
                    builder.close()
                    await self._submit(builder, partition)
                self._draining = False

    async def _submit(self, builder: BatchBuilder, partition: int) -> None:
        try:
            fut = await self._producer.send_batch(builder, self.topic,  # type: ignore[union-attr]
                                                  partition=partition)
        except Exception as exc:  # KafkaError, a timeout waiting for the partition's queue
            self.dropped += builder.record_count()
            log.warning("%s: %d records not sent: %r", self.topic, builder.record_count(), exc)
            return
        fut.add_done_callback(functools.partial(self._delivered, builder))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"log-{self.topic}")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is buffered (up to timeout_s), then close the producer."""
        try:
            async with asyncio.timeout(timeout_s):
                while ((self.buffer or self._draining) and self._task is not None
                       and not self._task.done()):
                    await asyncio.sleep(0.01)
                if self._producer is not None and self.ready:
                    await self._producer.flush()
        except TimeoutError:
            log.warning("%s: %d records not sent at shutdown", self.topic, len(self.buffer))
        await cancel_and_wait(self._task, KafkaError)
        if self._producer is not None:
            await self._producer.stop()
