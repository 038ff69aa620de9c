"""Faust agent `sessionize`: `clicks` → `sessions` (closed sessions), late events → `clicks.late`.

The agent is a thin loop over `streams.sessions.PartitionSessions`: decode a
record (one visitor's events), fold it in, persist the sessions it touched in
the `open-sessions` table (changelogged, so a restarted worker resumes), and
send what closed. Bad records go to `clicks.dlq` with the reason and position.
"""
from __future__ import annotations

import orjson

import faust

from services.settings import Settings
from streams import topics
from streams.app import now
from streams.codec import BadRecord, decode_clicks
from streams.dlq import dlq_record
from streams.meter import Meter
from streams.sessions import OpenSession, PartitionSessions

WATERMARK = "\x00watermark"


def build(app: faust.App, settings: Settings, meter: Meter) -> None:
    clicks = app.topic(settings.topic(topics.CLICKS), key_serializer="raw", value_serializer="raw")
    sessions = app.topic(settings.topic(topics.SESSIONS), key_serializer="raw", value_serializer="raw")
    late = app.topic(settings.topic(topics.CLICKS_LATE), key_serializer="raw", value_serializer="raw")
    dlq = app.topic(settings.topic(topics.CLICKS_DLQ), key_serializer="raw", value_serializer="raw")
    # key: "<partition>/<visitor>" (and "<partition>/\0watermark"), value: JSON state.
    table = app.Table("open-sessions", key_type=bytes, value_type=bytes,
                      partitions=settings.partitions)
    live: dict[int, PartitionSessions] = {}

    def load(partition: int) -> PartitionSessions:
        """The partition's open sessions as the (recovered) table holds them."""
        prefix = f"{partition}/"
        opened, watermark = {}, -1
        for key, value in table.items():
            key = key.decode() if isinstance(key, bytes) else key
            if not key.startswith(prefix):
                continue
            visitor = key[len(prefix):]
            if visitor == WATERMARK:
                watermark = int(value)
            else:
                opened[visitor] = OpenSession.from_state(orjson.loads(value))
        return PartitionSessions(settings.session_gap_ms, opened, watermark)

    @app.on_partitions_revoked.connect
    async def forget(app, revoked, **kwargs) -> None:  # noqa: ARG001 (signal signature)
        for tp in revoked:
            live.pop(tp.partition, None)

    @app.agent(clicks, name="sessionize")
    async def sessionize(stream):
        async for record in stream.events():
            msg = record.message
            try:
                events = decode_clicks(record.value)
            except BadRecord as exc:
                await dlq.send(key=record.key, value=dlq_record(
                    msg.topic, msg.partition, msg.offset, str(exc), record.key, record.value,
                    "sessionize"))
                continue
            part = live.get(msg.partition)
            if part is None:
                part = live[msg.partition] = load(msg.partition)
            out = part.process(events)
            prefix = f"{msg.partition}/"
            for visitor in out.touched:
                state = part.open.get(visitor)
                key = (prefix + visitor).encode()
                if state is None:
                    table.pop(key, None)
                else:
                    table[key] = orjson.dumps(state.to_state())
            table[(prefix + WATERMARK).encode()] = str(part.watermark).encode()
            for session in out.closed:
                await sessions.send(key=session["visitor"].encode(), value=orjson.dumps(session))
            for event in out.late:
                await late.send(key=record.key, value=orjson.dumps(
                    {"reason": "event older than its visitor's closed session", "event": event}))
            meter.update(len(events), now())
