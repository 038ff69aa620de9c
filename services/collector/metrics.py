"""The collector's Prometheus metrics (`GET /metrics`), one registry per app.

A registry per app, not prometheus_client's global one, so two collectors in
one process (tests) do not share counters. Labelled children are bound once:
`labels()` is a dict look-up under a lock, not free on the hot path. With
several workers (`CLICKLOOP_COLLECTOR_WORKERS`), any worker's /metrics sums them
all (services/prom.py).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

from services.prom import exposition, gauge

# The `*_created` timestamp series double the exposition for no use here.
disable_created_metrics()

EVENT_REASONS = ("invalid", "too_large", "unavailable")
REQUEST_REASONS = ("unauthorized", "malformed", "too_large", "invalid", "unavailable")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ns = "clickloop_collector"
        self.requests = Counter(f"{ns}_requests", "HTTP requests to the tracking API", registry=r)
        rejected = Counter(f"{ns}_requests_rejected", "Requests answered 4xx/503, by reason",
                           ["reason"], registry=r)
        self.requests_rejected = {reason: rejected.labels(reason) for reason in REQUEST_REASONS}
        self.events_accepted = Counter(f"{ns}_events_accepted",
                                       "Events acknowledged by Kafka and answered 2xx", registry=r)
        ev_rejected = Counter(f"{ns}_events_rejected", "Events not accepted, by reason",
                              ["reason"], registry=r)
        self.events_rejected = {reason: ev_rejected.labels(reason) for reason in EVENT_REASONS}
        self.dlq_records = Counter(f"{ns}_dlq_records", "Refused events written to clicks.dlq",
                                   registry=r)
        self.records = Counter(f"{ns}_records", "Records sent to clicks", registry=r)
        self.record_events = Histogram(f"{ns}_record_events", "Events per clicks record",
                                       buckets=(1, 5, 20, 50, 100, 200, 500, 1000), registry=r)
        self.produce_latency = Histogram(
            f"{ns}_produce_latency_seconds", "From handing a record to the producer to the "
            "broker's acknowledgement (acks=all)",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.kafka_ready = gauge(f"{ns}_kafka_ready", "1 when the producer is connected",
                                 registry=r)

    def exposition(self) -> bytes:
        return exposition(self.registry)
