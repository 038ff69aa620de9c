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


@dataclasses.dataclass(frozen=True)
class S3:
    """An S3 endpoint for the object-storage tests and its bucket."""
    endpoint: str
    bucket: str = "clickloop-it"

    def uri(self, prefix: str) -> str:
        """A pyarrow URI under the bucket that any process (workers, `clickloop train`) opens."""
        return (f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"
                f"&region=us-east-1")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server (S3's REST API over real HTTP, objects in memory) in its own
    process, started once per session, with one bucket. pyarrow's S3 client (the AWS
    C++ SDK) talks to it as to S3; credentials come from the environment as on a
    real cluster (moto accepts any), and child processes inherit them."""
    import pyarrow.fs as pafs

    from services.infra import Service, free_port, port_open, wait_ready

    for name, value in (("AWS_ACCESS_KEY_ID", "clickloop-test"), ("AWS_SECRET_ACCESS_KEY", "clickloop-test"),
                        ("AWS_EC2_METADATA_DISABLED", "true")):
        os.environ.setdefault(name, value)
    svc = Service("moto", "127.0.0.1", free_port(), tmp_path_factory.mktemp("s3"))
    log = open(svc.log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", svc.host, "-p", str(svc.port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(lambda: port_open(svc.host, svc.port), svc, proc, 30)
        endpoint = S3(f"{svc.host}:{svc.port}")
        pafs.S3FileSystem(endpoint_override=endpoint.endpoint, scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(endpoint.bucket)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
