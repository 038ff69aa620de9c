"""TurnBatch: jobs submitted in one turn of the event loop run together on the next."""
from __future__ import annotations

import asyncio

import pytest

from services.recommender.turn_batch import TurnBatch


async def test_jobs_of_one_turn_run_together_in_order_on_the_next_turn():
    batch: TurnBatch[int] = TurnBatch()
    ran: list[int] = []

    def job(i: int):
        def run() -> int:
            ran.append(i)
            return i * 10
        return run

    futures = [batch.submit(job(i)) for i in range(5)]
    assert ran == []                    # nothing runs in the turn that submits
    assert await asyncio.gather(*futures) == [0, 10, 20, 30, 40]
    assert ran == [0, 1, 2, 3, 4]
    assert (batch.batches, batch.jobs) == (1, 5)


async def test_tasks_resumed_in_the_same_turn_share_a_batch():
    batch: TurnBatch[int] = TurnBatch()
    gate = asyncio.get_running_loop().create_future()

    async def request(i: int) -> int:
        await gate                       # like replies arriving in one read
        return await batch.submit(lambda: i)

    tasks = [asyncio.create_task(request(i)) for i in range(8)]
    await asyncio.sleep(0)
    gate.set_result(None)
    assert await asyncio.gather(*tasks) == list(range(8))
    assert (batch.batches, batch.jobs) == (1, 8)
    assert await batch.submit(lambda: 99) == 99   # a later turn: a batch of its own
    assert (batch.batches, batch.jobs) == (2, 9)


async def test_a_failing_job_fails_only_its_own_caller():
    batch: TurnBatch[int] = TurnBatch()

    def broken() -> int:
        raise ValueError("bad model")

    first, bad, last = batch.submit(lambda: 1), batch.submit(broken), batch.submit(lambda: 3)
    assert await first == 1 and await last == 3
    with pytest.raises(ValueError, match="bad model"):
        await bad


async def test_a_job_whose_caller_gave_up_is_skipped():
    batch: TurnBatch[int] = TurnBatch()
    ran: list[str] = []
    gone = batch.submit(lambda: ran.append("gone") or 1)
    kept = batch.submit(lambda: ran.append("kept") or 2)
    gone.cancel()
    assert await kept == 2
    assert ran == ["kept"] and batch.jobs == 1
