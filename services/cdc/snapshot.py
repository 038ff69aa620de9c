"""`clickloop cdc snapshot`: a table dumped as Debezium snapshot reads (`op=r`).

For sources without a connector (or to onboard a table before its connector
runs), the rows of a PostgreSQL table (`COPY ... TO STDOUT` through Debian's
`psql`), a CSV export (mysqldump --tab, `COPY ... CSV HEADER`, a spreadsheet) or
a JSON-lines export (mongoexport) become change events in Debezium's envelope on
`cdc.<server>.<schema>.<table>`, so the `cdc_history` worker seeds history as
from Debezium's own initial snapshot: a read opens a version only when the row
differs from the one held, so snapshotting again adds no fake changes.

Positions (streams/debezium.py, "Positions"):
- PostgreSQL: the events say `connector: postgresql` with the LSN of
  `pg_current_wal_lsn()` taken in the snapshot's own REPEATABLE READ
  transaction, `sequence [null, "<lsn>"]` as Debezium writes for its snapshot,
  and the database's `now()` as the commit time. A change made after the dump
  has a larger commit LSN, so it orders after the read however the two arrive.
- Files: `connector: clickloop-snapshot` with `sequence [<taken ms>, <line>]`,
  the time the snapshot was taken then the row's place in the file: a later
  snapshot of the same table orders after an earlier one.

Column values are kept as the source renders them: CSV cells as text
(`--null`, default `\\N`, marks a null), JSON values as they are, PostgreSQL
values as `row_to_json` renders them (timestamps as ISO text, where Debezium's
JsonConverter writes epoch microseconds by default): snapshot and stream of one
table should come from the same kind of source, or a first streamed change will
differ from the read in those columns' form.
"""
from __future__ import annotations

import csv
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import orjson

from streams.debezium import pg_lsn

CONNECTOR = "clickloop-snapshot"
VERSION = "clickloop-snapshot/1"


class SnapshotError(ValueError):
    """The dump cannot be read or turned into change events; the message says why."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where the rows came from and when: what goes in each event's `source`."""

    server: str
    schema: str
    table: str
    ts_ms: int                     # the snapshot's time (commit time of the reads)
    lsn: int | None = None         # PostgreSQL: pg_current_wal_lsn() in the dump's transaction
    tx_id: int | None = None


def events(rows: Iterable[dict], source: Source, key: list[str],
           emitted_ms: int | None = None) -> Iterator[tuple[bytes, bytes]]:
    """Kafka (key, value) records of Debezium `op=r` events for `rows`, in order."""
    if not key:
        raise SnapshotError("--key names no column: give the primary-key column(s)")
    base = {"version": VERSION, "name": source.server, "ts_ms": source.ts_ms, "db": source.server,
            "schema": source.schema, "table": source.table}
    if source.lsn is None:
        base["connector"] = CONNECTOR
    else:
        base.update(connector="postgresql", lsn=source.lsn, txId=source.tx_id,
                    sequence=orjson.dumps([None, str(source.lsn)]).decode())
    rows = iter(rows)
    first = True
    n = -1
    for n, row in enumerate(rows):
        missing = [c for c in key if c not in row]
        if missing:
            raise SnapshotError(f"row {n + 1} has no key column {', '.join(missing)} "
                                f"(columns: {', '.join(row)})")
        src = dict(base)
        if source.lsn is None:
            src["sequence"] = orjson.dumps([source.ts_ms, n]).decode()
        src["snapshot"] = "first" if first else "true"
        first = False
        yield (orjson.dumps({c: row[c] for c in key}),
               orjson.dumps({"before": None, "after": row, "source": src, "op": "r",
                             "ts_ms": source.ts_ms if emitted_ms is None else emitted_ms,
                             "transaction": None}))


def read_csv(path: Path, null: str = "\\N") -> Iterator[dict]:
    """Rows of a CSV file with a header line; cells equal to `null` are nulls."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise SnapshotError(f"{path}: empty, or no header line naming the columns")
        for n, cells in enumerate(reader, start=2):
            if not cells:
                continue
            if len(cells) != len(header):
                raise SnapshotError(f"{path}:{n}: {len(cells)} cells for {len(header)} columns")
            yield {c: None if v == null else v for c, v in zip(header, cells)}


def read_jsonl(path: Path) -> Iterator[dict]:
    """Rows of a JSON-lines file (one object a line, e.g. mongoexport's output)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise SnapshotError(f"{path}:{n}: not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise SnapshotError(f"{path}:{n}: not a JSON object")
            yield row


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def postgres_script(schema: str, table: str) -> str:
    """One psql session: position and time, then the rows, in one consistent snapshot.

    `COPY ... (FORMAT csv)` with a quote and delimiter that JSON never leaves raw
    passes each `row_to_json` line through untouched (text format would double
    its backslashes)."""
    return (
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;\n"
        "SELECT pg_current_wal_lsn() - '0/0', "
        "(extract(epoch FROM now()) * 1000)::bigint, txid_current_if_assigned();\n"
        f"COPY (SELECT row_to_json(t) FROM {_ident(schema)}.{_ident(table)} t) TO STDOUT "
        "WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02');\n"
        "COMMIT;\n")


def read_postgres(dsn: str, server: str, schema: str, table: str,
                  psql: str = "psql") -> tuple[Source, list[dict]]:
    """The table's rows and the snapshot's position, through `psql` (postgresql-client)."""
    try:
        done = subprocess.run([psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn],
                              input=postgres_script(schema, table), capture_output=True,
                              text=True, timeout=3600)
    except FileNotFoundError:
        raise SnapshotError(f"{psql} not found: install Debian's postgresql-client") from None
    if done.returncode != 0:
        raise SnapshotError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
    lines = done.stdout.splitlines()
    if not lines:
        raise SnapshotError("psql printed nothing: no position line")
    try:
        lsn, ts_ms, tx_id = lines[0].split("|")
        source = Source(server, schema, table, int(ts_ms), int(lsn.split(".")[0]),
                        int(tx_id) if tx_id else None)
    except ValueError:
        raise SnapshotError(f"unexpected first line from psql: {lines[0]!r}") from None
    return source, [orjson.loads(line) for line in lines[1:] if line]


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]]) -> int:
    """Send the records (acks=all, idempotent; Kafka's default partitioner on the key, as
    Debezium's), return how many."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    sent = 0
    try:
        pending = []
        for key, value in records:
            pending.append(await producer.send(topic, key=key, value=value))
            sent += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent


async def run(settings, args) -> int:
    """`clickloop cdc snapshot`: read the dump, write the events, print a summary."""
    import time

    from streams import topics

    key = [c.strip() for c in args.key.split(",") if c.strip()]
    if args.postgres:
        source, rows = read_postgres(args.postgres, args.server, args.schema, args.table)
        where = f"PostgreSQL {args.schema}.{args.table} at LSN {pg_lsn(source.lsn)}"
    else:
        taken = int(time.time() * 1000)
        source = Source(args.server, args.schema, args.table, taken)
        path = Path(args.csv or args.jsonl)
        if not path.is_file():
            raise SnapshotError(f"{path}: no such file")
        rows = read_csv(path, args.null) if args.csv else read_jsonl(path)
        where = str(path)
    name = topics.cdc_topic(args.server, args.schema, args.table)
    await topics.ensure_topics(settings, (name,))
    sent = await produce(settings.kafka_bootstrap, settings.topic(name),
                         events(rows, source, key, emitted_ms=int(time.time() * 1000)))
    print(f"snapshot of {where}: {sent} rows as op=r events on {settings.topic(name)}", flush=True)
    return 0
