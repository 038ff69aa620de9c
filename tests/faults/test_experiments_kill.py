"""Faults: the attribution and bandits workers killed with SIGKILL mid-stream, on the
real broker: no reward lost or doubled, every posterior equal to the offline recomputation."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import time

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from bench._common import produce
from streams import topics
from tests.integration.test_attribution_bandits import (ARMS, by_request, check_posteriors,
                                                        latest_posteriors, offline_rewards, traffic)

pytestmark = pytest.mark.integration


class Committed:
    """Committed records of a topic read so far (read_committed, from the start)."""

    def __init__(self, settings, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(settings.topic(topic), bootstrap_servers=settings.kafka_bootstrap,
                                         group_id=None, auto_offset_reset="earliest",
                                         isolation_level="read_committed")
        self.values: list[dict] = []

    async def count(self) -> int:
        for batch in (await self.consumer.getmany(timeout_ms=50)).values():
            self.values.extend(orjson.loads(r.value) for r in batch)
        return len(self.values)


async def test_sigkill_of_either_worker_neither_loses_nor_doubles_a_reward(settings, workers):
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=100, posterior_publish_ms=100,
                                   instance_id="kill-test")
    workers.settings = settings
    await topics.ensure_topics(settings)
    data = traffic(40_000, settings.partitions, seed=13, window_ms=settings.attribution_window_s * 1000)
    expected = offline_rewards(data, settings)
    assert len(expected) > 20_000
    await produce(settings, settings.topic(topics.EXPOSURES), data.exposures)
    await produce(settings, settings.topic(topics.CLICKS), data.clicks)

    rewards = Committed(settings, topics.REWARDS)
    snapshots = Committed(settings, topics.BANDIT_POSTERIORS)
    await rewards.consumer.start()
    await snapshots.consumer.start()
    rng = random.Random(5)
    kills = {"attribution": 0, "bandits": 0}

    def folded(values: list[dict]) -> int:
        """Rewards in the latest committed snapshot of each experiment."""
        return sum(sum(s["exposures"]) for s in {s["experiment"]: s for s in values}.values())

    async def kill_after_progress(processor: str, proc, progress: Committed, before: int,
                                  done_at: int, done=len) -> None:
        """Wait until this run of the worker committed something, SIGKILL it soon after."""
        deadline = time.monotonic() + 60
        while await progress.count() == before:
            assert proc.poll() is None, workers.logs()
            assert time.monotonic() < deadline, f"{processor}: no progress in 60 s\n" + workers.logs()
            await asyncio.sleep(0.02)
        await asyncio.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills[processor] += 1
        await progress.count()
        assert done(progress.values) < done_at, f"{processor} killed after its work was done: use more data"

    try:
        # Both workers run side by side, each killed three times mid-stream: the bandits
        # worker while rewards still arrive, so it cannot have finished its input.
        for _ in range(3):
            before = (await rewards.count(), await snapshots.count())
            attribution = workers.start("attribution")
            bandits = workers.start("bandits")
            await kill_after_progress("attribution", attribution, rewards, before[0], len(expected))
            await kill_after_progress("bandits", bandits, snapshots, before[1], len(expected), folded)
        workers.start("attribution")
        workers.start("bandits")
        deadline = time.monotonic() + 120
        while await rewards.count() < len(expected) and time.monotonic() < deadline:
            pass
        await asyncio.sleep(2)   # anything extra would show up now
        await rewards.count()
    finally:
        await rewards.consumer.stop()
        await snapshots.consumer.stop()
    assert kills == {"attribution": 3, "bandits": 3}
    ids = [r["request_id"] for r in rewards.values]
    assert len(ids) == len(set(ids)), "an exposure was rewarded twice"
    assert by_request(rewards.values) == by_request(expected), "rewards differ from the offline run"
    wanted = {e: sum(1 for r in expected if r["experiment"] == e) for e in ARMS}
    check_posteriors(await latest_posteriors(settings, wanted, timeout_s=60), expected)
