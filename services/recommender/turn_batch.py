"""Scoring batched per turn of the event loop: the requests ready together score together.

Under load the replies of many requests' Redis reads arrive in one read of the
socket (feature_client.py), so their handlers resume in the same turn of the
event loop; each then scores its visitor against the model. Interleaved with
the rest of each request (aiohttp, the profile, the body, the exposure), every
scoring streamed the 640 KB int8 item matrix into a 1 MB L2 and the rest of
the request then ran on an evicted cache: at saturation a score took ~41 µs of
wall time in place against 15-20 µs warm, and the requests around it paid
more again. `TurnBatch` collects the scorings submitted during one turn and
runs them back to back at the start of the next, so the matrix is loaded once
per batch and the interpreter's working set once per batch too: 18 % less CPU
per request at saturation in an alternated series (batch ~4-5 requests with
32 connections; README, Performance). At a low rate a batch is one request:
one more turn of the loop, a few microseconds.

Jobs are plain functions; each job's result or exception goes to its own
future, in submission order, and a job whose caller gave up (its future
cancelled) is skipped.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class TurnBatch(Generic[T]):
    """`await batch.submit(job)`: job() runs with the others of this turn, on the next."""

    __slots__ = ("_jobs", "batches", "jobs")

    def __init__(self) -> None:
        self._jobs: list[tuple[Callable[[], T], asyncio.Future[T]]] = []
        self.batches = 0   # batches run
        self.jobs = 0      # jobs run in them

    def submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if not self._jobs:
            loop.call_soon(self._run)   # after every callback already ready this turn
        self._jobs.append((job, fut))
        return fut

    def _run(self) -> None:
        jobs, self._jobs = self._jobs, []
        self.batches += 1
        for job, fut in jobs:
            if fut.cancelled():
                continue
            self.jobs += 1
            try:
                fut.set_result(job())
            except Exception as exc:  # the caller decides (a broken model: its fallback)
                fut.set_exception(exc)
