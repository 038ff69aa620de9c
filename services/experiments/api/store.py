"""The experiments service's view of Kafka: the registry folded from `experiments`,
the latest `bandit.posteriors` snapshot per experiment, and the write path.

Reads. One consumer (no group: it reads everything, from the beginning) is
assigned the single `experiments` partition and every `bandit.posteriors`
partition. Each `experiments` record goes through `registry.apply`, the same
fold the recommender and the bandits processor run, so all of them agree; a
record the fold refuses is logged, counted and remembered by offset. The
service is ready once it reached the end offsets it saw at start-up.

Writes. `write(record)` holds one lock per process: `registry.propose` on the
current state (400/409 before anything is written), then the record is
produced with acks=all (idempotent producer) and awaited; then it waits until
its own consumer has folded that offset, and answers with what the fold
decided. So a 2xx means the broker acknowledged the record AND the fold
accepted it: read-your-writes holds for the next GET (the state it reads is
the fold, which already contains the record), and a race with another
instance (two starts on one surface at once) is decided by the topic's single
order, identically everywhere: the loser gets 409 with the fold's reason, the
same reason every other consumer logs. Applying the record locally after the
ack would answer the same in the common case but would claim success for a
record that the fold, one offset later, refuses.

A timeout waiting for the acknowledgement is a 503: the record may still be
written (at-least-once, as for the collector); a retried create then meets
"already exists" and a retried start meets "only a draft can start", and GET
shows the truth.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.experiments import Experiment
from services.experiments import ExperimentError, registry
from services.settings import Settings
from streams import topics

log = logging.getLogger("clickloop.experiments")

CONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
MAX_REMEMBERED_REFUSALS = 10_000


class Unavailable(RuntimeError):
    """Kafka cannot take or confirm the write now; str(error) is the reason for the 503."""


class Conflict(ExperimentError):
    """The registry refuses the record (collision, state machine, duplicate id)."""


class ExperimentStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(topics.EXPERIMENTS)
        self.posteriors_topic = settings.topic(topics.BANDIT_POSTERIORS)
        self.registry = registry.Registry()
        self.snapshots: dict[str, dict] = {}
        self.applied = 0                    # next `experiments` offset the fold will see
        self.refused: OrderedDict[int, str] = OrderedDict()
        self.refused_total = 0
        self.bad_snapshots = 0
        self.last_error = "connecting"       # the consumer's (health, reads)
        self.producer_error = "connecting"   # the producer's (the 503 of a write)
        self.ready = asyncio.Event()        # caught up with the topics at start-up
        self.producer: AIOKafkaProducer | None = None
        self._progress = asyncio.Condition()
        self._write_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._positions: dict[TopicPartition, int] = {}   # next offset to read, per partition

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._produce_connect(), name="experiments-producer"),
                       asyncio.create_task(self._consume(), name="experiments-consumer")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def _produce_connect(self) -> None:
        attempt = 0
        while True:
            producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                        enable_idempotence=True,
                                        request_timeout_ms=self.settings.produce_timeout_s * 1000)
            try:
                await topics.ensure_topics(self.settings, (topics.EXPERIMENTS, topics.BANDIT_POSTERIORS))
                await producer.start()
            except Exception as exc:  # noqa: BLE001 - any failure: report, retry
                self.producer_error = f"Kafka at {self.settings.kafka_bootstrap} unreachable: {exc!r}"
                if attempt == 0:
                    log.warning("%s; retrying in the background", self.producer_error)
                await producer.stop()
                await asyncio.sleep(CONNECT_BACKOFF_S[min(attempt, len(CONNECT_BACKOFF_S) - 1)])
                attempt += 1
                continue
            self.producer = producer
            return

    # -- reads ---------------------------------------------------------------

    def _fold(self, records) -> None:
        for r in records:
            key = r.key.decode(errors="replace") if r.key is not None else None
            try:
                value = None if r.value is None else orjson.loads(r.value)
            except orjson.JSONDecodeError as exc:  # not a tombstone either: refuse it
                reason: str | None = f"not JSON: {exc}"
            else:
                self.registry, reason = registry.apply(self.registry, key, value)
            if reason:
                self.refused_total += 1
                self.refused[r.offset] = reason
                if len(self.refused) > MAX_REMEMBERED_REFUSALS:
                    self.refused.popitem(last=False)
                log.warning("%s[%d]@%d refused by the registry: %s", r.topic, r.partition, r.offset,
                            reason)
            self.applied = r.offset + 1

    def _snapshot(self, records) -> None:
        for r in records:
            key = r.key.decode(errors="replace") if r.key is not None else None
            if r.value is None:
                if key is not None:
                    self.snapshots.pop(key, None)
                continue
            try:
                value = orjson.loads(r.value)
                exp = key or value.get("experiment")
                if not isinstance(value, dict) or not exp:
                    raise ValueError("a snapshot is an object keyed by its experiment id")
            except (orjson.JSONDecodeError, ValueError, AttributeError) as exc:
                self.bad_snapshots += 1
                log.warning("%s[%d]@%d unreadable snapshot: %s", r.topic, r.partition, r.offset, exc)
                continue
            self.snapshots[exp] = value

    async def _open(self) -> tuple[AIOKafkaConsumer, TopicPartition, list[TopicPartition]]:
        await topics.ensure_topics(self.settings, (topics.EXPERIMENTS, topics.BANDIT_POSTERIORS))
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    isolation_level="read_committed", fetch_max_wait_ms=100)
        await consumer.start()
        try:
            exp_tp = TopicPartition(self.topic, 0)
            parts = None
            for _ in range(100):
                parts = consumer.partitions_for_topic(self.posteriors_topic)
                if parts:
                    break
                await consumer._client.force_metadata_update()  # noqa: SLF001 - new topic metadata
                await asyncio.sleep(0.1)
            post_tps = [TopicPartition(self.posteriors_topic, p) for p in sorted(parts or ())]
            consumer.assign([exp_tp, *post_tps])
            # First time from the beginning; after a reconnection, on from where the
            # fold stopped (the state is kept, so readers never see a half rebuild).
            for tp in (exp_tp, *post_tps):
                if tp in self._positions:
                    consumer.seek(tp, self._positions[tp])
                else:
                    await consumer.seek_to_beginning(tp)
        except BaseException:
            await consumer.stop()
            raise
        return consumer, exp_tp, post_tps

    async def _consume(self) -> None:
        attempt = 0
        while True:
            consumer = None
            try:
                consumer, exp_tp, post_tps = await self._open()
                ends = await consumer.end_offsets([exp_tp, *post_tps])
                attempt = 0
                while True:
                    batches = await consumer.getmany(timeout_ms=500)
                    for tp, records in batches.items():
                        if records:
                            self._positions[tp] = records[-1].offset + 1
                        if tp == exp_tp:
                            self._fold(records)
                        else:
                            self._snapshot(records)
                    if not self.ready.is_set():
                        if all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                            self.ready.set()
                            log.info("registry rebuilt: %d experiments, %d snapshots",
                                     len(self.registry.experiments), len(self.snapshots))
                    if batches:
                        async with self._progress:
                            self._progress.notify_all()
            except asyncio.CancelledError:
                if consumer is not None:
                    await consumer.stop()
                raise
            except Exception as exc:  # noqa: BLE001 - Kafka away: keep the last state, retry
                self.last_error = f"reading {self.topic}: {exc!r}"
                log.warning("%s; retrying", self.last_error)
                if consumer is not None:
                    try:
                        await consumer.stop()
                    except Exception:  # noqa: BLE001
                        pass
                await asyncio.sleep(CONNECT_BACKOFF_S[min(attempt, len(CONNECT_BACKOFF_S) - 1)])
                attempt += 1

    # -- writes --------------------------------------------------------------

    async def write(self, make: Callable[[registry.Registry], dict]) -> Experiment:
        """`make(current registry)` builds the record under the write lock (and may
        raise: not found, not a draft...); then propose, produce, await the ack and
        the fold. Returns the record as folded. RecordError (the record breaks the
        rules), Conflict (refused against the registry), Unavailable (Kafka)."""
        timeout = self.settings.produce_timeout_s
        async with self._write_lock:
            if self.producer is None:
                raise Unavailable(self.producer_error)
            try:
                async with asyncio.timeout(timeout):
                    await self.ready.wait()
            except TimeoutError:
                raise Unavailable(f"the registry is still being read from {self.topic}") from None
            record = make(self.registry)
            registry.validate(record)       # RecordError: the caller's 400
            try:
                registry.propose(self.registry, record)
            except registry.RecordError as exc:
                raise Conflict(str(exc)) from None
            try:
                async with asyncio.timeout(timeout):
                    meta = await self.producer.send_and_wait(self.topic, orjson.dumps(record),
                                                             key=record["id"].encode(), partition=0)
            except TimeoutError:
                raise Unavailable(f"Kafka did not acknowledge within {timeout} s") from None
            except Exception as exc:  # noqa: BLE001 - KafkaError and friends
                raise Unavailable(f"Kafka did not acknowledge: {exc!r}") from None
            try:
                async with asyncio.timeout(timeout):
                    async with self._progress:
                        await self._progress.wait_for(lambda: self.applied > meta.offset)
            except TimeoutError:
                raise Unavailable(f"written at {self.topic}[0]@{meta.offset}, but not read back "
                                  f"within {timeout} s") from None
            reason = self.refused.get(meta.offset)
            if reason is not None:
                raise Conflict(reason)
            return self.registry.experiments[record["id"]]
