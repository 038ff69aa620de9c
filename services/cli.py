"""The `clickloop` command.

  clickloop up                      Kafka, Redis, every worker and the three services, in the foreground
  clickloop demo [--events N]       post synthetic traffic to the collector
  clickloop worker PROCESSOR        one stream processor (streams.PROCESSORS: sessionize, features,
                                    archive, cdc_history, attribution, bandits)
  clickloop serve SERVICE           one HTTP service (collector, recommender, experiments; the first
                                    two as CLICKLOOP_*_WORKERS processes on their port)
  clickloop infra start|stop|status the local Kafka broker and Redis server
  clickloop cdc up|down|status|resnapshot
                                    PostgreSQL (wal_level=logical) and Kafka Connect with the Debezium connector
  clickloop replay --topic T --target topic:<name>|processor:<name> [--execute]
                                    re-feed a topic range for a backfill (dry run by default)
  clickloop train [--precompute]    the recommender's model from the archive, evaluated and announced
  clickloop cdc snapshot --table T --server S --schema SCH (--postgres DSN|--csv F|--jsonl F) --key COL[,COL]
                                    a table as Debezium snapshot reads onto cdc.<server>.<schema>.<table>
  clickloop stats ab --control A --treatment B [--json]
                                    A/B statistics for two arms, each RATE_OR_CONVERSIONS:USERS
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import os
import signal
import subprocess
import sys
import time

from services.settings import Settings, SettingsError
from streams import CDC_PROCESSORS, PROCESSORS


def _write_key_file(settings: Settings):
    return settings.state_dir / "write_key"


def _local_write_key(settings: Settings, create: bool) -> str | None:
    """The write key of local runs: CLICKLOOP_WRITE_KEYS' first, else the one
    `clickloop up` generated once and kept in <state_dir>/write_key."""
    if settings.write_keys:
        return settings.write_keys[0]
    path = _write_key_file(settings)
    if path.exists():
        return path.read_text().strip() or None
    if not create:
        return None
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    key = "wk_" + secrets.token_urlsafe(18)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def _serve(service: str, settings: Settings) -> None:
    from aiohttp import web

    from services.workers import serve_command, supervise, worker_count, worker_index

    workers, check = 1, None
    if service == "collector":
        from services.collector.app import check, make_app
        host, port, workers = settings.collector_host, settings.collector_port, \
            worker_count(settings.collector_workers)
        port_field = "collector_port"
    elif service == "recommender":
        from services.recommender.app import check, make_app
        host, port, workers = settings.recommender_host, settings.recommender_port, \
            worker_count(settings.recommender_workers)
        port_field = "recommender_port"
    elif service == "experiments":
        from services.experiments.api.app import make_app
        host, port = settings.experiments_host, settings.experiments_port
    else:
        raise SystemExit(f"unknown service {service!r}; choose collector, recommender or experiments")
    if check is not None:  # a bad setting: one clear message, before any worker starts
        try:
            check(settings)
        except SettingsError as exc:
            raise SystemExit(f"clickloop: configuration error: {exc}") from None
    index = worker_index()
    if index is None and workers > 1:  # this process supervises; the workers serve
        if port == 0:  # every worker must bind the same port
            from services.infra import free_port
            port = free_port(host)
        env = {**os.environ, **dataclasses.replace(settings, **{port_field: port}).as_env()}
        print(f"[{service}] listening on http://{host}:{port} with {workers} workers", flush=True)
        raise SystemExit(supervise(service, serve_command(service), workers, env))
    who = f"{service} worker {index}" if index is not None else service
    print(f"[{who}] listening on http://{host}:{port}", flush=True)
    web.run_app(make_app(settings), host=host, port=port, print=None, access_log=None,
                reuse_port=index is not None)


def _workers(configured: int) -> str:
    from services.workers import worker_count

    n = worker_count(configured)
    return f"  ({n} workers)" if n > 1 else ""


def _up(settings: Settings) -> int:
    from services import infra
    from streams.topics import ensure_topics

    if settings.require_write_key and not settings.write_keys:
        settings = dataclasses.replace(settings, write_keys=(_local_write_key(settings, create=True),))
    started = infra.start_all(settings)
    for svc in started:
        print(f"started {svc.name} on {svc.host}:{svc.port} (log {svc.log})", flush=True)
    asyncio.run(ensure_topics(settings))
    cdc_started = []
    if settings.cdc_enabled:  # CLICKLOOP_CDC_ENABLED: PostgreSQL + Connect/Debezium too
        from services import infra_cdc
        try:
            cdc_started = infra_cdc.up(settings)
        except infra.InfraError as exc:
            print(f"clickloop up: CDC sources: {exc}", file=sys.stderr)
            for svc in started:
                infra.stop(svc)
            return 1
        for svc in cdc_started:
            print(f"started {svc.name} on {svc.host}:{svc.port} (state {svc.state_dir})", flush=True)
    me = [sys.executable, "-m", "services.cli"]
    children = {
        name: subprocess.Popen([*me, *cmd], env={**os.environ, **settings.as_env()})
        for name, cmd in [*((p, ["worker", p]) for p in PROCESSORS
                            if settings.cdc_enabled or p not in CDC_PROCESSORS),
                          ("collector", ["serve", "collector"]),
                          ("recommender", ["serve", "recommender"]),
                          ("experiments", ["serve", "experiments"])]
    }
    print(f"""
