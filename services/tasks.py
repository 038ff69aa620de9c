"""Background tasks of the services: stopping one the same way everywhere."""
from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task | None,
                          *expected: type[BaseException]) -> None:
    """Cancel a background task and wait until it has finished, so nothing it holds
    (a consumer, a producer) is closed under it. Its cancellation, and the `expected`
    errors it may end with while being stopped, are swallowed; any other error is raised."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, *expected):
        await task
