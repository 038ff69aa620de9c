"""Following compacted topics into memory: the recommender's models and experiments.

No consumer group: a subscription then gets every partition, from the beginning,
read committed (the writers use transactions). `start` catches up to the end
offsets seen at start-up, folding every record, then applies once; afterwards
each batch is folded and applied when the fold says something changed. Kafka
going away never stops the service: the error is reported (`error`, until the
consumer is back and caught up again), the consumer reopened a second later, and
the holder keeps serving what it has.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from services.settings import Settings
from services.tasks import cancel_and_wait
from streams import topics

log = logging.getLogger("clickloop.recommender")

Fold = Callable[[list], bool]                      # a batch of records -> something changed
Apply = Callable[[], Awaitable[None] | None]       # make the folded state current


class TopicFollower:
    def __init__(self, settings: Settings, names: tuple[str, ...], fold: Fold, apply: Apply,
                 what: str, fetch_max_wait_ms: int = 200) -> None:
        self.settings, self.names = settings, names
        self.topics = tuple(settings.topic(n) for n in names)
        self._fold, self._apply = fold, apply
        self.error: str | None = None   # why the feed is down now; None while it runs
        self.what, self.fetch_max_wait_ms = what, fetch_max_wait_ms
        self.caught_up = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None

    async def apply(self) -> None:
        done = self._apply()
        if inspect.isawaitable(done):
            await done

    async def _open(self) -> AIOKafkaConsumer:
        await topics.ensure_topics(self.settings, self.names)
        consumer = AIOKafkaConsumer(*self.topics, bootstrap_servers=self.settings.kafka_bootstrap,
                                    group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", isolation_level="read_committed",
                                    fetch_max_wait_ms=self.fetch_max_wait_ms)
        await consumer.start()
        return consumer

    async def _catch_up(self, consumer: AIOKafkaConsumer) -> None:
        wanted = set(self.topics)
        for _ in range(100):
            if {tp.topic for tp in consumer.assignment()} >= wanted:
                break
            for records in (await consumer.getmany(timeout_ms=100)).values():
                self._fold(records)
        tps = sorted(consumer.assignment())
        if {tp.topic for tp in tps} < wanted:
            raise KafkaError(f"no partition of {', '.join(sorted(wanted))} assigned")
        end = await consumer.end_offsets(tps)
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                self._fold(records)
        await self.apply()

    async def _run(self) -> None:
        while True:
            try:
                if self._consumer is None:
                    self._consumer = await self._open()
                    await self._catch_up(self._consumer)
                    self.error = None
                self.caught_up.set()
                while True:
                    changed = False
                    for records in (await self._consumer.getmany(timeout_ms=1000)).values():
                        changed |= self._fold(records)
                    if changed:
                        await self.apply()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka away, metadata errors: retry, keep serving
                self.error = f"{self.what}: {exc!r}"
                log.warning("%s unavailable, retrying: %r", self.what, exc)
                if self._consumer is not None:
                    consumer, self._consumer = self._consumer, None
                    try:
                        await consumer.stop()
                    except KafkaError:
                        pass
                await asyncio.sleep(1.0)

    async def start(self, wait_s: float) -> bool:
        """Start following; wait up to `wait_s` for the catch-up. False when it did not finish."""
        self._task = asyncio.create_task(self._run(), name=self.what)
        try:
            await asyncio.wait_for(self.caught_up.wait(), wait_s)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._consumer is not None:
            await self._consumer.stop()