clickloop is up
  collector    http://{settings.collector_host}:{settings.collector_port}/v1/batch{_workers(settings.collector_workers)}
  write key    {settings.write_keys[0] if settings.write_keys else "(none required)"}  (HTTP Basic user name)
  recommender  http://{settings.recommender_host}:{settings.recommender_port}/v1/recommendations?user_id=...&k=5{_workers(settings.recommender_workers)}
  experiments  http://{settings.experiments_host}:{settings.experiments_port}/  (dashboard; API /v1/experiments, /openapi.json)
  kafka        {settings.kafka_bootstrap}
  redis        {settings.redis_url}
  archive      {settings.archive_root} (Parquet, hive-partitioned)
Send traffic with `.venv/bin/clickloop demo`; Ctrl-C stops everything.
""", flush=True)
    if settings.cdc_enabled:
        print(f"  cdc          PostgreSQL {settings.pg_host}:{settings.pg_port}/{settings.pg_database}, "
              f"Kafka Connect http://127.0.0.1:{settings.connect_port}, topics "
              f"{settings.topic('cdc.' + settings.cdc_server)}.<schema>.<table> (`clickloop cdc status`)",
              flush=True)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        while not stopping:
            for name, proc in children.items():
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; stopping", flush=True)
                    stopping, code = True, 1
            time.sleep(0.5)
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for svc in cdc_started:  # Connect before PostgreSQL, both before Kafka
            infra_cdc.stop_service(settings, svc)
            print(f"stopped {svc.name}", flush=True)
        for svc in started:
            infra.stop(svc)
            print(f"stopped {svc.name}", flush=True)
    return code


async def _demo(settings: Settings, events: int | None, rate: float, visitors: int,
                history_hours: float, batch_size: int) -> None:
    import aiohttp
    import orjson

    from services.demo import Traffic

    url = f"http://{settings.collector_host}:{settings.collector_port}/v1/batch"
    key = _local_write_key(settings, create=False)
    if key is None and settings.require_write_key:
        raise SystemExit("clickloop demo: no write key: set CLICKLOOP_WRITE_KEYS, or start the "
                         f"collector with `clickloop up` (it keeps one in {_write_key_file(settings)})")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    traffic = Traffic(seed=int(time.time()), visitors=visitors)
    history_ms = int(history_hours * 3_600_000)
    stream = traffic.stream(int(time.time() * 1000) - history_ms, spread_ms=history_ms)
    sent, t0 = 0, time.monotonic()
    async with aiohttp.ClientSession(headers=headers) as http:
        while events is None or sent < events:
            n = batch_size if events is None else min(batch_size, events - sent)
            batch = []
            for ts, event in stream:
                lag_s = ts / 1000 - time.time()
                if lag_s > 0:  # simulated time caught up with the clock: go real-time
                    await asyncio.sleep(lag_s)
                batch.append(event)
                if len(batch) == n:
                    break
            async with http.post(url, data=orjson.dumps({"batch": batch})) as resp:
                if resp.status != 200:
                    raise SystemExit(f"collector answered {resp.status}: {await resp.text()}")
            sent += len(batch)
            if sent % (batch_size * 20) == 0 or sent == events:
                print(f"sent {sent} events ({sent / (time.monotonic() - t0):.0f}/s)", flush=True)
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)


def _add_stats_parser(sub) -> None:
    st = sub.add_parser("stats", help="experiment statistics (no Kafka or Redis needed)")
    kinds = st.add_subparsers(dest="stats_command", required=True)
    ab = kinds.add_parser("ab", help="frequentist, Bayesian and bandit results for a control and a treatment",
                          description="Arms are RATE_OR_CONVERSIONS:USERS: 0.07:1062 is a rate of 7 % "
                                      "of 1062 users (74 conversions), 74:1062 a count.")
    ab.add_argument("--control", required=True, metavar="RATE_OR_CONVERSIONS:USERS", help="arm A")
    ab.add_argument("--treatment", required=True, metavar="RATE_OR_CONVERSIONS:USERS", help="arm B")
    ab.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    ab.add_argument("--power", type=float, default=0.8, help="power of the sample size (default 0.8)")
    ab.add_argument("--mde", help="minimum detectable change for the sample size: absolute (0.01) or "
                                  "relative (10%%); default: the observed difference")
    ab.add_argument("--split", default="50:50", help="planned traffic split A:B for the SRM check (default 50:50)")
    ab.add_argument("--prior", default="1:1", help="Beta prior ALPHA:BETA (default 1:1)")
    ab.add_argument("--loss-threshold", type=float, default=None,
                    help="stop when an arm's expected loss is below this share of A's rate (default 0.01)")
    ab.add_argument("--draws", type=int, default=None, help="Monte Carlo draws (default 200000)")
    ab.add_argument("--seed", type=int, default=None, help="Monte Carlo seed (default: fresh, printed)")
    ab.add_argument("--json", action="store_true", help="print one JSON object")


def _add_cdc_parser(sub):
    """`clickloop cdc ACTION`: one subparser per action, dispatched by `_cdc`."""
    cdc = sub.add_parser("cdc", help="change data capture: history tables from database changes")
    actions = cdc.add_subparsers(dest="cdc_command", required=True)
    snap = actions.add_parser(
        "snapshot", help="dump a table as Debezium snapshot reads (op=r) onto cdc.<server>.<schema>.<table>",
        description="Seeds the cdc_history worker as Debezium's initial snapshot would, for sources "
                    "without a connector: PostgreSQL (COPY through psql), a CSV export with a header "
                    "line, or a JSON-lines export (mongoexport).")
    snap.add_argument("--table", required=True, help="table name (the topic's last part)")
    snap.add_argument("--server", required=True, help="logical server name (Debezium's topic prefix after cdc.)")
    snap.add_argument("--schema", required=True, help="schema (PostgreSQL) or database (MySQL) name")
    src = snap.add_mutually_exclusive_group(required=True)
    src.add_argument("--postgres", metavar="DSN", help="libpq connection string or URI of the database")
    src.add_argument("--csv", metavar="FILE", help="CSV file with a header line")
    src.add_argument("--jsonl", metavar="FILE", help="JSON-lines file, one row object a line")
    snap.add_argument("--key", required=True, metavar="COL[,COL]", help="primary-key column(s)")
    snap.add_argument("--null", default="\\N", help="CSV cell that means null (default \\N)")
    return actions


CDC_SOURCE_ACTIONS = ("up", "down", "status", "resnapshot")


def _add_cdc_source_actions(actions) -> None:
    """`clickloop cdc up|down|status|resnapshot` (services/infra_cdc.py), beside `cdc snapshot`."""
    actions.add_parser("up", help="start PostgreSQL (wal_level=logical) and Kafka Connect with the Debezium "
                                  "PostgreSQL connector; returns once the connector is RUNNING")
    actions.add_parser("down", help="stop Kafka Connect and PostgreSQL (offsets and slot kept)")
    actions.add_parser("status", help="PostgreSQL, Kafka Connect and the connector's state")
    again = actions.add_parser("resnapshot", help="start the connector over with a new snapshot (its "
                                                  "offsets reset, its slot dropped) and write the deletes "
                                                  "of the rows that went in the gap: after a lost slot")
    again.add_argument("--timeout", type=float, default=None,
                       help="seconds to wait for the snapshot to complete (default 300)")


def _cdc_sources(settings: Settings, action: str, timeout_s: float | None = None) -> int:
    from services import infra, infra_cdc
    try:
        if action == "up":
            if not infra.kafka_ready(settings):
                print(f"clickloop cdc: Kafka does not answer at {settings.kafka_bootstrap}: "
                      "start it first (`clickloop infra start`)", file=sys.stderr)
                return 1
            t0 = time.monotonic()
            for svc in infra_cdc.up(settings):
                print(f"started {svc.name} on {svc.host}:{svc.port} (state {svc.state_dir})")
            print(f"cdc up in {time.monotonic() - t0:.1f} s")
        elif action == "down":
            infra_cdc.down(settings)
        elif action == "resnapshot":
            t0 = time.monotonic()
            deleted = infra_cdc.resnapshot(settings, timeout_s or infra_cdc.RESNAPSHOT_TIMEOUT_S)
            print(f"connector {infra_cdc.connector_name(settings)}: a new snapshot in "
                  f"{time.monotonic() - t0:.1f} s; rows deleted in the gap, written as deletes: "
                  + (", ".join(f"{t} {n}" for t, n in deleted.items()) or "none"))
        for name, line in infra_cdc.status(settings).items():
            print(f"{name}: {line}")
    except infra.InfraError as exc:
        print(f"clickloop cdc: {exc}", file=sys.stderr)
        return 1
    return 0


def _cdc(settings: Settings, args) -> int:
    if args.cdc_command == "snapshot":
        from services.cdc.snapshot import SnapshotError, run as snapshot
        try:
            return asyncio.run(snapshot(settings, args))
        except SnapshotError as exc:
            print(f"clickloop cdc snapshot: {exc}", file=sys.stderr)
            return 2
    raise SystemExit(f"unknown cdc action {args.cdc_command!r}")


def _stats(args) -> int:
    import json

    from services.experiments import ExperimentError
    from services.experiments.bayesian import DEFAULT_LOSS_THRESHOLD, Beta
    from services.experiments.inputs import parse_arm
    from services.experiments.report import DEFAULT_DRAWS, ab_report, parse_mde, parse_split, render

    try:
        try:
            prior_alpha, prior_beta = (float(x) for x in args.prior.split(":"))
        except ValueError:
            raise ExperimentError(f"--prior {args.prior!r}: expected ALPHA:BETA such as 1:1") from None
        prior = Beta(prior_alpha, prior_beta)
        report = ab_report(parse_arm(args.control), parse_arm(args.treatment), alpha=args.alpha,
                           power=args.power, mde=parse_mde(args.mde) if args.mde else None,
                           split=parse_split(args.split), prior=prior,
                           draws=DEFAULT_DRAWS if args.draws is None else args.draws, seed=args.seed,
                           loss_threshold=(DEFAULT_LOSS_THRESHOLD if args.loss_threshold is None
                                           else args.loss_threshold))
    except ExperimentError as exc:
        print(f"clickloop stats ab: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else render(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clickloop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start everything locally, in the foreground")
    demo = sub.add_parser("demo", help="post synthetic traffic to the collector")
    demo.add_argument("--events", type=int, default=None, help="stop after N events (default: run until Ctrl-C)")
    demo.add_argument("--rate", type=float, default=1000, help="at most this many events/s (default 1000)")
    demo.add_argument("--visitors", type=int, default=1000, help="distinct visitors (default 1000)")
    demo.add_argument("--history-hours", type=float, default=6,
                      help="simulated event time starts this long ago (default 6)")
    demo.add_argument("--batch-size", type=int, default=50, help="events per request (default 50)")
    worker = sub.add_parser("worker", help="run one stream processor")
    worker.add_argument("processor", choices=PROCESSORS)
    serve = sub.add_parser("serve", help="run one HTTP service (collector and recommender: "
                                          "CLICKLOOP_COLLECTOR_WORKERS / _RECOMMENDER_WORKERS "
                                          "processes on the port)")
    serve.add_argument("service", choices=["collector", "recommender", "experiments"])
    rep = sub.add_parser("replay", help="re-feed a topic range for a backfill (dry run by default)")
    rep.add_argument("--topic", required=True, help="topic to replay, without the prefix (e.g. clicks)")
    rep.add_argument("--from", dest="from_time", help="ISO time: first event time to replay")
    rep.add_argument("--to", dest="to_time", help="ISO time: replay events before this time")
    rep.add_argument("--from-offset", type=int, help="first offset (every partition)")
    rep.add_argument("--to-offset", type=int, help="stop before this offset (every partition)")
    rep.add_argument("--partitions", help="comma-separated partitions (default: all)")
    rep.add_argument("--source", choices=["live", "archive"], default="live")
    rep.add_argument("--target", required=True,
                     help="topic:<backfill topic> or processor:<sessionize|features>")
    rep.add_argument("--rate", type=float, help="at most this many records/s")
    rep.add_argument("--execute", action="store_true", help="do it (default: print the plan only)")
    tr = sub.add_parser("train", help="train the recommender's model from the Parquet archive, "
                                      "evaluate it, write the artifact and announce it on `models`")
    tr.add_argument("--name", help="model name (default CLICKLOOP_MODEL_NAME, als)")
    tr.add_argument("--since", help="first event time to train on: ISO-8601 or epoch ms (default: all)")
    tr.add_argument("--until", help="train on events before this time: ISO-8601 or epoch ms")
    tr.add_argument("--test-fraction", type=float, default=0.2,
                    help="share of the latest interactions held out for evaluation (default 0.2)")
    tr.add_argument("--factors", type=int, default=32, help="ALS latent factors (default 32)")
    tr.add_argument("--iterations", type=int, default=15, help="ALS iterations (default 15)")
    tr.add_argument("--regularization", type=float, default=0.1, help="ALS L2 weight (default 0.1)")
    tr.add_argument("--alpha", type=float, default=10.0,
                    help="ALS confidence per unit of interaction weight, >= 1 (default 10)")
    tr.add_argument("--backend", choices=["auto", "implicit", "numpy"], default="auto",
                    help="ALS trainer (default auto: the implicit library when it imports)")
    tr.add_argument("--k", type=int, default=10, help="k of recall@k and NDCG@k (default 10)")
    tr.add_argument("--no-announce", action="store_true",
                    help="write the artifact only; do not announce it on `models`")
    tr.add_argument("--precompute", action="store_true",
                    help="also write each active user's top k to Redis (topk:<visitor>)")
    tr.add_argument("--precompute-k", type=int, default=None,
                    help="items per precomputed list (default: --k)")
    tr.add_argument("--active-days", type=float, default=7.0,
                    help="precompute for users with an interaction in the data's last D days (default 7)")
    tr.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    _add_stats_parser(sub)
    _add_cdc_source_actions(_add_cdc_parser(sub))
    inf = sub.add_parser("infra", help="the local Kafka broker and Redis server")
    inf.add_argument("action", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)
    if args.command == "stats":  # pure statistics: needs no settings, Kafka or Redis
        return _stats(args)

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"clickloop: configuration error: {exc}", file=sys.stderr)
        return 2

    if args.command == "up":
        return _up(settings)
    if args.command == "demo":
        try:
            asyncio.run(_demo(settings, args.events, args.rate, args.visitors,
                              args.history_hours, args.batch_size))
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "replay":
        from services.replay.command import run
        from services.replay.plan import ReplayError
        try:
            return asyncio.run(run(settings, args))
        except ReplayError as exc:
            print(f"clickloop replay: {exc}", file=sys.stderr)
            return 2
    if args.command == "train":
        from services.model.train import TrainError, run as train
        try:
            return train(settings, args)
        except TrainError as exc:
            print(f"clickloop train: {exc}", file=sys.stderr)
            return 2
    if args.command == "cdc" and args.cdc_command in CDC_SOURCE_ACTIONS:
        return _cdc_sources(settings, args.cdc_command, getattr(args, "timeout", None))
    if args.command == "cdc":
        return _cdc(settings, args)
    if args.command == "worker":
        from streams.app import run_worker
        run_worker(args.processor, settings)
        return 0
    if args.command == "serve":
        _serve(args.service, settings)
        return 0
    from services import infra
    try:
        if args.action == "start":
            for svc in infra.start_all(settings):
                print(f"started {svc.name} on {svc.host}:{svc.port} (log {svc.log})")
        elif args.action == "stop":
            infra.stop_all(settings)
        for name, line in infra.status(settings).items():
            print(f"{name}: {line}")
    except infra.InfraError as exc:
        print(f"clickloop: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
