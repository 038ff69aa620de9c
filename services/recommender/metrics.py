"""The recommender's Prometheus metrics (`GET /metrics`), one registry per app.

Breaker states, the model versions, the popular list and the Kafka logs are
read from their owners when /metrics is scraped (`Recommender.refresh_metrics`;
running totals become counters through `catch_up`), so the request path pays
only for counters and the latency histogram.

Under the worker supervisor (services/workers.py, services/prom.py) any worker's
/metrics reports all of them, so each worker refreshes its gauges every second
(app.py), not only when it is the one scraped. A series that goes away (an old
model version, an ended experiment) is set to its "gone" value first (0 for
`model_info`, -1 for a posterior version), since a worker's file keeps its last
value until the worker exits.
"""
from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from services.prom import exposition, gauge, multiprocess_dir

disable_created_metrics()

PATHS = ("model", "fallback", "cold_start")
REASONS = ("no_model", "redis_error", "redis_timeout", "redis_open", "model_error", "model_open",
           "budget")
SOURCES = ("online", "precomputed", "popular", "prior")
DEPENDENCIES = ("redis", "model")
STATE_CODES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        self.registry = r = CollectorRegistry()
        self._series: dict[int, set[tuple[str, ...]]] = {}
        self._totals: dict[tuple[int, str], int] = {}
        ns = "clickloop_recommender"
        served = Counter(f"{ns}_responses", "Recommendations answered 200, by path", ["path"], registry=r)
        self.served = {p: served.labels(p) for p in PATHS}
        source = Counter(f"{ns}_responses_by_source", "Answers by where the items came from",
                         ["source"], registry=r)
        self.source = {s: source.labels(s) for s in SOURCES}
        fallback = Counter(f"{ns}_fallbacks", "Fallback answers, by reason", ["reason"], registry=r)
        self.fallback = {reason: fallback.labels(reason) for reason in REASONS}
        self.bad_requests = Counter(f"{ns}_bad_requests", "Requests answered 400", registry=r)
        self.latency = Histogram(f"{ns}_latency_seconds", "Handler time of a recommendation",
                                 buckets=(.0005, .001, .002, .003, .005, .0075, .01, .02, .05, .1, .25),
                                 registry=r)
        cache = Counter(f"{ns}_feature_cache", "Feature reads served by the hot-key cache or not",
                        ["result"], registry=r)
        self.cache_hit, self.cache_miss = cache.labels("hit"), cache.labels("miss")
        features = Counter(f"{ns}_feature_groups", "User feature groups read, by status",
                           ["group", "status"], registry=r)
        self.features = {(g, s): features.labels(g, s) for g in ("activity", "recent")
                         for s in ("fresh", "stale", "missing")}
        self.breaker_state = gauge(f"{ns}_breaker_state", "Circuit breaker: 0 closed, 1 half-open, "
                                   "2 open", ["dependency"], registry=r)
        self.breaker_opened = Counter(f"{ns}_breaker_opened", "Times the breaker opened",
                                      ["dependency"], registry=r)
        self.breaker_rejected = Counter(f"{ns}_breaker_rejected", "Calls refused by the open breaker",
                                        ["dependency"], registry=r)
        self.breaker_error_rate = gauge(f"{ns}_breaker_error_rate", "Error rate in the rolling window",
                                        ["dependency"], registry=r)
        self.model_info = gauge(f"{ns}_model_info", "1 for each loaded model version", ["role", "name",
                                "version"], registry=r)
        loads = Counter(f"{ns}_model_loads", "Model announcements loaded or refused", ["outcome"],
                        registry=r)
        self.model_loaded, self.model_failed = loads.labels("loaded"), loads.labels("failed")
        self.popular_items = gauge(f"{ns}_popular_items", "Items in the in-memory popular list",
                                   registry=r)
        self.popular_age = gauge(f"{ns}_popular_age_seconds", "Since the popular list was last "
                                 "refreshed (-1: never)", registry=r)
        self.log_sent = Counter(f"{ns}_log_sent", "Records acknowledged by Kafka", ["topic"], registry=r)
        self.log_dropped = Counter(f"{ns}_log_dropped", "Records dropped (buffer full or refused)",
                                   ["topic"], registry=r)
        self.log_buffered = gauge(f"{ns}_log_buffered", "Records waiting for the producer",
                                  ["topic"], registry=r)
        self.gc_pause = Histogram(f"{ns}_gc_pause_seconds", "Python garbage collector pauses",
                                  ["generation"], buckets=(.0005, .001, .002, .005, .01, .02, .05, .1),
                                  registry=r)
        arm = Counter(f"{ns}_experiment_responses", "Answers inside an experiment, by arm",
                      ["experiment", "arm"], registry=r)
        self._arms: dict[tuple[str, str], object] = {}
        self._arm_counter = arm
        self.posterior_version = gauge(f"{ns}_experiment_posterior_version", "Posterior snapshot "
                                       "version a bandit allocation draws from (0: the prior)",
                                       ["experiment"], registry=r)
        self.shadow_skipped = Counter(f"{ns}_shadow_skipped", "Sampled requests not shadow-scored "
                                      "(no shadow model or no features)", registry=r)

    def arm(self, experiment: str, arm: str):
        """The counter child of one experiment arm (cached: `labels` is slower per request)."""
        child = self._arms.get((experiment, arm))
        if child is None:
            child = self._arms[(experiment, arm)] = self._arm_counter.labels(experiment, arm)
        return child

    def catch_up(self, counter: Counter, label: str, total: int) -> None:
        """Move a counter up to a total its owner keeps (read at scrape time)."""
        child = counter.labels(label)
        delta = total - self._totals.get((id(counter), label), 0)
        if delta > 0:
            child.inc(delta)
            self._totals[(id(counter), label)] = total

    def set_series(self, target: Gauge, values: Mapping[tuple[str, ...], float], gone: float) -> None:
        """Make `values` the gauge's only series: those no longer there are set to `gone`
        (what a worker's metrics file keeps) and removed."""
        before = self._series.get(id(target), set())
        for labels in before - values.keys():
            target.labels(*labels).set(gone)
            target.remove(*labels)
        for labels, value in values.items():
            target.labels(*labels).set(value)
        self._series[id(target)] = set(values)

    def exposition(self) -> bytes:
        return exposition(self.registry)
