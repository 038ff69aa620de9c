"""The SIGKILL loop shared by fault tests of output-producing workers."""
from __future__ import annotations

import asyncio
import random
import signal
import time

from aiokafka import AIOKafkaConsumer


async def kill_mid_stream(settings, workers, processor: str, output_topic: str, expected: int,
                          kills: int = 4, max_delay_s: float = 0.2, seed: int = 5) -> list[bytes]:
    """Start `processor`, SIGKILL it shortly after each run first commits something to
    `output_topic` (read committed), `kills` times; then let a last run finish. Returns
    every committed output value (duplicates included: the caller checks there are none)."""
    committed = AIOKafkaConsumer(output_topic, bootstrap_servers=settings.kafka_bootstrap,
                                 group_id=None, auto_offset_reset="earliest",
                                 isolation_level="read_committed")
    await committed.start()
    seen: list[bytes] = []

    async def count() -> int:
        for batch in (await committed.getmany(timeout_ms=100)).values():
            seen.extend(r.value for r in batch)
        return len(seen)

    rng = random.Random(seed)
    try:
        for _ in range(kills):
            before = await count()
            proc = workers.start(processor)
            deadline = time.monotonic() + 60
            while await count() == before:
                assert proc.poll() is None, workers.logs()
                assert time.monotonic() < deadline, "no progress in 60 s:\n" + workers.logs()
            await asyncio.sleep(rng.uniform(0, max_delay_s))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert await count() < expected, "killed after the work was done: use more events"
        workers.start(processor)
        deadline = time.monotonic() + 120
        while await count() < expected and time.monotonic() < deadline:
            pass
        await asyncio.sleep(2)  # anything extra would show up now
        await count()
    finally:
        await committed.stop()
    return seen
