"""Worker `cdc_history`: Debezium table topics `cdc.<server>.<schema>.<table>` →
SCD2 versions on `history.<table>` (key = key_id); bad and late records →
`<input topic>.dlq` with the reason and `topic[partition]@offset`.

A thin loop over `streams.history.TableHistory` (the pure fold), one change
event per Kafka record, made exactly-once by `streams.txstate` as
streams/sessionize.py is: the versions emitted, the touched keys' state and
the input offset are committed in one Kafka transaction, and a record's offset
is committed to the group only after. One worker folds many tables; the state
is one `PartitionHistory` per (input topic, partition), each with its own
transactional producer (`<group>-<topic>-<partition>`: partitions of different
topics may land on different workers). They share one compacted changelog,
`clickloop-cdc_history-state`, keyed `<input topic>\x1f<key_id>` plus a
`\x00meta\x1f<input topic>` entry holding the next offset; partition N of a
CDC topic keeps its state in changelog partition N, so a CDC topic may have at
most CLICKLOOP_PARTITIONS partitions (the worker stops with that message).

Why not a Faust agent. Measured with bench/cdc_history.py: a Faust agent
moved about 4,000 records/s here (its per-message path — conductor, stream
queue, acks — costs ~200 µs a record, and Debezium writes one event per
record, where the collector packs hundreds), and Faust's
`app.topic(pattern=...)` does not subscribe on this stack (its aiokafka
driver subscribes by name only: "XXX pattern does not work"). So the Faust app
only hosts the process (timers, progress lines, shutdown) and the records come
from an aiokafka consumer subscribed to CLICKLOOP_CDC_TOPICS as one regex, in
its own group `<prefix>clickloop-cdc_history-tables` (Faust's consumer holds
the app's group with its own assignor); the broker's topic list is re-read
every `RESCAN_S` seconds, so a table whose topic appears later is picked up
without a restart.
"""
from __future__ import annotations

import logging
import os
import re

import faust
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ConsumerStoppedError

from services.settings import Settings
from streams import topics
from streams.app import FETCH_MAX_WAIT_MS, now
from streams.debezium import ChangeEvent, decode
from streams.dlq import dlq_record
from streams.history import HistoryConfig, Outputs, TableHistory
from streams.meter import Meter
from streams.partitioning import key_partition
from streams.txstate import TransactionalState

log = logging.getLogger("clickloop.cdc_history")

PROCESSOR = "cdc_history"
GROUP_SUFFIX = "-tables"   # the consumer group of the CDC topics: <prefix>clickloop-cdc_history-tables
META = b"\x00meta"
SEP = b"\x1f"
RESCAN_S = 10.0          # metadata refresh: a new matching topic is read within this


class PartitionHistory:
    """The worker's state for one partition of one CDC topic: the table's history and
    the next input offset to apply."""

    __slots__ = ("history", "next_offset")

    def __init__(self, history: TableHistory, next_offset: int = 0) -> None:
        self.history = history
        self.next_offset = next_offset


def config(settings: Settings) -> HistoryConfig:
    return HistoryConfig(max_versions=settings.history_max_versions)


def restore(cfg: HistoryConfig, topic: str, entries: dict[bytes, bytes]) -> PartitionHistory:
    """The state of `topic`'s partition from the changelog partition (shared by every
    CDC topic: only this topic's entries are taken)."""
    prefix, meta = topic.encode() + SEP, META + SEP + topic.encode()
    part = PartitionHistory(TableHistory(cfg),
                            orjson.loads(entries[meta]) if meta in entries else 0)
    cut = len(prefix)
    for name, state in entries.items():
        if name.startswith(prefix):
            part.history.load(name[cut:].decode(), state)
    return part


def dump(topic: str, part: PartitionHistory) -> list[tuple[bytes, bytes | None]]:
    """Changelog entries: the keys changed since the last dump, and the next offset."""
    prefix = topic.encode() + SEP
    out: list[tuple[bytes, bytes | None]] = [
        (prefix + key_id.encode(), state) for key_id, state in part.history.take_dirty()]
    out.append((META + SEP + topic.encode(), orjson.dumps(part.next_offset)))
    return out


