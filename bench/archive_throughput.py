"""Archive worker throughput against a raw aiokafka consume + orjson decode loop, same data, same run.

    .venv/bin/python bench/archive_throughput.py [--events N] [--per-record K] [--profile FILE]

Produces N synthetic click events to a fresh `clicks` topic (envelopes of K
events of one partition, as the collector packs them under load), measures the
raw loop of bench/stream_throughput.py over it, then runs the real `clickloop
worker archive` process over the same topic into a fresh local archive. The
worker counts an event when the file holding it is renamed into place (and its
offsets acked); its rate runs from its first record to its last flush, so the
final flush interval is included and its start-up is not. The Parquet files are
then counted to check that every event is archived exactly once.
Last line: events=N archive_eps=X raw_eps=Y ratio=X/Y
"""
from __future__ import annotations

import asyncio
import dataclasses
import resource
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import (bench_arguments, bench_settings, click_events,  # noqa: E402
                           click_records, produce, worker_rate)
from bench.stream_throughput import raw_loop  # noqa: E402
from services.settings import Settings  # noqa: E402
from streams import topics  # noqa: E402
from streams.archive_store import ArchiveStore  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402



def archive_topic(settings: Settings, n_events: int, profile: str | None = None,
                  timeout_s: float | None = None) -> float:
    """Run `clickloop worker archive` with `settings` until it archived `n_events`; events/s.

    The topics archived are `settings.archive_topics` (the benchmark sets only
    `clicks`); the archive is `settings.archive_root`. The worker is stopped
    (SIGINT) once the last file is in place.
    """
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        return worker_rate(settings, "archive", n_events, timeout_s or 60 + n_events / 2000,
                           profile=profile, spy_subprocesses=True)
    finally:
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"archive worker CPU (with its writer processes, start-up included): user "
              f"{cpu.ru_utime - cpu0.ru_utime:.1f} s, system {cpu.ru_stime - cpu0.ru_stime:.1f} s",
              flush=True)


def archived_rows(settings: Settings, topic: str) -> tuple[int, int]:
    """(rows, files) of the topic's final Parquet files, from their footers."""
    store = ArchiveStore(settings.archive_root)
    files = [p for p in store.list_topic(topic) if p.endswith(".parquet")]
    return sum(pq.read_metadata(p, filesystem=store.fs).num_rows for p in files), len(files)


def archive_settings(interval_s: int = 1) -> Settings:
    """Fresh benchmark settings archiving only `clicks`, into a folder of their own."""
    settings = bench_settings()
    return dataclasses.replace(
        settings, archive_topics=(topics.CLICKS,), archive_interval_s=interval_s,
        archive_uri=str(settings.state_dir / "bench-archive" / settings.prefix.rstrip(".")))


def main() -> None:
    parser = bench_arguments(__doc__, 1_000_000, "the worker")
    parser.add_argument("--interval", type=int, default=1,
                        help="CLICKLOOP_ARCHIVE_INTERVAL_S for the run (the last flush waits for it)")
    args = parser.parse_args()
    settings = archive_settings(args.interval)
    archive_dir = settings.archive_root
    topic = settings.topic(topics.CLICKS)
    asyncio.run(ensure_topics(settings))
    records = click_records(click_events(args.events), settings.partitions, args.per_record)
    produce_s = asyncio.run(produce(settings, topic, records))
    print(f"produced {args.events} events in {len(records)} records to {topic} "
          f"({settings.partitions} partitions) in {produce_s:.1f} s", flush=True)
    raw = asyncio.run(raw_loop(settings.kafka_bootstrap, topic, args.events))
    print(f"raw aiokafka consume+decode: {raw:,.0f} events/s", flush=True)
    eps = archive_topic(settings, args.events, profile=args.profile)
    print(f"archive worker: {eps:,.0f} events/s into {archive_dir}", flush=True)
    rows, files = archived_rows(settings, topic)
    print(f"archive holds {rows} rows in {files} files", flush=True)
    shutil.rmtree(archive_dir, ignore_errors=True)
    if rows != args.events:
        raise SystemExit(f"archive holds {rows} rows, expected {args.events}")
    print(f"events={args.events} archive_eps={eps:.0f} raw_eps={raw:.0f} ratio={eps / raw:.3f}")


if __name__ == "__main__":
    main()
