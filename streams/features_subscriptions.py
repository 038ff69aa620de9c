"""The `features` worker's subscription agents: `history.<table>` → group `subscription`
of `user:<user_id>` (streams/subscription_features.py has the rules).

History is keyed by the table's primary key; the fold needs all of one user's rows
together. So, like the item deltas through FEATURES_ITEMS:

- `features-subscriptions-route` reads `history.<CLICKLOOP_SUBSCRIPTIONS_TABLE>` and
  sends each row, reduced to what the features need, to FEATURES_SUBSCRIPTIONS
  keyed by its user (Kafka's default partitioner); the routed records and the
  history offset commit in one transaction per history partition (streams/txstate.py);
- `features-subscriptions` reads FEATURES_SUBSCRIPTIONS, folds each user's versions
  (state in the FEATURES_STATE changelog, keys `s:<user>`, with the input offset,
  one transaction per partition) and writes the changed users' groups to Redis
  through the worker's RedisWriter before each checkpoint.

Exactly once as the other agents: records below a restored offset are skipped.
Beyond that the fold is idempotent (the highest revision per version wins; a
re-delivered row changes nothing) and a restored partition writes every user once
again, so a crash between a commit and its Redis write loses nothing; an equal
timestamp overwrites with the same values.

Both inputs may have at most `CLICKLOOP_PARTITIONS` partitions (their state lives
in the same-numbered FEATURES_STATE partition).
"""
from __future__ import annotations

import asyncio
import logging
import threading

import faust
import orjson

from services.settings import Settings
from streams import topics
from streams.app import now
from streams.dlq import position
from streams.feature_store import USER_SUBSCRIPTION
from streams.features_state import EntityWrite
from streams.features_writer import RedisWriter
from streams.subscription_features import (GROUP, HistoryRouter, SubscriptionConfig,
                                           SubscriptionPartition, route)
from streams.txstate import TransactionalState

log = logging.getLogger("clickloop.features")


def config(settings: Settings) -> SubscriptionConfig:
    return SubscriptionConfig(settings.subscriptions_user_column, settings.subscriptions_status_column,
                              frozenset(settings.subscriptions_active))


def _ensure_history_topic(settings: Settings, name: str) -> None:
    """Create `history.<table>` when the cdc_history worker has not yet: the agent
    subscribes to it at start. In a thread: the caller's event loop is left alone."""
    done = threading.Thread(target=lambda: asyncio.run(topics.ensure_topics(settings, (name,))))
    done.start()
    done.join()


class SubscriptionAgents:
    """The two agents' states; `shutdown` commits both (call it before the writer drains)."""

    def __init__(self, app: faust.App, settings: Settings, writer: RedisWriter) -> None:
        cfg = config(settings)
        history_logical = topics.HISTORY_PREFIX + settings.subscriptions_table
        _ensure_history_topic(settings, history_logical)
        self.history_name = settings.topic(history_logical)
        self.routed_name = settings.topic(topics.FEATURES_SUBSCRIPTIONS)
        changelog = settings.topic(topics.FEATURES_STATE)
        interval_s = settings.checkpoint_ms / 1000
        self.flush_s = settings.features_flush_ms / 1000
        self.writer = writer
        self.router = TransactionalState(
            settings.kafka_bootstrap, group=f"{app.conf.id}-subscriptions-route", changelog=changelog,
            restore=HistoryRouter.restore, dump=lambda state: state.take_dirty(), interval_s=interval_s)
        self.users = TransactionalState(
            settings.kafka_bootstrap, group=f"{app.conf.id}-subscriptions", changelog=changelog,
            restore=lambda entries: SubscriptionPartition.restore(cfg, entries),
            dump=lambda part: part.take_dirty(), interval_s=interval_s)
        self.last_flush = 0.0
        history = app.topic(self.history_name, key_serializer="raw", value_serializer="raw")
        routed = app.topic(self.routed_name, key_serializer="raw", value_serializer="raw")
        router, users = self.router, self.users

        @app.agent(history, name="features-subscriptions-route")
        async def route_history(stream):
            async for record in stream.noack().events():
                msg = record.message
                async with router.lock:
                    txn = await router.partition(msg.partition)
                    state: HistoryRouter = txn.state
                    txn.pending_acks.append(record)
                    if msg.offset < state.next_offset(msg.topic):
                        continue
                    routed_row = None
                    try:
                        routed_row = route(orjson.loads(record.value), cfg)
                    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
                        log.warning("features: %s is not a history row (%r)",
                                    position(msg.topic, msg.partition, msg.offset), exc)
                    if routed_row is None:
                        state.unrouted += 1
                    else:
                        user, value = routed_row
                        await txn.send(self.routed_name, value, key=user.encode())
                    state.done(msg.topic, msg.offset + 1)
                    router.pending_events += 1

        @app.agent(routed, name="features-subscriptions")
        async def fold_users(stream):
            async for record in stream.noack().events():
                msg = record.message
                async with users.lock:
                    txn = await users.partition(msg.partition)
                    part: SubscriptionPartition = txn.state
                    txn.pending_acks.append(record)
                    if msg.offset < part.next_offset(msg.topic):
                        continue
                    try:
                        part.add_record(record.key.decode(), record.value, msg.topic, msg.offset + 1)
                    except (ValueError, AttributeError) as exc:   # written by this worker
                        part.skip(msg.topic, msg.offset + 1)
                        log.error("features: skipped %s: %s",
                                  position(msg.topic, msg.partition, msg.offset), exc)
                    users.pending_events += 1

        @app.timer(max(self.flush_s, 0.01))
        async def tick() -> None:
            await self.step(now())

        @app.on_partitions_revoked.connect
        async def on_revoked(app, revoked, **kwargs) -> None:  # noqa: ARG001 (signal signature)
            async with users.lock:
                self.flush(now(), force=True)
                await users.revoke(revoked, {self.routed_name})
            async with router.lock:
                await router.revoke(revoked, {self.history_name})

        @app.on_partitions_assigned.connect
        async def on_assigned(app, assigned, **kwargs) -> None:  # noqa: ARG001 (signal signature)
            users.assign(assigned, {self.routed_name})
            router.assign(assigned, {self.history_name})

    def flush(self, t: float, force: bool = False) -> None:
        """Queue the changed users' groups for Redis, then checkpoint (lock held): a
        checkpoint never commits a state whose write was not queued."""
        self.last_flush = t
        for txn in self.users.partitions.values():
            part: SubscriptionPartition = txn.state
            if part.has_work:
                for user, ts, values in part.flush():
                    self.writer.put(EntityWrite(USER_SUBSCRIPTION, user, ts, {GROUP: values}))
        self.writer.kick()
        self.users.maybe_checkpoint(t, force=force)

    async def step(self, t: float) -> None:
        async with self.router.lock:
            self.router.maybe_checkpoint(t)
        if t - self.last_flush >= self.flush_s:
            async with self.users.lock:
                self.flush(t)

    async def shutdown(self) -> None:
        async with self.router.lock:
            await self.router.release(list(self.router.partitions))
        async with self.users.lock:
            self.flush(now(), force=True)
            await self.users.release(list(self.users.partitions))
