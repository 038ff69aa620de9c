"""Faust agent `sessionize`: `clicks` → `sessions` (closed sessions), late events → `clicks.late`.

A thin loop over `streams.sessions.PartitionSessions`, one record (an envelope
of many events) per step, made exactly-once by `streams.txstate`: outputs and
the touched visitors' state are committed in one Kafka transaction per
checkpoint, with the input position, and input events are acked only after.
Bad records go to `clicks.dlq` with the reason and `topic[partition]@offset`.
"""
from __future__ import annotations

from functools import partial

import faust
import orjson

from services.settings import Settings
from streams import topics
from streams.app import now
from streams.codec import BadRecord, not_after
from streams.dlq import dlq_record
from streams.meter import Meter
from streams.sessions import PartitionSessions, SessionConfig
from streams.txstate import TransactionalState, dump_keyed, restore_keyed



def config(settings: Settings) -> SessionConfig:
    return SessionConfig(gap_ms=settings.session_gap_s * 1000,
                         grace_ms=settings.session_grace_s * 1000,
                         max_ms=settings.session_max_s * 1000,
                         retention_ms=settings.session_retention_s * 1000)




def build(app: faust.App, settings: Settings, meter: Meter) -> None:
    cfg = config(settings)
    clicks = app.topic(settings.topic(topics.CLICKS), key_serializer="raw", value_serializer="raw")
    sessions_topic = settings.topic(topics.SESSIONS)
    late_topic = settings.topic(topics.CLICKS_LATE)
    dlq_topic = settings.topic(topics.CLICKS_DLQ)
    state = TransactionalState(
        settings.kafka_bootstrap, group=app.conf.id,
        changelog=settings.topic(topics.SESSIONIZE_STATE),
        restore=lambda entries: restore_keyed(partial(PartitionSessions, cfg), entries), dump=dump_keyed,
        interval_s=settings.checkpoint_ms / 1000)

    state.attach(app, {clicks.get_topic_name()})

    @app.timer(settings.checkpoint_ms / 1000)
    async def checkpoint() -> None:
        async with state.lock:
            state.maybe_checkpoint(now())

    @app.agent(clicks, name="sessionize")
    async def sessionize(stream):
        async for record in stream.noack().events():
            msg = record.message
            async with state.lock:
                txn = await state.partition(msg.partition)
                part: PartitionSessions = txn.state
                txn.pending_acks.append(record)
                if msg.offset < part.next_offset:
                    continue  # applied before a crash: its effects are in the restored state
                try:
                    out = part.process_record(record.value, msg.offset + 1, not_after(
                        round(msg.timestamp * 1000), settings.max_clock_ahead_s))
                except BadRecord as exc:
                    part.next_offset = msg.offset + 1
                    await txn.send(dlq_topic, key=record.key, value=dlq_record(
                        msg.topic, msg.partition, msg.offset, str(exc), record.key,
                        record.value, "sessionize"))
                    continue
                if out.closed_json:
                    count = await txn.partition_count(sessions_topic)
                    for key, session, hash_ in out.closed_json:
                        txn.append(sessions_topic, (hash_ & 0x7FFFFFFF) % count, key, session)
                for event, reason in out.bad_json:
                    await txn.send(dlq_topic, key=record.key, value=dlq_record(
                        msg.topic, msg.partition, msg.offset, reason, record.key, event,
                        "sessionize"))
                for event, reason in out.late_json:
                    await txn.send(late_topic, key=record.key, value=orjson.dumps(
                        {"reason": reason, "position": f"{msg.topic}[{msg.partition}]@{msg.offset}",
                         "watermark": part.watermark, "event": orjson.Fragment(event)}))
                state.pending_events += out.events
                meter.update(out.events, now())
                state.maybe_checkpoint(now())
