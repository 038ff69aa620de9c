"""One settings object per process, read once from the environment at start-up.

Every knob is an environment variable with a documented default (README,
"Configuration"); a bad value stops the process with a message naming the
variable and what it expects.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message says how to fix it."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Isolates one deployment (or one test) from another: prefixes topics,
    # consumer groups and Redis keys.
    prefix: str = ""
    partitions: int = 4
    collector_host: str = "127.0.0.1"
    collector_port: int = 8080
    recommender_host: str = "127.0.0.1"
    recommender_port: int = 8081
    session_gap_ms: int = 30 * 60 * 1000
    max_batch_bytes: int = 500 * 1024
    state_dir: Path = field(default_factory=lambda: REPO_ROOT / ".state")
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        d = cls()
        level = env.get("CLICKLOOP_LOG_LEVEL", "info").lower()
        if level not in {"debug", "info", "warning", "error"}:
            raise SettingsError(
                f"CLICKLOOP_LOG_LEVEL={level!r}: use debug, info, warning or error")
        settings = cls(
            kafka_bootstrap=env.get("CLICKLOOP_KAFKA", d.kafka_bootstrap),
            redis_url=env.get("CLICKLOOP_REDIS_URL", d.redis_url),
            prefix=env.get("CLICKLOOP_PREFIX", ""),
            partitions=_int(env, "CLICKLOOP_PARTITIONS", d.partitions, minimum=1),
            collector_host=env.get("CLICKLOOP_COLLECTOR_HOST", d.collector_host),
            collector_port=_int(env, "CLICKLOOP_COLLECTOR_PORT", d.collector_port),
            recommender_host=env.get("CLICKLOOP_RECOMMENDER_HOST", d.recommender_host),
            recommender_port=_int(env, "CLICKLOOP_RECOMMENDER_PORT", d.recommender_port),
            session_gap_ms=1000 * _int(env, "CLICKLOOP_SESSION_GAP_S", 1800, minimum=1),
            max_batch_bytes=_int(env, "CLICKLOOP_MAX_BATCH_BYTES", d.max_batch_bytes, minimum=1024),
            state_dir=Path(env.get("CLICKLOOP_STATE_DIR") or REPO_ROOT / ".state"),
            log_level=level,
        )
        if not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(
                f"CLICKLOOP_REDIS_URL={settings.redis_url!r} must start with redis://, rediss:// or unix://")
        if not settings.kafka_bootstrap.strip():
            raise SettingsError("CLICKLOOP_KAFKA is empty: give host:port[,host:port...]")
        return settings

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def redis_key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def as_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        names = {
            "kafka_bootstrap": "CLICKLOOP_KAFKA", "redis_url": "CLICKLOOP_REDIS_URL",
            "prefix": "CLICKLOOP_PREFIX", "partitions": "CLICKLOOP_PARTITIONS",
            "collector_host": "CLICKLOOP_COLLECTOR_HOST", "collector_port": "CLICKLOOP_COLLECTOR_PORT",
            "recommender_host": "CLICKLOOP_RECOMMENDER_HOST",
            "recommender_port": "CLICKLOOP_RECOMMENDER_PORT",
            "max_batch_bytes": "CLICKLOOP_MAX_BATCH_BYTES",
            "state_dir": "CLICKLOOP_STATE_DIR", "log_level": "CLICKLOOP_LOG_LEVEL",
        }
        env = {var: str(getattr(self, attr)) for attr, var in names.items()}
        env["CLICKLOOP_SESSION_GAP_S"] = str(self.session_gap_ms // 1000)
        assert set(names) | {"session_gap_ms"} == {f.name for f in fields(self)}
        return env
