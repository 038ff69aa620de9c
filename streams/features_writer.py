"""Writes feature groups to Redis: one pipeline of EVALSHA(WRITE_SCRIPT) per flush.

The `features` worker is the only writer of its keys. Each entity's groups go
through `streams.feature_store.WRITE_SCRIPT` (atomic in Redis: a group older
than the stored `_ts:<group>` is skipped, the TTL is refreshed), one EVALSHA
per entity, all of a flush in one pipeline without MULTI (each script is atomic
on its own). The script is loaded once; after a Redis restart (NOSCRIPT) it is
loaded again and the refused calls are re-sent (the writes are idempotent).

Writes queue per key and group, the newest computation winning, so when Redis
is slow or down the queue holds one entry per entity, not one per event: the
worker carries on and the queue drains once Redis answers again. A group
skipped because Redis holds a newer timestamp (written before a restart, by
records the restarted worker is still replaying) is reported to its owner,
which recomputes the entity once its watermark has passed that timestamp.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from services.settings import Settings
from streams.feature_store import (FEATURE_SET_VERSION, REFUSED_VERSION, SKIPPED_OLDER,
                                   WRITE_SCRIPT, EntitySpec, GroupWrite, script_args)
from streams.features_state import EntityWrite

log = logging.getLogger("clickloop.features")

# Told (entity, ts) when Redis kept a newer write of the entity.
OnOlder = Callable[[str, int], None]


@dataclass(slots=True)
class _Pending:
    spec: EntitySpec
    entity: str
    groups: dict[str, GroupWrite]
    on_older: OnOlder | None


class RedisWriter:
    """Queues entity writes and sends them in pipelines; `kick()` starts a send."""

    def __init__(self, settings: Settings, redis: aioredis.Redis | None = None,
                 version: int = FEATURE_SET_VERSION, max_per_pipeline: int = 2000) -> None:
        self.settings, self.version, self.max_per_pipeline = settings, version, max_per_pipeline
        self.redis = redis or aioredis.Redis.from_url(settings.redis_url, max_connections=8,
                                                       socket_timeout=5, socket_connect_timeout=5)
        self.pending: dict[str, _Pending] = {}
        self._sha: str | None = None
        self._task: asyncio.Task | None = None
        self.written = self.skipped = self.refused = 0
        self.failures = 0

    def put(self, write: EntityWrite, on_older: OnOlder | None = None) -> None:
        """Queue a write; a newer computation of the same group replaces a queued one."""
        key = self.settings.redis_key(write.spec.kind, write.entity)
        pending = self.pending.get(key)
        if pending is None:
            pending = self.pending[key] = _Pending(write.spec, write.entity, {}, on_older)
        for group, values in write.groups.items():
            old = pending.groups.get(group)
            if old is None or write.ts >= old.ts:
                pending.groups[group] = GroupWrite(group, write.ts, values)

    def kick(self) -> None:
        """Send what is queued, unless a send is already running (it loops until empty)."""
        if self.pending and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self._run())

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until the queue is empty (shutdown); gives up after timeout_s."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.pending or (self._task is not None and not self._task.done()):
            self.kick()
            if asyncio.get_running_loop().time() > deadline:
                log.warning("features: %d entity writes not sent to Redis at shutdown (they are "
                            "rewritten from the replayed input)", len(self.pending))
                return
            await asyncio.sleep(0.01)

    async def _run(self) -> None:
        delay = 0.05
        while self.pending:
            try:
                await self.send_once()
                delay = 0.05
            except (RedisError, OSError) as exc:
                self.failures += 1
                log.warning("features: Redis write failed (%r); retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def send_once(self) -> None:
        """Send up to max_per_pipeline queued entities in one pipeline."""
        if self._sha is None:
            self._sha = await self.redis.script_load(WRITE_SCRIPT)
        keys = list(self.pending)[:self.max_per_pipeline]
        batch = [(k, self.pending.pop(k)) for k in keys]
        try:
            results = await self._execute(batch)
            if any(isinstance(r, NoScriptError) for r in results):
                log.warning("features: Redis lost the write script (restarted?): loading it again")
                self._sha = await self.redis.script_load(WRITE_SCRIPT)
                again = [(k, p) for (k, p), r in zip(batch, results) if isinstance(r, NoScriptError)]
                redone = iter(await self._execute(again))
                results = [next(redone) if isinstance(r, NoScriptError) else r for r in results]
        except BaseException:
            self._requeue(batch)
            raise
        failed = []
        for (key, p), codes in zip(batch, results):
            if isinstance(codes, Exception):
                failed.append((key, p))
                continue
            for group, code in zip(p.groups.values(), codes):
                if code == SKIPPED_OLDER:
                    self.skipped += 1
                    if p.on_older is not None:
                        p.on_older(p.entity, group.ts)
                elif code == REFUSED_VERSION:
                    self.refused += 1
                    log.error("features: %s holds a newer feature-set version than %d: not "
                              "overwritten (an old worker still running?)", key, self.version)
                else:
                    self.written += 1
        if failed:
            self._requeue(failed)
            sample = next(r for r in results if isinstance(r, Exception))
            raise RedisError(f"{len(failed)} of {len(batch)} writes failed, e.g. {sample!r}")

    async def _execute(self, batch: list[tuple[str, _Pending]]) -> list:
        pipe = self.redis.pipeline(transaction=False)
        for key, p in batch:
            pipe.evalsha(self._sha, 1, key, *script_args(p.spec, self.version, p.groups.values()))
        return await pipe.execute(raise_on_error=False)

    def _requeue(self, batch: list[tuple[str, _Pending]]) -> None:
        """Put failed writes back, under anything queued for the same key since."""
        for key, p in batch:
            newer = self.pending.get(key)
            if newer is None:
                self.pending[key] = p
            else:
                for group, w in p.groups.items():
                    if group not in newer.groups or newer.groups[group].ts < w.ts:
                        newer.groups[group] = w

    async def close(self) -> None:
        await self.redis.aclose()
