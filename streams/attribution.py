"""Faust agent `attribution`: `exposures` + `clicks` → `rewards` (key = experiment id).

A thin loop over `streams.attribution_core.PartitionAttribution`, one record
per step, made exactly-once by `streams.txstate` as the sessionizer is: the
two inputs are co-partitioned by visitor, so partition p of both topics shares
one state, one changelog partition and one transactional producer; the state
keeps the next offset of each topic. Bad or late exposures go to
`exposures.dlq` with the reason and `topic[partition]@offset`; a bad `clicks`
record is the sessionizer's to dead-letter (it reads the same records), so
here it is only skipped and counted. A duplicate exposure (the same visitor
and request id again) is logged and not rewarded twice.
"""
from __future__ import annotations

import logging
from functools import partial

import faust
import orjson

from services.settings import Settings, SettingsError
from streams import topics
from streams.app import now
from streams.attribution_core import AttributionConfig, PartitionAttribution, decode_exposure
from streams.codec import BadRecord, not_after
from streams.dlq import dlq_record
from streams.meter import Meter
from streams.txstate import TransactionalState, dump_keyed, restore_keyed

log = logging.getLogger("clickloop.attribution")

# Rewards should reach the bandits quickly (README, "Performance": a reward burst
# is visible to the recommender within 2 s), so commit at least this often.
MAX_CHECKPOINT_MS = 250


def config(settings: Settings) -> AttributionConfig:
    if settings.attribution_retention_s <= settings.attribution_window_s + settings.attribution_lateness_s:
        raise SettingsError(
            f"CLICKLOOP_ATTRIBUTION_RETENTION_S={settings.attribution_retention_s} must exceed "
            f"CLICKLOOP_ATTRIBUTION_WINDOW_S + CLICKLOOP_ATTRIBUTION_LATENESS_S "
            f"({settings.attribution_window_s} + {settings.attribution_lateness_s})")
    return AttributionConfig(window_ms=settings.attribution_window_s * 1000,
                             lateness_ms=settings.attribution_lateness_s * 1000,
                             retention_ms=settings.attribution_retention_s * 1000)




def build(app: faust.App, settings: Settings, meter: Meter) -> None:
    cfg = config(settings)
    exposures_name = settings.topic(topics.EXPOSURES)
    clicks_name = settings.topic(topics.CLICKS)
    inputs = app.topic(exposures_name, clicks_name, key_serializer="raw", value_serializer="raw")
    rewards_topic = settings.topic(topics.REWARDS)
    dlq_topic = settings.topic(topics.EXPOSURES_DLQ)
    interval_ms = min(settings.checkpoint_ms, MAX_CHECKPOINT_MS)
    state = TransactionalState(
        settings.kafka_bootstrap, group=app.conf.id,
        changelog=settings.topic(topics.ATTRIBUTION_STATE),
        restore=lambda entries: restore_keyed(partial(PartitionAttribution, cfg), entries), dump=dump_keyed,
        interval_s=interval_ms / 1000)

    state.attach(app, {exposures_name, clicks_name})

    @app.timer(interval_ms / 1000)
    async def checkpoint() -> None:
        async with state.lock:
            state.maybe_checkpoint(now())

    async def send_rewards(txn, rewards) -> None:
        for reward in rewards:
            await txn.send(rewards_topic, key=reward["experiment"].encode(), value=orjson.dumps(reward))

    @app.agent(inputs, name="attribution")
    async def attribution(stream):
        async for record in stream.noack().events():
            msg = record.message
            async with state.lock:
                txn = await state.partition(msg.partition)
                part: PartitionAttribution = txn.state
                txn.pending_acks.append(record)
                which = "exposures" if msg.topic == exposures_name else "clicks"
                if msg.offset < part.next_offsets.get(which, 0):
                    continue  # applied before a crash: its effects are in the restored state
                part.next_offsets[which] = msg.offset + 1
                try:
                    if which == "exposures":
                        out, late = part.process_exposure(decode_exposure(record.value))
                        if late is not None:
                            raise BadRecord(late)
                        if out.duplicates:
                            log.info("duplicate exposure %s[%d]@%d, key %r: already attributed, "
                                     "not rewarded again", msg.topic, msg.partition, msg.offset,
                                     record.key)
                    else:
                        out = part.process_clicks_record(record.value, not_after(
                            round(msg.timestamp * 1000), settings.max_clock_ahead_s))
                except BadRecord as exc:
                    if which == "exposures":
                        await txn.send(dlq_topic, key=record.key, value=dlq_record(
                            msg.topic, msg.partition, msg.offset, str(exc), record.key,
                            record.value, "attribution"))
                    state.pending_events += 1   # commits the DLQ record (or the skip) soon
                    continue
                await send_rewards(txn, out.rewards)
                state.pending_events += out.events
                meter.update(out.events, now())
                state.maybe_checkpoint(now())
