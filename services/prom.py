"""Prometheus pieces the HTTP services share, one worker or several.

Under the worker supervisor (services/workers.py) every worker writes its values
to prometheus_client's memory-mapped files in `PROMETHEUS_MULTIPROC_DIR`, so any
worker answering `/metrics` reports all of them: counters and histograms summed
(a dead worker's counts included), gauges one series per live worker (`pid`
label). With one process, the app's own registry as it is.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Gauge, generate_latest

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_DIR_ENV) or None


def gauge(*args, **kw) -> Gauge:
    """A gauge; with several workers, one series per live worker (`pid` label)."""
    return Gauge(*args, multiprocess_mode="liveall", **kw)


def exposition(registry: CollectorRegistry) -> bytes:
    """The text format of `registry`, or of every worker's files under a supervisor."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(registry)
    from prometheus_client import multiprocess

    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path)
    return generate_latest(merged)
