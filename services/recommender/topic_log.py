"""A fire-and-forget Kafka log for the request path: a bounded buffer and a background producer.

The handler calls `log(key, value)`: an append to a deque, nothing awaited, so
a slow or absent broker never slows an answer. A background task drains the
buffer into an aiokafka producer (which batches per partition; acks=all,
idempotent). When the buffer is full — Kafka down or far behind — records are
dropped and counted (`dropped`, exported in /metrics): the service keeps
answering, and the loss is visible instead of silent. Records are keyed by
visitor, so a visitor's exposures keep their order on one partition.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.settings import Settings
from services.tasks import cancel_and_wait

log = logging.getLogger("clickloop.recommender.topic_log")


# The producer batches what arrives within this many ms into one produce request:
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

    def log(self, key: bytes, value: bytes) -> None:
        """Queue one record; dropped (and counted) when the buffer is full."""
        if len(self.buffer) >= self.capacity:
            self.dropped += 1
            return
        self.buffer.append((key, value))
        if not self._wake.is_set():
            self._wake.set()

    def _delivered(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.dropped += 1
        else:
            self.sent += 1

    async def _connect(self) -> AIOKafkaProducer:
        while True:
            producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                        enable_idempotence=True, linger_ms=LINGER_MS,
                                        max_batch_size=256 * 1024, request_timeout_ms=10_000)
            try:
                await producer.start()
                return producer
            except KafkaError as exc:
                log.warning("%s: Kafka unavailable, buffering (%d queued): %r", self.topic,
                            len(self.buffer), exc)
                await producer.stop()
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        self._producer = await self._connect()
        self.ready = True
        send, buf = self._producer.send, self.buffer
        while True:
            await self._wake.wait()
            self._wake.clear()
            while buf:
                key, value = buf.popleft()
                try:
                    fut = await send(self.topic, value, key=key)
                except Exception as exc:  # KafkaError, a record too large...: count, go on
                    self.dropped += 1
                    log.warning("%s: send failed: %r", self.topic, exc)
                    continue
                fut.add_done_callback(self._delivered)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"log-{self.topic}")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is buffered (up to timeout_s), then close the producer."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.buffer and self._task is not None and not self._task.done():
                    await asyncio.sleep(0.01)
                if self._producer is not None and self.ready:
                    await self._producer.flush()
        except TimeoutError:
            log.warning("%s: %d records not sent at shutdown", self.topic, len(self.buffer))
        await cancel_and_wait(self._task, KafkaError)
        if self._producer is not None:
            await self._producer.stop()
