"""Synthetic models and features for demos, tests and benchmarks (not used when serving).

Models are written with the real artifact writer and announced on `models`
exactly as `clickloop train` announces them; features are written with the
features worker's own Lua script (`streams.feature_store.WRITE_SCRIPT`), so
what the recommender reads here is byte for byte what it reads in production.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from services.model import artifact as artifacts
from services.model.als import AlsParams
from services.settings import Settings
from streams import topics
from streams.feature_store import (FEATURE_SET_VERSION, POPULAR, USER, WRITE_SCRIPT, GroupWrite,
                                   script_args)


def item_id(j: int) -> str:
    return f"item-{j:05d}"


def user_id(u: int) -> str:
    return f"user-{u:05d}"


def random_model(root: str | Path, name: str, version: str, n_items: int = 1000, factors: int = 16,
                 n_users: int = 100, seed: int = 0) -> artifacts.Artifact:
    """A model artifact with random factors (items `item-00000`…, users `user-00000`…)."""
    rng = np.random.default_rng(seed)
    manifest = artifacts.Manifest(
        name=name, version=version, created_ms=int(time.time() * 1000), data_range=None,
        params=AlsParams(factors=factors).as_dict(), metrics={"synthetic": True},
        item_ids=[item_id(j) for j in range(n_items)])
    arrays = {
        "item_factors": rng.standard_normal((n_items, factors)).astype(np.float32) / np.sqrt(factors),
        "user_factors": rng.standard_normal((n_users, factors)).astype(np.float32) / np.sqrt(factors),
        "user_ids": np.array([user_id(u) for u in range(n_users)]),
        "item_popularity": rng.zipf(1.5, n_items).astype(np.float32),
    }
    return artifacts.write(root, manifest, arrays)


async def announce(settings: Settings, art: artifacts.Artifact) -> None:
    """Announce an artifact on `models` as the trainer does (key = name)."""
    await topics.ensure_topics(settings, (topics.MODELS,))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic(topics.MODELS),
                                     orjson.dumps(artifacts.announcement(art)),
                                     key=art.manifest.name.encode())
    finally:
        await producer.stop()


def user_writes(recent: Sequence[tuple[str, str, int]], ts: int) -> list[GroupWrite]:
    """A user's `activity` and `recent` groups as of ts."""
    return [GroupWrite("activity", ts, {"searches_7d": 1, "searches_30d": 2, "sessions_7d": 1,
                                        "avg_session_ms_30d": 60_000.0, "last_seen": ts}),
            GroupWrite("recent", ts, {"items": [list(r) for r in recent]})]


async def write_user(redis: aioredis.Redis, settings: Settings, visitor: str,
                     recent: Sequence[tuple[str, str, int]], ts: int) -> None:
    """Write a user hash as the features worker does."""
    await redis.eval(WRITE_SCRIPT, 1, settings.redis_key("user", visitor),
                     *script_args(USER, FEATURE_SET_VERSION, user_writes(recent, ts)))


async def write_users(redis: aioredis.Redis, settings: Settings,
                      users: dict[str, Sequence[tuple[str, str, int]]], ts: int) -> None:
    """Many user hashes, pipelined in chunks."""
    sha = await redis.script_load(WRITE_SCRIPT)
    names = list(users)
    for i in range(0, len(names), 1000):
        pipe = redis.pipeline(transaction=False)
        for visitor in names[i:i + 1000]:
            pipe.evalsha(sha, 1, settings.redis_key("user", visitor),
                         *script_args(USER, FEATURE_SET_VERSION, user_writes(users[visitor], ts)))
        await pipe.execute()


async def write_popular(redis: aioredis.Redis, settings: Settings, partition: int,
                        items: Sequence[tuple[str, float]], ts: int,
                        half_life_ms: int = 6 * 3_600_000) -> None:
    """A partition's popularity snapshot as the features worker writes it."""
    write = GroupWrite("top", ts, {"items": [[i, s] for i, s in items], "half_life_ms": half_life_ms})
    await redis.eval(WRITE_SCRIPT, 1, settings.redis_key("popular", str(partition)),
                     *script_args(POPULAR, FEATURE_SET_VERSION, [write]))


class PrivateRedis:
    """A redis-server of one's own on a free port (tests and benches stop or pause it;
    the shared one is never touched). No persistence: a restart starts empty."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        import socket

        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.workdir = Path(workdir)
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        import shutil
        import socket
        import subprocess

        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
             "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def pause(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
