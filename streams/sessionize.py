"""Faust agent `sessionize`: `clicks` → `sessions` (closed sessions), late events → `clicks.late`.

A thin loop over `streams.sessions.PartitionSessions`, one record (an envelope
of many events) per step, made exactly-once by `streams.txstate`: outputs and
the touched visitors' state are committed in one Kafka transaction per
checkpoint, with the input position, and input events are acked only after.
Bad records go to `clicks.dlq` with the reason and `topic[partition]@offset`.
"""
from __future__ import annotations

import faust
import orjson

from services.settings import Settings
from streams import topics
from streams.app import now
from streams.codec import BadRecord, decode_clicks
from streams.dlq import dlq_record
from streams.meter import Meter
from streams.sessions import PartitionSessions, SessionConfig, VisitorState
from streams.txstate import TransactionalState

META = b"\x00meta"


def config(settings: Settings) -> SessionConfig:
    return SessionConfig(gap_ms=settings.session_gap_s * 1000,
                         grace_ms=settings.session_grace_s * 1000,
                         max_ms=settings.session_max_s * 1000)


def restore(cfg: SessionConfig, entries: dict[bytes, bytes]) -> PartitionSessions:
    meta = orjson.loads(entries.pop(META)) if META in entries else {}
    visitors = {k.decode(): VisitorState.from_state(orjson.loads(v)) for k, v in entries.items()}
    return PartitionSessions(cfg, visitors, **meta)


def dump(part: PartitionSessions, dirty: set[str]) -> list[tuple[bytes, bytes | None]]:
    out: list[tuple[bytes, bytes | None]] = []
    for visitor in dirty:
        state = part.visitors.get(visitor)
        out.append((visitor.encode(), None if state is None else orjson.dumps(state.to_state())))
    out.append((META, orjson.dumps(part.meta())))
    return out


def build(app: faust.App, settings: Settings, meter: Meter) -> None:
    cfg = config(settings)
    clicks = app.topic(settings.topic(topics.CLICKS), key_serializer="raw", value_serializer="raw")
    sessions_topic = settings.topic(topics.SESSIONS)
    late_topic = settings.topic(topics.CLICKS_LATE)
    dlq_topic = settings.topic(topics.CLICKS_DLQ)
    state = TransactionalState(
        settings.kafka_bootstrap, group=app.conf.id,
        changelog=settings.topic(topics.SESSIONIZE_STATE),
        restore=lambda entries: restore(cfg, entries), dump=dump,
        interval_s=settings.checkpoint_ms / 1000)

    @app.on_partitions_revoked.connect
    async def on_revoked(app, revoked, **kwargs) -> None:  # noqa: ARG001 (signal signature)
        async with state.lock:
            await state.release(tp.partition for tp in revoked if tp.topic == clicks.get_topic_name())

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
                    events = decode_clicks(record.value)
                except BadRecord as exc:
                    part.next_offset = msg.offset + 1
                    await txn.send(dlq_topic, key=record.key, value=dlq_record(
                        msg.topic, msg.partition, msg.offset, str(exc), record.key,
                        record.value, "sessionize"))
                    continue
                out = part.process(events, msg.offset + 1)
                txn.dirty |= out.touched
                for session in out.closed:
                    await txn.send(sessions_topic, key=session["visitor"].encode(),
                                   value=orjson.dumps(session))
                for i, (event, reason) in enumerate(out.bad):
                    await txn.send(dlq_topic, key=record.key, value=dlq_record(
                        msg.topic, msg.partition, msg.offset, reason, record.key,
                        orjson.dumps(event), "sessionize"))
                for event, reason in out.late:
                    await txn.send(late_topic, key=record.key, value=orjson.dumps(
                        {"reason": reason, "position": f"{msg.topic}[{msg.partition}]@{msg.offset}",
                         "watermark": part.watermark, "event": event}))
                state.pending_events += len(events)
                meter.update(len(events), now())
                state.maybe_checkpoint(now())

    @app.on_before_shutdown.connect
    async def on_shutdown(app, **kwargs) -> None:  # noqa: ARG001
        async with state.lock:
            await state.release(list(state.partitions))
