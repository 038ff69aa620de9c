"""The asyncio shell around `Packer`: the Kafka producer, linger timers, sending.

Nothing acknowledged is lost:
- the producer is idempotent with acks=all, so a record is acknowledged only
  once every in-sync replica has it, and its retries neither duplicate nor
  reorder it;
- `submit` returns one future per record holding the request's events; the
  handler answers 2xx only when all of them resolved without error, and 503
  (with Retry-After) when one failed or they did not resolve in time;
- the producer connects in the background and retries, so the collector
  starts and answers /health (503) and 503 to the tracking API while Kafka is
  unreachable, rather than crashing or accepting what it cannot store;
- on shutdown the open records are closed and sent and the producer flushed
  before it stops, so requests still waiting get their true answer.

A 503 after a timeout does not mean the events were lost: they may still be
written, and the client's retry then duplicates them with the same messageId,
which the sessionizer deduplicates (at-least-once, never at-most-once).
"""
from __future__ import annotations

import asyncio
import logging
import time
from functools import lru_cache

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas.clicks import ClickEvent, partition_of
from services.collector.metrics import Metrics
from services.collector.packer import Packer, Record
from services.settings import Settings
from streams import topics

log = logging.getLogger("clickloop.collector")

MAX_PENDING_EVENTS = 200_000   # events waiting for acks; beyond, answer 503 rather than grow
PARTITIONS_REFRESH_S = 10.0
CONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
PROBE_TIMEOUT_S = 2.0   # /health: the broker must answer a metadata request within this
PROBE_CACHE_S = 1.0     # and is asked at most this often, however often /health is called


class Unavailable(RuntimeError):
    """Kafka cannot take the events now; str(error) is the reason for the 503."""


@lru_cache(maxsize=1 << 16)
def _partition(visitor: str, partitions: int) -> int:
    # Visitors repeat across requests: a dict lookup instead of encoding and hashing.
    return partition_of(visitor, partitions)


