"""The topic a replay writes into, whatever it reads from (the live topic or the archive).

Created when missing, with the deployment's partition count (so a side
deployment can read it as its own input); a record goes to the partition it
came from. Sends are not awaited one by one: acks are awaited only when too
much is in flight (by records or bytes). A progress bar shows rate and ETA on
stderr, and `--rate` caps records per second.
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections import deque

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from tqdm import tqdm

from services.replay.plan import ReplayError
from services.settings import MAX_RECORD_BYTES, Settings

MAX_IN_FLIGHT_RECORDS = 10_000
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
# Big batches: a replay sends a lot at once. At most one record of the largest
# size the collector writes plus headers, below the broker's message.max.bytes.
BATCH_BYTES = MAX_RECORD_BYTES


class TopicSink:
    def __init__(self, settings: Settings, topic: str, needed: int, total: int,
                 desc: str, rate: float | None = None) -> None:
        """`needed`: partitions the topic must have (one past the highest written)."""
        self.settings, self.topic, self.needed = settings, topic, needed
        self.total, self.desc, self.rate = total, desc, rate
        self.sent = 0
        self._in_flight: deque = deque()
        self._in_flight_bytes = 0
        self._producer: AIOKafkaProducer | None = None
        self._bar: tqdm | None = None
        self._started = 0.0

    async def __aenter__(self) -> "TopicSink":
        await self._create()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap, acks="all", enable_idempotence=True,
            linger_ms=10, max_batch_size=BATCH_BYTES)
        await self._producer.start()
        have = await self._producer.partitions_for(self.topic)
        if len(have) < self.needed:
            await self._producer.stop()
            raise ReplayError(f"topic {self.topic} has {len(have)} partition(s), the replay writes "
                              f"to partition {self.needed - 1}: delete it or choose another "
                              f"--target topic")
        self._bar = tqdm(total=self.total, unit="rec", file=sys.stderr, desc=self.desc)
        self._started = time.monotonic()
        return self

    async def _create(self) -> None:
        # Not list_topics first: on a busy cluster the whole topic list costs more
        # than a refused creation (0.25 s against the test broker's thousands).
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
        await admin.start()
        try:
            response = await admin.create_topics([NewTopic(
                self.topic, max(self.needed, self.settings.partitions), 1)])
        finally:
            await admin.close()
        for _, code, message in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                raise ReplayError(f"cannot create topic {self.topic}: {message} (error {code})")

    async def send(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        future = await self._producer.send(self.topic, key=key, value=value,  # type: ignore[union-attr]
                                           partition=partition)
        size = len(value) if value else 0
        self._in_flight.append((future, size))
        self._in_flight_bytes += size
        self.sent += 1
        while len(self._in_flight) > MAX_IN_FLIGHT_RECORDS or self._in_flight_bytes > MAX_IN_FLIGHT_BYTES:
            oldest, size = self._in_flight.popleft()
            await oldest
            self._in_flight_bytes -= size
            self._progress()
        if self.rate:
            ahead = self.sent / self.rate - (time.monotonic() - self._started)
            if ahead > 0:
                self._progress()
                await asyncio.sleep(ahead)

    def _progress(self) -> None:
        self._bar.update(self.sent - len(self._in_flight) - self._bar.n)  # type: ignore[union-attr]

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                await asyncio.gather(*(f for f, _ in self._in_flight))
                self._in_flight.clear()
                self._progress()
        finally:
            self._bar.close()  # type: ignore[union-attr]
            await self._producer.stop()  # type: ignore[union-attr]
