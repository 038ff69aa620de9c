"""Shared fixtures. Integration fixtures start the real Kafka broker and Redis server
once per test session (services.infra: reused when already running); every test
then gets its own topic/key prefix, so tests never see each other's data."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from services.settings import Settings
from streams.topics import drop_topics


@pytest.fixture(scope="session")
def infra() -> Settings:
    from services import infra as local

    base = Settings.from_env()
    local.start_all(base)
    return base


@pytest.fixture
def settings(infra: Settings, tmp_path: Path):
    """A test's own prefix for topics and keys; its topics are deleted afterwards."""
    own = dataclasses.replace(infra, prefix=f"it-{uuid.uuid4().hex[:10]}.", partitions=1,
                              state_dir=tmp_path / "state")
    yield own
    # In a thread of its own: asyncio.run here would unset the session's event loop.
    cleanup = threading.Thread(target=lambda: asyncio.run(_cleanup(own)))
    cleanup.start()
    cleanup.join()


async def _cleanup(own: Settings) -> None:
    """Drop a test's topics and Redis keys: keys left behind make every later SCAN of
    the shared Redis slower (a features test scans it many times)."""
    import redis.asyncio as aioredis

    await drop_topics(own)
    redis = aioredis.Redis.from_url(own.redis_url)
    try:
        batch = [key async for key in redis.scan_iter(match=own.prefix + "*", count=1000)]
        for i in range(0, len(batch), 1000):
            await redis.unlink(*batch[i:i + 1000])
    except Exception:  # noqa: BLE001 (a test that stopped Redis on purpose leaves nothing to clean)
        pass
    finally:
        await redis.aclose()


@dataclasses.dataclass
class Workers:
    settings: Settings
    logdir: Path
    procs: dict = dataclasses.field(default_factory=dict)
    starts: int = 0

    def log_of(self, processor: str, start: int) -> Path:
        return self.logdir / f"{processor}-{start}.log"

    def start(self, processor: str, **env: str) -> subprocess.Popen:
        """Start a worker process; each start logs to its own file, `<processor>-<n>.log`."""
        self.starts += 1
        log = open(self.log_of(processor, self.starts), "ab")
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "worker", processor],
                                env={**os.environ, **self.settings.as_env(), **env},
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs[processor] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logdir.glob("*.log"))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def workers(settings: Settings, tmp_path: Path):
    running = Workers(settings, tmp_path)
    yield running
    running.stop()
