"""Faust app factory and worker entry point: one app (and consumer group) per processor.

There is no module-level app: `clickloop worker <processor>` builds one from
the process's settings, so tests and benchmarks can run several side by side
with different prefixes.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import time
from typing import Callable

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from services.settings import Settings
from streams import PROCESSORS
from streams.meter import Meter
from streams.topics import ensure_topics, group_id

log = logging.getLogger("clickloop.streams")

FETCH_MAX_WAIT_MS = 20  # an idle worker sends ~50 empty fetches a second: negligible

Builder = Callable[[faust.App, Settings, Meter], None]


class _ReadCommittedThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # Faust reads read_committed only in its own exactly_once mode; clickloop's
        # processors write their outputs in transactions (streams/txstate.py), so
        # every reader must skip aborted ones. aiokafka reads this in start().
        consumer._isolation_level = "read_committed"
        # Faust asks the broker to hold a fetch up to 1.5 s when it has no data
        # for any partition in the request. aiokafka keeps one fetch in flight
        # per broker and leaves out partitions whose records are still
        # buffered, so once every input partition is buffered the next fetch
        # names only empty ones (Faust's leader topic, drained partitions) and
        # the broker parks it for the full 1.5 s while the buffers run dry:
        # the worker stalled ~1.5 s every few hundred thousand events.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class ReadCommittedConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ReadCommittedThread(self, loop=self.loop, beacon=self.beacon)


def make_app(settings: Settings, processor: str) -> faust.App:
    datadir = settings.state_dir / "faust" / f"{settings.prefix}{processor}"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        group_id(settings, processor),
        broker=f"kafka://{settings.kafka_bootstrap.replace(',', ';kafka://')}",
        store="memory://",          # tables are rebuilt from their changelog topics
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        consumer_group_instance_id=f"{settings.instance_id}-{processor}" if settings.instance_id else None,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(1, settings.session_timeout_s // 3),
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        # Processors ack an event only once its effects are committed
        # (streams/txstate.py), so on stop or rebalance there is nothing to wait
        # for: records not yet acked are replayed and skipped by their offset.
        stream_wait_empty=False,
        # Records are envelopes of up to hundreds of events: fetch big.
        consumer_max_fetch_size=8 * 1024 * 1024,
        stream_buffer_maxsize=16384,
        web_enabled=False,
        datadir=str(datadir),
        loghandlers=[],
    )
    app.transport.Consumer = ReadCommittedConsumer
    return app


# Each processor (`streams.PROCESSORS`) is the module streams.<name> (its `build`), imported
# only by the worker that runs it: the sessionizer has no use for pyarrow, numpy or the model
# code of others.


def builder(processor: str) -> Builder:
    return importlib.import_module(f"streams.{processor}").build


def run_worker(processor: str, settings: Settings) -> None:
    """Run one processor in the foreground until SIGINT/SIGTERM."""
    # Two threads share the GIL: Faust's consumer thread (fetching, parsing
    # records) and the event loop (processing). With CPython's default 5 ms
    # switch interval each hand-off between them can stall the other for up to
    # 5 ms. Measured on bench/stream_throughput.py (1M events, 3 runs each,
    # before the core released the GIL): 5 ms 128-168k events/s, 1 ms
    # 182-196k, 0.25 ms 204-206k, 0.1 ms 201-213k.
    sys.setswitchinterval(0.00025)
    if processor not in PROCESSORS:
        raise SystemExit(f"unknown processor {processor!r}; choose one of {', '.join(PROCESSORS)}")
    build = builder(processor)
    asyncio.run(ensure_topics(settings))
    app = make_app(settings, processor)
    meter = Meter()
    build(app, settings, meter)

    @app.timer(1.0)
    async def progress() -> None:
        line = meter.report()
        if line:
            print(f"[{processor}] {line}", flush=True)

    # Faust's own log level: its INFO tables are noise for an operator.
    level = {"debug": "debug", "info": "warn", "warning": "warn", "error": "error"}[settings.log_level]
    worker = faust.Worker(app, loglevel=level, quiet=True, redirect_stdouts=False)
    worker.spinner = None  # a terminal spinner only mangles log files
    print(f"[{processor}] starting worker for group {app.conf.id} on {settings.kafka_bootstrap}",
          flush=True)
    worker.execute_from_commandline()


def now() -> float:
    return time.monotonic()
