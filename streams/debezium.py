"""Debezium change events from Kafka record bytes: pure decoding, no I/O.

A Debezium record is a key (the row's primary-key columns) and a value, the
envelope `{before, after, source, op, ts_ms, transaction}`; a delete is
followed by a tombstone (same key, null value) for log compaction. With the
JsonConverter's `schemas.enable=true` both key and value come wrapped as
`{"schema": ..., "payload": ...}`; both forms are accepted, and so are keys
written by the StringConverter (`Struct{id=1}`).

Snapshot rows a connector writes as inserts (`op=c` with `source.snapshot`
set, as older MySQL connectors did) decode as reads (`op=r`).

`decode` returns a `ChangeEvent`, or None for a tombstone; anything that is
not a change event raises `BadChangeEvent` with the reason, so the worker can
dead-letter the record with its position and carry on.

Positions
---------
Per key, events are ordered by `ChangeEvent.position`, a tuple of integers
compared left to right; equal positions are the same event delivered twice.
- PostgreSQL: `(commit LSN, LSN)` from `source.sequence`, the string
  `'["<last committed LSN>", "<LSN>"]'`. The LSN alone does not order events of
  interleaved transactions; Debezium emits transactions in commit order, and
  the last committed LSN grows with every commit, so the pair does. Where the
  commit LSN is null (snapshot reads, the first transaction after a
  connector's very first start) or `sequence` is absent (Debezium before 1.5),
  the event's own LSN stands in for it: a transaction's changes precede its
  commit, so the next transaction's commit LSN is larger than any of them.
- MySQL / MariaDB: `(binlog file number, pos, row)`.
- Any other connector: the integers of `source.sequence`, when it has one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal

import orjson

Op = Literal["c", "u", "d", "r", "t"]
OPS = frozenset({"c", "u", "d", "r", "t"})
NEW_KEY_HEADER = "__debezium.newkey"     # on the delete of a primary-key change
OLD_KEY_HEADER = "__debezium.oldkey"     # on the create of a primary-key change
_MYSQL = frozenset({"mysql", "mariadb"})
_NOT_SNAPSHOT = (None, False, "false")
_STRUCT_TEXT = re.compile(r"^Struct\{(.*)\}$", re.S)
_BINLOG_NUMBER = re.compile(r"(\d+)$")


class BadChangeEvent(ValueError):
    """A record that is not a Debezium change event; str(error) is the reason (for the DLQ).

    A ValueError like streams.codec.BadRecord, not a subclass of it: streams.codec
    imports schemas.clicks, which imports aiokafka, and this module stays pure."""


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    table: str                     # "<schema>.<table>" or "<database>.<table>"
    key: dict | None               # primary-key columns; None only for a truncate
    key_id: str | None
    op: Op
    before: dict | None
    after: dict | None
    ts_ms: int                     # source.ts_ms: when the source committed the change
    position: tuple[int, ...]
    source_position: str
    tx_id: str | None
    connector: str
    moved_to: str | None = None    # key_id from the __debezium.newkey header
    moved_from: str | None = None  # key_id from the __debezium.oldkey header


def key_id(key: dict) -> str:
    """The text that names a row: a one-column key's value (strings as they are,
    other values as JSON), else the key as compact JSON with sorted columns."""
    if len(key) == 1:
        (value,) = key.values()
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    return orjson.dumps(key, option=orjson.OPT_SORT_KEYS).decode()


def decode(key: bytes | None, value: bytes | None,
           headers: Iterable[tuple[str, bytes | None]] = ()) -> ChangeEvent | None:
    """A Kafka record of a Debezium table topic as a ChangeEvent; None for a tombstone.

    Raises BadChangeEvent (with the reason) for anything else.
    """
    if value is None or value == b"":
        return None
    envelope = _unwrap(_json(value, "value"))
    if envelope is None:
        return None   # {"schema": ..., "payload": null}: a tombstone written with its schema
    if not isinstance(envelope, dict):
        raise BadChangeEvent("not a Debezium envelope: the value is not a JSON object")
    op = envelope.get("op")
    if op is None:
        raise BadChangeEvent(_what_else(envelope))
    if op not in OPS:
        raise BadChangeEvent(f"not a row change: op {op!r} (expected one of c, u, d, r, t)")
    source = envelope.get("source")
    if not isinstance(source, dict):
        raise BadChangeEvent('not a Debezium envelope: no "source" object')
    if op == "c" and source.get("snapshot") not in _NOT_SNAPSHOT:
        op = "r"   # snapshot rows written as inserts (older MySQL connectors) are reads
    ts_ms = source.get("ts_ms")
    if type(ts_ms) is not int:
        raise BadChangeEvent("source.ts_ms (the commit time) is missing or not an integer")
    before, after = envelope.get("before"), envelope.get("after")
    if op in ("c", "u", "r") and not isinstance(after, dict):
        raise BadChangeEvent(f'op {op!r} without an "after" row')
    if before is not None and not isinstance(before, dict):
        raise BadChangeEvent('"before" is not a row (a JSON object)')
    row_key = _key(key)
    if row_key is None and op != "t":
        raise BadChangeEvent("the record has no key: a table without a primary key cannot have "
                             "per-row history (set the connector's message.key.columns)")
    position, source_position = _position(source)
    moved_to = moved_from = None
    for name, raw in headers:
        if name == NEW_KEY_HEADER:
            moved_to = _header_key_id(raw)
        elif name == OLD_KEY_HEADER:
            moved_from = _header_key_id(raw)
    return ChangeEvent(
        table=_table(source), key=row_key, key_id=None if row_key is None else key_id(row_key),
        op=op, before=before, after=after, ts_ms=ts_ms, position=position,
        source_position=source_position, tx_id=_tx_id(source, envelope.get("transaction")),
        connector=str(source.get("connector") or ""), moved_to=moved_to, moved_from=moved_from)


def _json(raw: bytes, part: str):
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadChangeEvent(f"{part} is not JSON: {exc}") from None


def _unwrap(doc):
    """The payload of a JsonConverter `{"schema", "payload"}` wrapper, else the document."""
    if isinstance(doc, dict) and "payload" in doc and "schema" in doc and "op" not in doc \
            and len(doc) == 2:
        return doc["payload"]
    return doc


def _what_else(doc: dict) -> str:
    """Why a JSON object without `op` is not a change event, naming what it looks like."""
    if doc.get("status") in ("BEGIN", "END"):
        return (f"a transaction metadata record (status {doc['status']}), not a change event: "
                "read the table topics, not <prefix>.transaction")
    if "ddl" in doc or "tableChanges" in doc:
        return "a schema change event, not a row change: read the table topics only"
    if "before" not in doc and "after" not in doc and "source" not in doc:
        if set(doc) <= {"ts_ms"}:
            return "a heartbeat record, not a change event"
        return ('not a Debezium envelope: no "op", "before", "after" or "source" (was the '
                "ExtractNewRecordState SMT applied? history needs the full envelope)")
    return 'not a Debezium envelope: no "op"'


def _key(raw: bytes | None) -> dict | None:
    if raw is None or raw == b"":
        return None
    text = raw.decode("utf-8", "replace")
    struct = _STRUCT_TEXT.match(text)
    if struct:
        return _struct_text(struct.group(1))
    key = _unwrap(_json(raw, "key"))
    if key is None:
        return None
    if not isinstance(key, dict) or not key:
        raise BadChangeEvent("the key is not an object of primary-key columns")
    return key


def _struct_text(body: str) -> dict:
    """`Struct{id=1,plan=pro}` (StringConverter keys) as columns; values stay text."""
    pairs = [p.split("=", 1) for p in body.split(",") if p]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise BadChangeEvent(f"the key Struct{{{body}}} is not column=value pairs")
    return {name.strip(): value for name, value in pairs}


def _header_key_id(raw: bytes | None) -> str | None:
    """The key_id a primary-key-change header points at; best effort (the header
    converter decides the form), so an unreadable header is kept as its text."""
    if not raw:
        return None
    try:
        key = _key(raw)
    except BadChangeEvent:
        return raw.decode("utf-8", "replace")
    return None if key is None else key_id(key)


def _table(source: dict) -> str:
    table = source.get("table")
    if not isinstance(table, str) or not table:
        raise BadChangeEvent("source.table is missing")
    container = source.get("schema") or source.get("db")
    return f"{container}.{table}" if container else table


def _int(value, what: str) -> int:
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise BadChangeEvent(f"{what} is not an integer: {value!r}")


def pg_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL prints it (`0/16B37A0`)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _sequence(source: dict) -> list | None:
    raw = source.get("sequence")
    if raw is None:
        return None
    try:
        seq = orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        raise BadChangeEvent(f"source.sequence is not a JSON array: {raw!r}") from None
    if not isinstance(seq, list):
        raise BadChangeEvent(f"source.sequence is not a JSON array: {raw!r}")
    return seq


def _position(source: dict) -> tuple[tuple[int, ...], str]:
    connector = source.get("connector")
    if connector == "postgresql":
        seq = _sequence(source)
        lsn = source.get("lsn")
        if seq is not None and len(seq) == 2 and seq[1] is not None:
            lsn = seq[1]
        if lsn is None:
            raise BadChangeEvent("a PostgreSQL event without source.lsn or source.sequence")
        lsn = _int(lsn, "source.lsn")
        commit = seq[0] if seq is not None and len(seq) == 2 else None
        commit = lsn if commit is None else _int(commit, "the commit LSN of source.sequence")
        return (commit, lsn), f"lsn {pg_lsn(lsn)} commit {pg_lsn(commit)}"
    if connector in _MYSQL:
        file, pos = source.get("file"), source.get("pos")
        number = _BINLOG_NUMBER.search(file) if isinstance(file, str) else None
        if number is None or type(pos) is not int:
            raise BadChangeEvent("a MySQL event without source.file (a binlog name) and source.pos")
        row = source.get("row") if type(source.get("row")) is int else 0
        return (int(number.group(1)), pos, row), f"{file}:{pos}#{row}"
    seq = _sequence(source)
    if seq:
        return (tuple(0 if s is None else _int(s, "source.sequence") for s in seq),
                f"sequence {source['sequence']}")
    raise BadChangeEvent(f"no ordering position for connector {connector!r}: expected "
                         "postgresql, mysql/mariadb, or a source.sequence")


def _tx_id(source: dict, transaction) -> str | None:
    if source.get("connector") == "postgresql" and source.get("txId") is not None:
        return str(source["txId"])
    if source.get("gtid"):
        return str(source["gtid"])
    if isinstance(transaction, dict) and transaction.get("id") is not None:
        return str(transaction["id"])
    return None
