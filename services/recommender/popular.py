"""The popular list behind the fallback: kept in memory, refreshed in the background.

The features worker writes one `popular:<p>` hash per partition p (group
`top`: the partition's decayed item weights as of the group's timestamp, see
`streams.feature_windows.Popularity`). `merge_snapshots` (pure) merges the
fresh ones into one ranking as of now; stale or missing partitions are left
out, so a stopped worker's old list is not served as today's (unless no
partition is fresh: then the stale list, flagged, beats an empty answer). `PopularList`
re-reads the hashes every `popular_refresh_ms` in one pipeline with its own
timeout, outside the request path and outside the breakers: the fallback must
not depend on Redis answering now. On failure, or when no snapshot is usable (one
from the future, a half-life that is not positive, a negative score: skipped and
logged), it keeps the last good list.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.settings import Settings
from services.tasks import cancel_and_wait
from streams.feature_store import FEATURE_SET_VERSION, POPULAR, read
from streams.feature_windows import Popularity

log = logging.getLogger("clickloop.recommender.popular")
REMERGE_MS = 60_000
FUTURE_MS = 3_600_000   # a snapshot time further ahead of this host's clock is not believed


def merge_snapshots(hashes: Sequence[Mapping], now_ms: int, n: int) -> tuple[list[tuple[str, float]], int]:
    """The top n of the partition snapshots merged as of now, and how many fresh ones it holds.

    Only fresh snapshots are merged while any is fresh. When none is (the features
    worker stopped an hour ago, or a replay of old events), the stale ones are merged
    instead: the fallback must answer with something, and /health and /metrics show
    `fresh_partitions = 0`."""
    reads = []
    for raw in hashes:
        if raw:
            entity = read(POPULAR, FEATURE_SET_VERSION, raw, now_ms)
            group = entity.groups["top"]
            if group.status == "missing":
                continue
            if group.ts > now_ms + FUTURE_MS:   # no clock is that far off: not believed
                log.warning("popular snapshot skipped: its time %d is ahead of now (%d)", group.ts, now_ms)
                continue
            reads.append(group)
    fresh = sum(1 for g in reads if g.status == "fresh")
    merged: Popularity | None = None
    used = 0
    for group in reads:
        if fresh and group.status != "fresh":
            continue
        try:
            part = Popularity.from_snapshot(group.values, group.ts, capacity=max(n, 1))
            candidate = part if merged is None else Popularity(
                merged.half_life_ms, merged.capacity, merged.anchor, dict(merged.scores)).merge(part)
            candidate.top(1, now_ms)   # its scores must scale to now
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            log.warning("popular snapshot skipped: %r", exc)
            continue
        merged = candidate
        used += 1
    return (merged.top(n, now_ms) if merged is not None else []), (used if fresh else 0)


class PopularList:
    """The live popular items (best first) and when they were last refreshed."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = [settings.redis_key("popular", str(p)) for p in range(settings.partitions)]
        self.items: list[tuple[str, float]] = []
        self.fresh_partitions = 0
        self.refreshed_mono_ms: int | None = None
        self.failures = 0
        self._stamps: tuple = ()
        self._merged_mono_ms = 0
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        """Read every partition's snapshot once (one pipeline); raises on Redis errors."""
        pipe = self.redis.pipeline(transaction=False)
        for key in self.keys:
            pipe.hgetall(key)
        timeout = max(self.settings.popular_refresh_ms / 2000, self.settings.redis_budget_ms / 1000)
        async with asyncio.timeout(timeout):
            hashes = await pipe.execute()
        # Merging costs milliseconds on the event loop: skip it while no partition's
        # snapshot changed (decay scales every score alike, so the order holds), unless
        # the list is old enough for a partition to have turned stale meanwhile.
        stamps = tuple(h.get(b"_ts:top") for h in hashes)
        now_mono = time.monotonic_ns() // 1_000_000
        if stamps != self._stamps or now_mono - self._merged_mono_ms >= REMERGE_MS:
            items, fresh = merge_snapshots(hashes, int(time.time() * 1000),
                                           self.settings.popular_items)
            # Nothing usable (every snapshot gone or refused): the last list, flagged stale.
            self.items, self.fresh_partitions = items or self.items, fresh
            self._stamps, self._merged_mono_ms = stamps, now_mono
        self.refreshed_mono_ms = now_mono

    def age_ms(self) -> int | None:
        if self.refreshed_mono_ms is None:
            return None
        return time.monotonic_ns() // 1_000_000 - self.refreshed_mono_ms

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except (RedisError, OSError, TimeoutError) as exc:
                self.failures += 1
                log.debug("popular refresh failed: %r", exc)
            except Exception:  # noqa: BLE001 (bad data must not end the refreshes for good)
                self.failures += 1
                log.exception("popular refresh failed")
            await asyncio.sleep(self.settings.popular_refresh_ms / 1000)

    async def start(self) -> None:
        try:
            await self.refresh()
        except (RedisError, OSError, TimeoutError) as exc:
            self.failures += 1
            log.warning("first popular refresh failed (serving without it until Redis answers): %r", exc)
        except Exception:  # noqa: BLE001 (the service starts; the refreshes go on)
            self.failures += 1
            log.exception("first popular refresh failed")
        self._task = asyncio.create_task(self._run(), name="popular-refresh")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
