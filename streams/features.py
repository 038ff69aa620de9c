"""Faust agents of the `features` worker: `clicks` + `sessions` → online features in Redis
(the only writer of the `user:`, `item:` and `popular:` hashes; layout in
streams/feature_store.py, README "Redis layout").

Two agents (and two for subscriptions, below), each a thin loop over a pure partition state (streams/features_state.py)
made exactly-once by streams/txstate.py:

- `features-users` reads `clicks` and `sessions` (co-partitioned by visitor, so
  partition p of both feeds one `UserPartition`): user windows, the
  partition's popularity (`popular:<p>`), and the item deltas, which it sends
  on to FEATURES_ITEMS, grouped by the item's partition, with its watermark;
- `features-items` reads FEATURES_ITEMS: each item is counted by the one
  partition that owns it (`ItemPartition`), whatever visitor partitions its
  events came from.
- `features-subscriptions-route` and `features-subscriptions`: the history of
  CLICKLOOP_SUBSCRIPTIONS_TABLE, repartitioned by user, folded into the
  `subscription` group of `user:` (streams/features_subscriptions.py).

Every `features_flush_ms` the pending deltas are applied to the state at the
partition's watermark and the changed entities (touched, or whose windows
dropped a bucket) are queued for Redis (streams/features_writer.py): Redis sees
an event within about that long after it was read, without waiting for the
Kafka commit. Every `checkpoint_ms` the state's changed entries, the next input
offsets and the item-delta records are committed in one Kafka transaction per
input partition; only then are the inputs acked. After a crash the state is
restored from its changelog and the records after the committed offsets are
applied again: Redis gets the same values again (a group is written whole,
with its event-time timestamp; an equal timestamp overwrites, an older one
never does), so nothing is counted twice.

Bad records go to `clicks.dlq` / `sessions.dlq` with the reason and
`topic[partition]@offset`; bad events inside a good `clicks` record are
skipped here (the sessionizer dead-letters them, once).
"""
from __future__ import annotations

import asyncio
import logging

import faust

from services.settings import Settings
from streams import topics
from streams.app import now
from streams.codec import BadRecord, decode_clicks, decode_session, not_after
from streams.dlq import dlq_record, position
from streams.features_state import (ItemPartition, UserPartition, encode_item_deltas,
                                    group_item_deltas, session_problem)
from streams.features_subscriptions import SubscriptionAgents
from streams.features_writer import RedisWriter
from streams.meter import Meter
from streams.txstate import TransactionalState

log = logging.getLogger("clickloop.features")
PROCESSOR = "features"
# A partition's popularity snapshot (sorting up to 2 x CLICKLOOP_POPULAR_ITEMS scores) is
# written at most this often: it was 6 % of the worker's time at every flush, and the
# recommender refreshes its popular list every CLICKLOOP_POPULAR_REFRESH_MS (2 s) anyway.
POPULAR_EVERY_S = 1.0


