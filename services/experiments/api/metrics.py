"""The experiments service's Prometheus metrics (`GET /metrics`), one registry per app."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

WRITE_OUTCOMES = ("ok", "invalid", "not_found", "conflict", "unavailable")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ns = "clickloop_experiments"
        self.requests = Counter(f"{ns}_requests", "HTTP requests by method, route and status",
                                ["method", "route", "status"], registry=r)
        writes = Counter(f"{ns}_writes", "Experiment writes (create/start/stop) by outcome",
                         ["outcome"], registry=r)
        self.writes = {o: writes.labels(o) for o in WRITE_OUTCOMES}
        self.experiments = Gauge(f"{ns}_experiments", "Experiments in the registry by status",
                                 ["status"], registry=r)
        self.snapshots = Gauge(f"{ns}_snapshots", "Experiments with a posterior snapshot", registry=r)
        self.refused = Gauge(f"{ns}_refused_records",
                             "Records of the experiments topic the registry fold refused", registry=r)
        self.applied = Gauge(f"{ns}_applied_offset", "Next experiments offset to fold", registry=r)
        self.kafka_ready = Gauge(f"{ns}_kafka_ready", "1 when the producer is connected", registry=r)

    def observe(self, store) -> None:
        by_status = {"draft": 0, "running": 0, "stopped": 0}
        for exp in store.registry.experiments.values():
            by_status[exp["status"]] += 1
        for status, n in by_status.items():
            self.experiments.labels(status).set(n)
        self.snapshots.set(len(store.snapshots))
        self.refused.set(store.refused_total)
        self.applied.set(store.applied)
        self.kafka_ready.set(1 if store.producer is not None else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