class ClickSink:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.topic = settings.topic(topics.CLICKS)
        self.dlq_topic = settings.topic(topics.CLICKS_DLQ)
        self.packer = Packer(settings.linger_ms, settings.record_max_events,
                             settings.record_max_bytes)
        self.producer: AIOKafkaProducer | None = None
        self.partitions = 0
        self.last_error = "connecting"
        self.pending_events = 0
        self._futures: dict[int, asyncio.Future] = {}
        self._queue: asyncio.Queue[Record] = asyncio.Queue()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task] = []
        self._partitions_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._failed = False   # a connection attempt failed: answer 503 at once until connected
        self._probed_at = -PROBE_CACHE_S
        self._probe_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.producer is not None

    async def probe(self) -> str | None:
        """None when the broker answers a metadata request now, else why not: a broker
        that went away after the producer connected must not be reported connected."""
        if self.producer is None:
            return self.last_error
        now = time.monotonic()
        if now - self._probed_at >= PROBE_CACHE_S:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    await self.producer.client.fetch_all_metadata()
                self._probe_error = None
            except (KafkaError, TimeoutError, OSError) as exc:
                self._probe_error = (f"Kafka at {self.settings.kafka_bootstrap} did not answer "
                                     f"within {PROBE_TIMEOUT_S:.0f} s: {exc!r}")
            self._probed_at = time.monotonic()
        return self._probe_error

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once connected. While the first attempt is still under way
        (start-up) wait for it; after an attempt failed, fail at once."""
        if self.producer is not None:
            return
        if not self._failed:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._connected.wait()
                return
            except TimeoutError:
                pass
        raise Unavailable(self.last_error)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._connect(), name="collector-connect"),
                       asyncio.create_task(self._send_loop(), name="collector-send")]

    async def _connect(self) -> None:
        attempt = 0
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                enable_idempotence=True,
                linger_ms=0,  # the packer already lingered; send what it closes at once
                max_batch_size=self.settings.record_max_bytes + 4096,
                request_timeout_ms=self.settings.produce_timeout_s * 1000)
            try:
                await topics.ensure_topics(self.settings, (topics.CLICKS, topics.CLICKS_DLQ))
                await producer.start()
                self.partitions = len(await producer.partitions_for(self.topic))
            except Exception as exc:  # noqa: BLE001 - any failure: report it, retry
                self.last_error = f"Kafka at {self.settings.kafka_bootstrap} unreachable: {exc!r}"
                self._failed = True
                if attempt == 0:
                    log.warning("%s; retrying in the background", self.last_error)
                await producer.stop()
                await asyncio.sleep(CONNECT_BACKOFF_S[min(attempt, len(CONNECT_BACKOFF_S) - 1)])
                attempt += 1
                continue
            self._partitions_at = time.monotonic()
            self.producer = producer
            self._connected.set()
            self.metrics.kafka_ready.set(1)
            log.info("producing to %s (%d partitions)", self.topic, self.partitions)
            return

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for record in self.packer.drain():
            self._queue.put_nowait(record)
        if self.producer is not None:
            for _ in range(500):  # the send loop hands the last records to the producer
                if self._queue.empty():
                    break
                await asyncio.sleep(0.01)
            await self.producer.flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(Unavailable("collector stopping"))
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None
        self.metrics.kafka_ready.set(0)

    # -- the hot path --------------------------------------------------------

    def submit(self, events: list[ClickEvent]) -> list[asyncio.Future]:
        """Pack `events` into open records; the futures of the records holding
        them resolve when the broker acknowledged (or failed) each record."""
        if self.producer is None:
            raise Unavailable(self.last_error)
        if self.pending_events + len(events) > MAX_PENDING_EVENTS:
            raise Unavailable(f"{self.pending_events} events are waiting for Kafka's "
                              "acknowledgement; try again shortly")
        loop = self._loop
        now = loop.time()  # type: ignore[union-attr]
        if now - self._partitions_at > PARTITIONS_REFRESH_S:
            self._refresh_partitions(now)
        now_ms = int(now * 1000)
        n, add, futures = self.partitions, self.packer.add, self._futures
        mine: dict[int, asyncio.Future] = {}
        for event in events:
            visitor = event["user_id"] or event["anonymous_id"]
            rid, closed = add(_partition(visitor, n), visitor, orjson.dumps(event), now_ms)
            if rid not in mine:
                fut = futures.get(rid)
                if fut is None:
                    fut = futures[rid] = loop.create_future()  # type: ignore[union-attr]
                    fut.add_done_callback(_retrieve)
                mine[rid] = fut
            for record in closed:
                self._queue.put_nowait(record)
        self.pending_events += len(events)
        if self._timer is None:
            self._arm()
        return list(mine.values())

    async def send_dlq(self, values: list[bytes]) -> list[asyncio.Future]:
        if self.producer is None:
            raise Unavailable(self.last_error)
        try:
            return [await self.producer.send(self.dlq_topic, value) for value in values]
        except Exception as exc:  # noqa: BLE001 - the request gets a 503
            raise Unavailable(f"Kafka did not take the DLQ records: {exc!r}") from None

    # -- internals -----------------------------------------------------------

    def _refresh_partitions(self, now: float) -> None:
        self._partitions_at = now
        known = self.producer.client.cluster.partitions_for_topic(self.topic)  # type: ignore[union-attr]
        if known:
            self.partitions = len(known)

    def _arm(self) -> None:
        due = self.packer.next_due_ms()
        if due is not None:
            self._timer = self._loop.call_at(due / 1000, self._on_timer)  # type: ignore[union-attr]

    def _on_timer(self) -> None:
        self._timer = None
        for record in self.packer.due(int(self._loop.time() * 1000) + 1):  # type: ignore[union-attr]
            self._queue.put_nowait(record)
        self._arm()

    async def _send_loop(self) -> None:
        # One sender keeps the records of a partition in the order they were closed.
        while True:
            record = await self._queue.get()
            while self.producer is None:
                await asyncio.sleep(0.05)
            fut = self._futures.pop(record.id)
            key = None if record.key is None else record.key.encode()
            sent = time.perf_counter()
            try:
                ack = await self.producer.send(self.topic, record.value, key=key,
                                               partition=record.partition)
            except Exception as exc:  # noqa: BLE001 - the waiting requests get a 503
                self._done(fut, record, sent, exc)
                continue
            ack.add_done_callback(lambda a, f=fut, r=record, s=sent: self._done(
                f, r, s, a.exception() if not a.cancelled() else Unavailable("send cancelled")))

    def _done(self, fut: asyncio.Future, record: Record, sent: float,
              error: BaseException | None) -> None:
        self.pending_events -= record.events
        if error is None:
            self.metrics.produce_latency.observe(time.perf_counter() - sent)
            self.metrics.records.inc()
            self.metrics.record_events.observe(record.events)
            if not fut.done():
                fut.set_result(None)
        elif not fut.done():
            fut.set_exception(Unavailable(f"Kafka did not acknowledge: {error!r}"))


def _retrieve(fut: asyncio.Future) -> None:
    # A failed record may have no request left waiting (they timed out): no warning.
    if not fut.cancelled():
        fut.exception()
