"""Faust agent `bandits`: `rewards` → Beta posteriors → `bandit.posteriors` (compacted,
key = experiment id).

A thin loop over `streams.bandits_core.PartitionBandits`, made exactly-once by
`streams.txstate`: the folded counts, the version of the last snapshot and the
snapshots themselves are committed in one transaction with the input position,
so a crash neither loses nor double-counts a reward and never publishes a
version twice. A snapshot is appended when due (`posterior_publish_ms` per
experiment, or at once when the stop verdict changes) and its transaction is
committed right away, not at the next checkpoint: readers see only committed
snapshots, and a reward burst must reach the recommender within about 2 s.
Bad rewards go to `rewards.dlq` with the reason and `topic[partition]@offset`.
"""
from __future__ import annotations

from functools import partial

import faust
import orjson

from services.settings import Settings
from streams import topics
from streams.app import now
from streams.bandits_core import BanditsConfig, PartitionBandits, decode_reward
from streams.codec import BadRecord
from streams.dlq import dlq_record
from streams.meter import Meter
from streams.txstate import TransactionalState, dump_keyed, restore_keyed

MAX_CHECKPOINT_MS = 250
TICK_S = 0.05       # how often due snapshots are looked for when no reward arrives
# The stop rule costs a Monte Carlo (about 3 ms for 10,000 draws of 3 arms): check it
# between snapshots at most this often per experiment.
CHECK_MIN_MS = 100


def config(settings: Settings) -> BanditsConfig:
    return BanditsConfig(publish_ms=settings.posterior_publish_ms,
                         check_ms=max(CHECK_MIN_MS, settings.posterior_publish_ms // 10))




def build(app: faust.App, settings: Settings, meter: Meter) -> None:
    cfg = config(settings)
    rewards = app.topic(settings.topic(topics.REWARDS), key_serializer="raw", value_serializer="raw")
    posteriors_topic = settings.topic(topics.BANDIT_POSTERIORS)
    dlq_topic = settings.topic(topics.REWARDS_DLQ)
    interval_ms = min(settings.checkpoint_ms, MAX_CHECKPOINT_MS)
    state = TransactionalState(
        settings.kafka_bootstrap, group=app.conf.id,
        changelog=settings.topic(topics.BANDITS_STATE),
        restore=lambda entries: restore_keyed(partial(PartitionBandits, cfg), entries), dump=dump_keyed,
        interval_s=interval_ms / 1000)
    urgent = [False]    # snapshots appended: commit them as soon as no commit is in flight

    state.attach(app, {rewards.get_topic_name()})

    async def publish(txn, part: PartitionBandits, now_s: float) -> None:
        for snap in part.due(int(now_s * 1000)):
            await txn.send(posteriors_topic, key=snap["experiment"].encode(), value=orjson.dumps(snap))
            urgent[0] = True

    def checkpoint_now(now_s: float) -> None:
        if urgent[0] and not state.committing:
            urgent[0] = False
            state.maybe_checkpoint(now_s, force=True)
        else:
            state.maybe_checkpoint(now_s)

    @app.timer(TICK_S)
    async def tick() -> None:
        async with state.lock:
            if state.assigned - state.partitions.keys():
                # Restored rewards not yet in a snapshot are published without waiting
                # for the partition's next reward (opening one opens all assigned).
                await state.partition(min(state.assigned - state.partitions.keys()))
            t = now()
            for txn in list(state.partitions.values()):
                await publish(txn, txn.state, t)
            checkpoint_now(t)

    @app.agent(rewards, name="bandits")
    async def bandits(stream):
        async for record in stream.noack().events():
            msg = record.message
            async with state.lock:
                txn = await state.partition(msg.partition)
                part: PartitionBandits = txn.state
                txn.pending_acks.append(record)
                if msg.offset < part.next_offset:
                    continue  # applied before a crash: its effects are in the restored state
                part.next_offset = msg.offset + 1
                try:
                    part.add(decode_reward(record.value))
                except BadRecord as exc:
                    await txn.send(dlq_topic, key=record.key, value=dlq_record(
                        msg.topic, msg.partition, msg.offset, str(exc), record.key,
                        record.value, "bandits"))
                    state.pending_events += 1   # commits the DLQ record soon
                    continue
                state.pending_events += 1
                t = now()
                meter.update(1, t)
                await publish(txn, part, t)
                checkpoint_now(t)