def build(app: faust.App, settings: Settings, meter: Meter) -> None:
    clicks_name = settings.topic(topics.CLICKS)
    sessions_name = settings.topic(topics.SESSIONS)
    items_name = settings.topic(topics.FEATURES_ITEMS)
    dlqs = {clicks_name: settings.topic(topics.CLICKS_DLQ),
            sessions_name: settings.topic(topics.SESSIONS_DLQ)}
    inputs = app.topic(clicks_name, sessions_name, key_serializer="raw", value_serializer="raw")
    item_input = app.topic(items_name, key_serializer="raw", value_serializer="raw")
    changelog = settings.topic(topics.FEATURES_STATE)
    # Users commit often: the item deltas they send reach the items agent only then.
    user_interval_s = settings.features_commit_ms / 1000
    interval_s = settings.checkpoint_ms / 1000
    flush_s = settings.features_flush_ms / 1000
    writer = RedisWriter(settings)
    # Third and fourth agents: the `subscription` group from history.<table>
    # (streams/features_subscriptions.py); their own states, the same writer.
    subscriptions = SubscriptionAgents(app, settings, writer)
    users = TransactionalState(
        settings.kafka_bootstrap, group=app.conf.id, changelog=changelog,
        restore=lambda entries: UserPartition.restore(entries, settings.popular_items),
        dump=lambda part: part.take_dirty(), interval_s=user_interval_s)
    # Its own transactional ids (the group is part of them) and changelog keys (i:, see
    # features_state): both states share the FEATURES_STATE partitions without colliding.
    items = TransactionalState(
        settings.kafka_bootstrap, group=f"{app.conf.id}-items", changelog=changelog,
        restore=ItemPartition.restore, dump=lambda part: part.take_dirty(), interval_s=interval_s)
    last_flush = {"users": 0.0, "items": 0.0, "popular": 0.0}
    # When the oldest record not yet flushed was read (None: nothing pending). Its flush is
    # armed at once, so an event reaches Redis at most flush_ms after it was read, also
    # when no further record comes; under load the agent flushes inline when due.
    pending_since: dict[str, float | None] = {"users": None, "items": None}

    armed: set[asyncio.Task] = set()      # the loop keeps only weak references to tasks

    # Item deltas arrive in bursts, when a users transaction commits (every
    # features_commit_ms): flushed 10 ms after a burst begins, not flush_ms, since
    # they have waited for that commit already.
    delay_s = {"users": flush_s, "items": min(flush_s, 0.01)}

    def arm(kind: str, t: float) -> None:
        if pending_since[kind] is None:
            pending_since[kind] = t
            asyncio.get_running_loop().call_later(delay_s[kind], start_flush, kind)

    def start_flush(kind: str) -> None:
        task = asyncio.ensure_future(flush_when_due(kind))
        armed.add(task)
        task.add_done_callback(armed.discard)

    async def flush_when_due(kind: str) -> None:
        if kind == "users":
            async with users.lock:
                if pending_since["users"] is not None:
                    await flush_users(now())
        else:
            async with items.lock:
                if pending_since["items"] is not None:
                    await flush_items(now())

    async def flush_users(t: float, force: bool = False) -> None:
        """Apply pending deltas, queue Redis writes, send item deltas; then checkpoint.
        Always in this order: a cut must never see records that are still pending."""
        last_flush["users"] = t
        pending_since["users"] = None
        snapshots = force or t - last_flush["popular"] >= POPULAR_EVERY_S
        if snapshots:
            last_flush["popular"] = t
        for p, txn in users.partitions.items():
            part: UserPartition = txn.state
            if part.has_work:
                await flush_partition(txn, part)
            if snapshots and (popular := part.popular(p)) is not None:
                writer.put(popular)
        writer.kick()
        users.maybe_checkpoint(t, force=force)

    async def flush_partition(txn, part: UserPartition) -> None:
        """One partition's flush: its Redis writes, and its item deltas with its watermark."""
        before = part.watermark
        out = part.flush()
        for write in out.writes:
            writer.put(write, part.refused)
        if out.item_deltas or out.watermark > before:
            count = await txn.partition_count(items_name)
            grouped = group_item_deltas(out.item_deltas, count)
            # Every item partition hears the watermark, so its windows move on.
            for q in range(count) if out.watermark > before else grouped:
                deltas = grouped.get(q, {})
                key = next(iter(deltas)).encode() if len(deltas) == 1 else None
                txn.append(items_name, q, key, encode_item_deltas(out.watermark, deltas))

    async def flush_items(t: float, force: bool = False) -> None:
        last_flush["items"] = t
        pending_since["items"] = None
        for txn in items.partitions.values():
            part: ItemPartition = txn.state
            if part.has_work:
                for write in part.flush().writes:
                    writer.put(write, part.refused)
        writer.kick()
        items.maybe_checkpoint(t, force=force)

    async def dead_letter(txn, record, reason: str) -> None:
        msg = record.message
        await txn.send(dlqs[msg.topic], key=record.key, value=dlq_record(
            msg.topic, msg.partition, msg.offset, reason, record.key, record.value, PROCESSOR))

    @app.on_partitions_revoked.connect
    async def on_revoked(app, revoked, **kwargs) -> None:  # noqa: ARG001 (signal signature)
        async with users.lock:
            await flush_users(now(), force=True)
            await users.revoke(revoked, {clicks_name})
        async with items.lock:
            await flush_items(now())
            await items.revoke(revoked, {items_name})

    @app.on_partitions_assigned.connect
    async def on_assigned(app, assigned, **kwargs) -> None:  # noqa: ARG001 (signal signature)
        users.assign(assigned, {clicks_name})
        items.assign(assigned, {items_name})

    # For what no record arms: refused writes to redo, popularity snapshots, commits.
    @app.timer(max(flush_s, 0.01))
    async def tick() -> None:
        t = now()
        if t - last_flush["users"] >= flush_s:
            async with users.lock:
                await flush_users(t)
        if t - last_flush["items"] >= flush_s:
            async with items.lock:
                await flush_items(t)

    @app.agent(inputs, name="features-users")
    async def from_inputs(stream):
        async for record in stream.noack().events():
            msg = record.message
            async with users.lock:
                txn = await users.partition(msg.partition)
                part: UserPartition = txn.state
                txn.pending_acks.append(record)
                if msg.offset < part.next_offset(msg.topic):
                    continue  # applied before a crash: its effects are in the restored state
                try:
                    if msg.topic == clicks_name:
                        events = decode_clicks(record.value)
                        part.add_clicks(events, msg.topic, msg.offset + 1, not_after(
                            round(msg.timestamp * 1000), settings.max_clock_ahead_s))
                        n = len(events)
                    else:
                        session = decode_session(record.value)
                        problem = session_problem(session)
                        if problem is not None:
                            raise BadRecord(problem)
                        part.add_session(session, msg.topic, msg.offset + 1)
                        n = 1
                except BadRecord as exc:
                    part.skip(msg.topic, msg.offset + 1)
                    await dead_letter(txn, record, str(exc))
                    continue
                except Exception as exc:  # a rule that failed on a value no check foresaw
                    # Never an agent crash (Faust would move past the record silently,
                    # its events after the failing one lost): the record goes to the DLQ
                    # with the error, the worker carries on.
                    log.exception("features: %s failed", position(msg.topic, msg.partition, msg.offset))
                    part.skip(msg.topic, msg.offset + 1)
                    await dead_letter(txn, record, f"processing failed: {exc!r}")
                    continue
                users.pending_events += n
                t = now()
                meter.update(n, t)
                arm("users", t)
                if t - pending_since["users"] >= flush_s:  # type: ignore[operator]
                    await flush_users(t)

    @app.agent(item_input, name="features-items")
    async def from_items(stream):
        async for record in stream.noack().events():
            msg = record.message
            async with items.lock:
                txn = await items.partition(msg.partition)
                part: ItemPartition = txn.state
                txn.pending_acks.append(record)
                if msg.offset < part.next_offset(msg.topic):
                    continue
                try:
                    items.pending_events += max(1, part.add_record(record.value, msg.topic,
                                                                   msg.offset + 1))
                except BadRecord as exc:   # written by this worker: should never happen
                    part.skip(msg.topic, msg.offset + 1)
                    log.error("features: skipped %s: %s",
                              position(msg.topic, msg.partition, msg.offset), exc)
                    continue
                t = now()
                arm("items", t)
                if t - pending_since["items"] >= delay_s["items"]:  # type: ignore[operator]
                    await flush_items(t)

    @app.on_before_shutdown.connect
    async def on_shutdown(app, **kwargs) -> None:  # noqa: ARG001
        async with users.lock:
            await flush_users(now(), force=True)
            await users.release(list(users.partitions))
        async with items.lock:
            await flush_items(now())
            await items.release(list(items.partitions))
        await subscriptions.shutdown()
        await writer.drain()
        await writer.close()