def subscription(settings: Settings) -> str:
    """CLICKLOOP_CDC_TOPICS as one regex over prefixed topic names (the worker's own
    outputs excluded: a broad pattern must not read its dead letters back)."""
    alternatives = "|".join(e if topics.is_pattern(e) else re.escape(e) for e in settings.cdc_topics)
    return (f"^{re.escape(settings.prefix)}(?!{re.escape(topics.HISTORY_PREFIX)})(?!.*\\.dlq$)"
            f"(?:{alternatives})$")


class _Ack:
    """What txstate acks once a unit is committed: an input partition's next offset,
    for the consumer group's commit (a restart hint only: the exactly-once position
    is the state's own `next_offset`)."""

    __slots__ = ("positions", "tp", "offset")

    def __init__(self, positions: dict, tp: TopicPartition, offset: int) -> None:
        self.positions, self.tp, self.offset = positions, tp, offset

    def ack(self) -> None:
        if self.positions.get(self.tp, -1) < self.offset:
            self.positions[self.tp] = self.offset


def build(app: faust.App, settings: Settings, meter: Meter) -> None:
    cfg = config(settings)
    # The Faust app's own consumer (leader topic, no agents) holds app.conf.id with
    # Faust's assignor; a group cannot mix assignors, so the table consumer has its own.
    group = app.conf.id + GROUP_SUFFIX
    prefix_len = len(settings.prefix)
    states: dict[str, TransactionalState] = {}        # by input topic
    outputs: dict[str, tuple[str, str]] = {}          # input topic -> (history topic, dlq topic)
    positions: dict[TopicPartition, int] = {}         # committed by txstate, for the group
    committed: dict[TopicPartition, int] = {}
    consumer: AIOKafkaConsumer | None = None      # made in the worker's loop

    def make_consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level="read_committed",
            metadata_max_age_ms=int(RESCAN_S * 1000), max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS, session_timeout_ms=settings.session_timeout_s * 1000,
            heartbeat_interval_ms=max(1000, settings.session_timeout_s * 1000 // 3))

    def state_of(topic: str) -> TransactionalState:
        state = states.get(topic)
        if state is None:
            # One transactional producer per (topic, partition): partitions of different
            # topics may go to different workers.
            state = states[topic] = TransactionalState(
                settings.kafka_bootstrap, group=f"{group}-{topic[prefix_len:]}",
                changelog=settings.topic(topics.CDC_HISTORY_STATE),
                restore=lambda entries: restore(cfg, topic, entries),
                dump=lambda part: dump(topic, part), interval_s=settings.checkpoint_ms / 1000)
        return state

    async def outputs_of(topic: str) -> tuple[str, str]:
        pair = outputs.get(topic)
        if pair is None:
            count = len(consumer.partitions_for_topic(topic) or ())
            if count > settings.partitions:
                log.critical("%s has %d partitions, more than CLICKLOOP_PARTITIONS=%d (the state "
                             "changelog's): raise CLICKLOOP_PARTITIONS", topic, count, settings.partitions)
                os._exit(2)
            bare = topic[prefix_len:]
            history, dlq = topics.history_topic(bare), topics.dlq_topic(bare)
            await topics.ensure_topics(settings, (history, dlq))
            pair = outputs[topic] = (settings.topic(history), settings.topic(dlq))
            print(f"[{PROCESSOR}] reading {topic} into {pair[0]}", flush=True)
        return pair

    async def commit_positions(only=None) -> None:
        if consumer is None:
            return
        assigned = consumer.assignment()
        due = {tp: o for tp, o in positions.items()
               if tp in assigned and committed.get(tp) != o and (only is None or tp in only)}
        if due:
            await consumer.commit(due)
            committed.update(due)

    class Listener(ConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked) -> None:
            by_topic: dict[str, set[int]] = {}
            for tp in revoked:
                by_topic.setdefault(tp.topic, set()).add(tp.partition)
            for topic, parts in by_topic.items():
                state = states.get(topic)
                if state is not None:
                    async with state.lock:
                        await state.release(parts)
            try:
                await commit_positions(set(revoked))
            except Exception as exc:  # noqa: BLE001 (a hint only; the state knows its offsets)
                log.warning("offset commit on revoke failed: %r", exc)

        async def on_partitions_assigned(self, assigned) -> None:
            for tp in assigned:
                state_of(tp.topic).assigned.add(tp.partition)

    async def fold(tp: TopicPartition, records) -> None:
        topic = tp.topic
        state = state_of(topic)
        history_topic, dlq = await outputs_of(topic)
        async with state.lock:
            txn = await state.partition(tp.partition)
            part: PartitionHistory = txn.state
            history = part.history
            for record in records:
                offset = record.offset
                if offset < part.next_offset:
                    continue  # applied before a crash: its effects are in the restored state
                part.next_offset = offset + 1
                key, value = record.key, record.value
                try:
                    event = decode(key, value, record.headers)
                except Exception as exc:  # noqa: BLE001 (BadChangeEvent, and anything malformed)
                    reason = str(exc) if isinstance(exc, ValueError) else \
                        f"not a change event ({type(exc).__name__}: {exc})"
                    await txn.send(dlq, key=key, value=dlq_record(
                        topic, tp.partition, offset, reason, key, value, PROCESSOR))
                    continue
                if event is not None and event.op == "t":
                    # A truncate reaches every key: those of every partition held here.
                    for other in list(state.partitions.values()):
                        await _emit(other, history_topic, other.state.history.apply(event))
                    continue
                out = history.apply(event)
                if out.versions:
                    await _emit(txn, history_topic, out)
                for _, reason in out.late:
                    await txn.send(dlq, key=key, value=dlq_record(
                        topic, tp.partition, offset, f"late event: {reason}", key, value,
                        PROCESSOR))
            txn.pending_acks.append(_Ack(positions, tp, records[-1].offset + 1))
            state.pending_events += len(records)
            meter.update(len(records), now())
            state.maybe_checkpoint(now())

    @app.task
    async def consume() -> None:
        nonlocal consumer
        consumer = make_consumer()
        pattern = subscription(settings)
        consumer.subscribe(pattern=pattern, listener=Listener())
        await consumer.start()
        print(f"[{PROCESSOR}] subscribed to /{pattern}/ (new topics within {RESCAN_S:.0f} s)",
              flush=True)
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            except ConsumerStoppedError:
                return      # shutting down (on_shutdown stopped it)
            for tp, records in batches.items():
                if records:
                    await fold(tp, records)

    @app.timer(settings.checkpoint_ms / 1000)
    async def checkpoint() -> None:
        for state in list(states.values()):
            async with state.lock:
                state.maybe_checkpoint(now())

    @app.timer(1.0)
    async def commit_offsets() -> None:
        try:
            await commit_positions()
        except Exception as exc:  # noqa: BLE001 (a rebalance in progress: next time)
            log.info("offset commit skipped: %r", exc)

    @app.on_before_shutdown.connect
    async def on_shutdown(app, **kwargs) -> None:  # noqa: ARG001
        for state in list(states.values()):
            async with state.lock:
                await state.release(list(state.partitions))
        try:
            await commit_positions()
        finally:
            if consumer is not None:
                await consumer.stop()


async def _emit(txn, history_topic: str, out: Outputs) -> None:
    """Append the versions to the transaction, partitioned as Kafka's default partitioner
    would by key (`txn.append`: the hot path skips `send`'s await per record)."""
    count = txn.partition_counts.get(history_topic) or await txn.partition_count(history_topic)
    for version in out.versions:
        key = version["key_id"].encode()
        txn.append(history_topic, key_partition(key, count), key, orjson.dumps(version))


def offline_history(records: list[tuple[bytes | None, bytes | None, list]],
                    cfg: HistoryConfig = HistoryConfig()) -> tuple[list[dict], list[ChangeEvent]]:
    """What one uninterrupted run emits for one topic's records in order (one
    partition): the history rows, and the late events. For tests and the bench."""
    history, rows, late = TableHistory(cfg), [], []
    for key, value, headers in records:
        try:
            event = decode(key, value, headers)
        except ValueError:
            continue
        out = history.apply(event)
        rows += out.versions
        late += [e for e, _ in out.late]
    return rows, late
