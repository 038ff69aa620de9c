"""One settings object per process, read once from the environment at start-up.

Every knob is an environment variable with a documented default (README,
"Configuration"); a bad value stops the process with a message naming the
variable and what it expects. Each field names its variable in its metadata,
so reading the environment and writing it back for a child process are one
table, not two lists to keep in step.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_LEVELS = ("debug", "info", "warning", "error")
TOPIC_CONFIG_MODES = ("apply", "check")
ENRICHMENT_BYTES = 8192      # what the collector may add to an event (times, ip, ua, ids)
MAX_RECORD_BYTES = 1_000_000  # Kafka's message.max.bytes default is 1,048,588


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message says how to fix it."""


def _env(name: str, minimum: int | None = None, **kw: Any):
    return field(metadata={"env": name, "minimum": minimum}, **kw)


@dataclass(frozen=True, slots=True)
class Settings:
    kafka_bootstrap: str = _env("CLICKLOOP_KAFKA", default="127.0.0.1:9092")
    redis_url: str = _env("CLICKLOOP_REDIS_URL", default="redis://127.0.0.1:6379/0")
    # Isolates one deployment (or one test) from another: prefixes topics,
    # consumer groups and Redis keys.
    prefix: str = _env("CLICKLOOP_PREFIX", default="")
    partitions: int = _env("CLICKLOOP_PARTITIONS", 1, default=4)
    collector_host: str = _env("CLICKLOOP_COLLECTOR_HOST", default="127.0.0.1")
    collector_port: int = _env("CLICKLOOP_COLLECTOR_PORT", 0, default=8080)
    recommender_host: str = _env("CLICKLOOP_RECOMMENDER_HOST", default="127.0.0.1")
    recommender_port: int = _env("CLICKLOOP_RECOMMENDER_PORT", 0, default=8081)
    # Collector
    write_keys: tuple[str, ...] = _env("CLICKLOOP_WRITE_KEYS", default=())
    require_write_key: bool = _env("CLICKLOOP_REQUIRE_WRITE_KEY", default=True)
    anonymize_ip: bool = _env("CLICKLOOP_ANONYMIZE_IP", default=True)
    # Proxies in front of the collector that append to X-Forwarded-For (a load
    # balancer: 1). 0 trusts no header: the client is the peer address, and a client
    # cannot claim another IP (or https) by sending the headers itself.
    trusted_proxies: int = _env("CLICKLOOP_TRUSTED_PROXIES", 0, default=0)
    cookie_name: str = _env("CLICKLOOP_COOKIE_NAME", default="cl_anonymous_id")
    max_event_bytes: int = _env("CLICKLOOP_MAX_EVENT_BYTES", 256, default=32 * 1024)
    max_batch_bytes: int = _env("CLICKLOOP_MAX_BATCH_BYTES", 1024, default=500 * 1024)
    max_clock_ahead_s: int = _env("CLICKLOOP_MAX_CLOCK_AHEAD_S", 0, default=300)
    # Collector micro-batching: events of many requests share one Kafka record
    # per partition, flushed after this many ms or events.
    linger_ms: int = _env("CLICKLOOP_LINGER_MS", 0, default=5)
    record_max_events: int = _env("CLICKLOOP_RECORD_MAX_EVENTS", 1, default=500)
    # ... or bytes: below the broker's message.max.bytes (1 MiB by default).
    record_max_bytes: int = _env("CLICKLOOP_RECORD_MAX_BYTES", 4096, default=512 * 1024)
    # A request whose records Kafka has not acknowledged by then gets a 503.
    produce_timeout_s: int = _env("CLICKLOOP_PRODUCE_TIMEOUT_S", 1, default=10)
    # Sessionizer
    session_gap_s: int = _env("CLICKLOOP_SESSION_GAP_S", 1, default=30 * 60)
    session_grace_s: int = _env("CLICKLOOP_SESSION_GRACE_S", 0, default=10 * 60)
    session_max_s: int = _env("CLICKLOOP_SESSION_MAX_S", 1, default=24 * 3600)
    # A visitor with no open session whose last one ended this long ago in event time
    # is forgotten (its next session has index 1); bounds the state. 0: never.
    session_retention_s: int = _env("CLICKLOOP_SESSION_RETENTION_S", 0, default=30 * 24 * 3600)
    # Stream processors commit outputs, state and position every this many ms.
    checkpoint_ms: int = _env("CLICKLOOP_CHECKPOINT_MS", 10, default=1000)
    # Static group membership (KIP-345): a worker restarted with the same id
    # takes its partitions back at once, without a rebalance. Give each worker
    # process its own stable id (e.g. the pod name); empty: dynamic membership.
    instance_id: str = _env("CLICKLOOP_INSTANCE_ID", default="")
    # How long a worker that died silently keeps its partitions.
    session_timeout_s: int = _env("CLICKLOOP_SESSION_TIMEOUT_S", 6, default=10)
    state_dir: Path = _env("CLICKLOOP_STATE_DIR", default=REPO_ROOT / ".state")
    log_level: str = _env("CLICKLOOP_LOG_LEVEL", default="info")
    # Existing topics whose configs fall short of the declared ones (streams/topics.py):
    # `apply` alters them at start-up, `check` only logs each shortfall as an error (for
    # clusters whose topics are managed elsewhere).
    topic_configs: str = _env("CLICKLOOP_TOPIC_CONFIGS", default="apply")
    # Archive (streams/archive.py): topics to Parquet, exactly once. URI of a
    # pyarrow filesystem (local folder, s3://, hdfs://, gs://); empty:
    # <state_dir>/archive.
    archive_uri: str = _env("CLICKLOOP_ARCHIVE_URI", default="")
    archive_topics: tuple[str, ...] = _env("CLICKLOOP_ARCHIVE_TOPICS", default=("clicks", "sessions"))
    # A partition's buffer becomes files at this many rows or input bytes ...
    # (measured: 50k rows ran at 122k events/s, 200k rows at 83k: bigger flushes
    # touch fresh memory, and page faults dominated; bench/archive_throughput.py)
    archive_max_rows: int = _env("CLICKLOOP_ARCHIVE_MAX_ROWS", 1, default=50_000)
    archive_max_bytes: int = _env("CLICKLOOP_ARCHIVE_MAX_BYTES", 1024, default=32 * 1024 * 1024)
    # ... or once its oldest record waited this long (also when the partition is idle).
    archive_interval_s: int = _env("CLICKLOOP_ARCHIVE_INTERVAL_S", 1, default=60)
    # Hour partition by `event` time (clicks: timestamp, sessions: start) or Kafka
    # `record` time; per topic with `<topic>=event|record|<field>`, comma-separated.
    archive_time: str = _env("CLICKLOOP_ARCHIVE_TIME", default="event")
    # Features (streams/features.py): changed entities are written to Redis at
    # most this many ms after their event was read (state commits follow
    # checkpoint_ms); the popularity list keeps this many items per partition.
    features_flush_ms: int = _env("CLICKLOOP_FEATURES_FLUSH_MS", 1, default=100)
    popular_items: int = _env("CLICKLOOP_POPULAR_ITEMS", 10, default=1000)
    # The features worker commits its user state, input offsets and the item deltas
    # this often (instead of checkpoint_ms): item features reach Redis only after the
    # commit that carries their deltas to the items agent (read_committed).
    features_commit_ms: int = _env("CLICKLOOP_FEATURES_COMMIT_MS", 10, default=250)
    # Worker processes of the collector and of the recommender, each service on its one
    # port (services/workers.py; 0: one per CPU).
    collector_workers: int = _env("CLICKLOOP_COLLECTOR_WORKERS", 0, default=1)
    recommender_workers: int = _env("CLICKLOOP_RECOMMENDER_WORKERS", 0, default=1)
    # Recommender (services/recommender): total latency budget and the Redis
    # call's share of it; past either, the answer is popular items.
    budget_ms: int = _env("CLICKLOOP_BUDGET_MS", 1, default=50)
    redis_budget_ms: int = _env("CLICKLOOP_REDIS_BUDGET_MS", 1, default=10)
    redis_pool: int = _env("CLICKLOOP_REDIS_POOL", 1, default=32)
    # In-process cache of hot feature hashes (0 disables it) and its size.
    feature_cache_ms: int = _env("CLICKLOOP_FEATURE_CACHE_MS", 0, default=1000)
    feature_cache_size: int = _env("CLICKLOOP_FEATURE_CACHE_SIZE", 0, default=10_000)
    # The recommender's garbage collector (app.py `GcPolicy`): a young-generation
    # collection after every gc_requests requests (0: none) and, for work outside
    # requests, every gc_young net allocations; older generations, which hold the
    # hot-key cache, are collected only every gc_full_s seconds (0: never), since
    # requests leave almost no cyclic garbage.
    recommender_gc_requests: int = _env("CLICKLOOP_RECOMMENDER_GC_REQUESTS", 0, default=32)
    recommender_gc_young: int = _env("CLICKLOOP_RECOMMENDER_GC_YOUNG", 100, default=2000)
    recommender_gc_full_s: int = _env("CLICKLOOP_RECOMMENDER_GC_FULL_S", 0, default=300)
    # The in-memory popular list behind the fallback is refreshed this often.
    popular_refresh_ms: int = _env("CLICKLOOP_POPULAR_REFRESH_MS", 100, default=2000)
    # Circuit breaker per dependency (Hystrix defaults).
    breaker_window_ms: int = _env("CLICKLOOP_BREAKER_WINDOW_MS", 100, default=10_000)
    breaker_min_requests: int = _env("CLICKLOOP_BREAKER_MIN_REQUESTS", 1, default=20)
    breaker_error_pct: int = _env("CLICKLOOP_BREAKER_ERROR_PCT", 1, default=50)
    breaker_sleep_ms: int = _env("CLICKLOOP_BREAKER_SLEEP_MS", 10, default=5000)
    # Models: the name served (its newest announcement on `models` wins), an
    # optional shadow model scored on a fraction of requests, artifact root (a
    # folder or a pyarrow filesystem URI; empty: <state_dir>/models) and the TTL
    # of precomputed top-k lists.
    model_name: str = _env("CLICKLOOP_MODEL_NAME", default="als")
    shadow_model: str = _env("CLICKLOOP_SHADOW_MODEL", default="")
    shadow_fraction: float = _env("CLICKLOOP_SHADOW_FRACTION", 0, default=0.0)
    model_dir: str = _env("CLICKLOOP_MODEL_DIR", default="")
    topk_ttl_s: int = _env("CLICKLOOP_TOPK_TTL_S", 60, default=24 * 3600)
    # Experiments (issue 6): a click on a shown item within this window rewards
    # the exposure (1), else the window's close does (0); bandit posteriors are
    # published at most this often per experiment; a unit keeps its bandit arm
    # this long; the experiments API/dashboard listens here.
    attribution_window_s: int = _env("CLICKLOOP_ATTRIBUTION_WINDOW_S", 1, default=30 * 60)
    posterior_publish_ms: int = _env("CLICKLOOP_POSTERIOR_PUBLISH_MS", 10, default=1000)
    # Attribution (streams/attribution_core.py): how far behind its stream's watermark
    # a click or an exposure may arrive and still count; how long clicks wait for
    # exposures that lag behind the clicks (event time).
    attribution_lateness_s: int = _env("CLICKLOOP_ATTRIBUTION_LATENESS_S", 0, default=60)
    attribution_retention_s: int = _env("CLICKLOOP_ATTRIBUTION_RETENTION_S", 1, default=6 * 3600)
    bandit_sticky_s: int = _env("CLICKLOOP_BANDIT_STICKY_S", 0, default=3600)
    # The recommender's surface: it applies the running experiment on this surface.
    recommender_surface: str = _env("CLICKLOOP_RECOMMENDER_SURFACE", default="home.recommendations")
    experiments_host: str = _env("CLICKLOOP_EXPERIMENTS_HOST", default="127.0.0.1")
    experiments_port: int = _env("CLICKLOOP_EXPERIMENTS_PORT", 0, default=8082)
    # CDC history (issue 7, streams/cdc_history.py): the Debezium table topics to
    # fold, unprefixed and comma-separated; an entry with regex characters is a
    # pattern matched against whole topic names (new matching topics are picked
    # up while running). Events held per key to place late ones.
    cdc_topics: tuple[str, ...] = _env("CLICKLOOP_CDC_TOPICS", default=(r"cdc\..*",))
    history_max_versions: int = _env("CLICKLOOP_HISTORY_MAX_VERSIONS", 1, default=16)
    # Features from CDC history (issue 7, streams/subscription_features.py): the captured
    # table whose `history.<table>` the features worker folds into the `subscription`
    # group of `user:<id>`, the columns naming the user and the status, and
    # the status values that mean subscribed.
    subscriptions_table: str = _env("CLICKLOOP_SUBSCRIPTIONS_TABLE", default="subscriptions")
    subscriptions_user_column: str = _env("CLICKLOOP_SUBSCRIPTIONS_USER_COLUMN", default="user_id")
    subscriptions_status_column: str = _env("CLICKLOOP_SUBSCRIPTIONS_STATUS_COLUMN", default="status")
    subscriptions_active: tuple[str, ...] = _env("CLICKLOOP_SUBSCRIPTIONS_ACTIVE",
                                                 default=("active", "trialing"))
    # CDC sources (issue 7, services/infra_cdc.py, `clickloop cdc up`): PostgreSQL with
    # wal_level=logical (started locally unless PG_HOST:PG_PORT already answers) and Kafka
    # Connect standalone with the Debezium PostgreSQL connector, whose topics are
    # cdc.<CDC_SERVER>.<schema>.<table> for the CDC_TABLES (schema.table, comma-separated).
    # CDC_ENABLED: `clickloop up` starts them too.
    cdc_enabled: bool = _env("CLICKLOOP_CDC_ENABLED", default=False)
    cdc_server: str = _env("CLICKLOOP_CDC_SERVER", default="clickloop")
    cdc_tables: tuple[str, ...] = _env("CLICKLOOP_CDC_TABLES", default=("public.subscriptions",))
    pg_host: str = _env("CLICKLOOP_PG_HOST", default="127.0.0.1")
    pg_port: int = _env("CLICKLOOP_PG_PORT", 1, default=5433)
    pg_database: str = _env("CLICKLOOP_PG_DATABASE", default="clickloop")
    pg_user: str = _env("CLICKLOOP_PG_USER", default="clickloop")
    pg_password: str = _env("CLICKLOOP_PG_PASSWORD", default="clickloop")
    connect_port: int = _env("CLICKLOOP_CONNECT_PORT", 1, default=8083)

    @property
    def session_gap_ms(self) -> int:
        return self.session_gap_s * 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"CLICKLOOP_LOG_LEVEL={self.log_level!r}: use {', '.join(LOG_LEVELS)}")
        if self.topic_configs not in TOPIC_CONFIG_MODES:
            raise SettingsError(f"CLICKLOOP_TOPIC_CONFIGS={self.topic_configs!r}: use "
                                f"{' or '.join(TOPIC_CONFIG_MODES)}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(
                f"CLICKLOOP_REDIS_URL={self.redis_url!r} must start with redis://, rediss:// or unix://")
        if not self.kafka_bootstrap.strip():
            raise SettingsError("CLICKLOOP_KAFKA is empty: give host:port[,host:port...]")
        if self.record_max_bytes < self.max_event_bytes + ENRICHMENT_BYTES:
            raise SettingsError(
                f"CLICKLOOP_RECORD_MAX_BYTES={self.record_max_bytes} must be at least "
                f"CLICKLOOP_MAX_EVENT_BYTES + {ENRICHMENT_BYTES} "
                f"({self.max_event_bytes + ENRICHMENT_BYTES}), so that any accepted event fits a record")
        if not self.archive_topics:
            raise SettingsError("CLICKLOOP_ARCHIVE_TOPICS is empty: name the topics to archive, "
                                "e.g. clicks,sessions")
        try:
            _archive_time_rules(self.archive_time)
        except ValueError as exc:
            raise SettingsError(f"CLICKLOOP_ARCHIVE_TIME={self.archive_time!r}: {exc}") from None
        if self.record_max_bytes > MAX_RECORD_BYTES:
            raise SettingsError(f"CLICKLOOP_RECORD_MAX_BYTES={self.record_max_bytes} must be at most "
                                f"{MAX_RECORD_BYTES} (below Kafka's default message.max.bytes)")
        if not 0.0 <= self.shadow_fraction <= 1.0:
            raise SettingsError(f"CLICKLOOP_SHADOW_FRACTION={self.shadow_fraction} must be between 0 and 1")
        if self.shadow_fraction > 0 and not self.shadow_model:
            raise SettingsError("CLICKLOOP_SHADOW_FRACTION > 0 needs CLICKLOOP_SHADOW_MODEL, the model "
                                "to score in the shadow")
        if self.redis_budget_ms > self.budget_ms:
            raise SettingsError(f"CLICKLOOP_REDIS_BUDGET_MS={self.redis_budget_ms} must be at most "
                                f"CLICKLOOP_BUDGET_MS={self.budget_ms}")
        if self.breaker_error_pct > 100:
            raise SettingsError(f"CLICKLOOP_BREAKER_ERROR_PCT={self.breaker_error_pct} must be at most 100")
        if not self.subscriptions_table or "." in self.subscriptions_table:
            raise SettingsError(f"CLICKLOOP_SUBSCRIPTIONS_TABLE={self.subscriptions_table!r}: the "
                                "table name as in history.<table> (no schema, no dots)")
        if not self.cdc_topics:
            raise SettingsError("CLICKLOOP_CDC_TOPICS is empty: name the Debezium topics or a pattern, "
                                r"e.g. cdc\..* or cdc.shop.public.subscriptions")
        for entry in self.cdc_topics:
            try:
                re.compile(entry)
            except re.error as exc:
                raise SettingsError(f"CLICKLOOP_CDC_TOPICS entry {entry!r} is not a valid regular "
                                    f"expression: {exc}") from None

    @property
    def archive_root(self) -> str:
        """Where the archive lives: CLICKLOOP_ARCHIVE_URI, else <state_dir>/archive."""
        return self.archive_uri or str(self.state_dir / "archive")

    @property
    def model_root(self) -> str:
        """Where model artifacts live: CLICKLOOP_MODEL_DIR (a folder or a filesystem URI),
        else <state_dir>/models."""
        return self.model_dir or str(self.state_dir / "models")

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def redis_key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def as_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, tuple):
                value = ",".join(value)
            out[f.metadata["env"]] = str(value)
        return out


def _parse(f, raw: str):
    name, kind = f.metadata["env"], f.type
    if kind == "int":
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a whole number") from None
        if f.metadata["minimum"] is not None and value < f.metadata["minimum"]:
            raise SettingsError(f"{name}={value} must be at least {f.metadata['minimum']}")
        return value
    if kind == "float":
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise SettingsError(f"{name}={raw!r} is not a finite number")
        if f.metadata["minimum"] is not None and value < f.metadata["minimum"]:
            raise SettingsError(f"{name}={value} must be at least {f.metadata['minimum']}")
        return value
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name}={raw!r}: use true or false")
    if kind == "tuple[str, ...]":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind == "Path":
        return Path(raw)
    return raw.lower() if name == "CLICKLOOP_LOG_LEVEL" else raw


def _archive_time_rules(spec: str) -> dict[str, str]:
    from streams.archive_layout import parse_time_rules  # pure, no heavy imports

    return parse_time_rules(spec)
