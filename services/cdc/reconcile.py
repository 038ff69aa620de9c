"""Deletes a new snapshot cannot show: pure, no I/O.

After `clickloop cdc resnapshot` (a replication slot lost, the changes of the
gap gone with the WAL) the connector reads every row again. The history fold
(streams/history.py) turns those reads into versions where rows changed, but a
row deleted in the gap is simply not read, and would stay current forever.

So the keys that were current before the new snapshot (`Current`: the last
event of each key, by position, is not a delete) and that the new snapshot did
not read are deleted: `gap_deletes` writes, for each, a delete in Debezium's
envelope, its `before` the last image known, at the new snapshot's position
and time (`Cut`), followed by a tombstone as Debezium writes after a delete.
That position orders the delete after everything the old slot delivered (the
gap's commits are older than the new slot) and before anything the new slot
streams (younger than its snapshot), so the fold places it right whatever the
arrival order. The delete's time is the snapshot's: the row went at some
moment of the gap, no later than that. Each such event says so in
`source.clickloop` ("resnapshot: deleted in the gap").
"""
from __future__ import annotations

from dataclasses import dataclass
import orjson

from streams.debezium import ChangeEvent

MARK = "resnapshot: deleted in the gap"


@dataclass(frozen=True, slots=True)
class Cut:
    """The new snapshot's point: its LSN (PostgreSQL) and commit time (epoch ms)."""

    lsn: int
    ts_ms: int


class Current:
    """The keys current so far, fed one event at a time (memory grows with the keys, not
    with the events): per key id, its Kafka key and last event by position, unless that
    is a delete or precedes a truncate. Tombstones (None) change nothing."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[bytes, ChangeEvent]] = {}
        self.truncated: tuple[int, ...] | None = None

    def add(self, raw_key: bytes, event: ChangeEvent | None) -> None:
        if event is None:
            return
        if event.op == "t":
            if self.truncated is None or event.position > self.truncated:
                self.truncated = event.position
            return
        held = self.last.get(event.key_id)  # type: ignore[arg-type]
        if held is None or event.position > held[1].position:
            self.last[event.key_id] = (raw_key, event)  # type: ignore[index]

    def held(self) -> dict[str, tuple[bytes, ChangeEvent]]:
        cut = self.truncated
        return {k: (raw, e) for k, (raw, e) in self.last.items()
                if e.op != "d" and (cut is None or e.position > cut)}


def gap_deletes(before: dict[str, tuple[bytes, ChangeEvent]], read: set[str], cut: Cut,
                source: dict) -> list[tuple[bytes, bytes | None]]:
    """Kafka records (key, value) of a delete and its tombstone for every key current
    `before` the new snapshot that it did not `read`, in key order. `source` is one of
    the table's Debezium `source` blocks (its names: server, db, schema, table)."""
    out: list[tuple[bytes, bytes | None]] = []
    base = {k: source[k] for k in ("version", "name", "db", "schema", "table") if k in source}
    base.update(connector="postgresql", ts_ms=cut.ts_ms, snapshot="false", lsn=cut.lsn,
                sequence=orjson.dumps([str(cut.lsn), str(cut.lsn)]).decode(), txId=None,
                clickloop=MARK)
    for key_id in sorted(set(before) - read):
        raw_key, last = before[key_id]
        out.append((raw_key, orjson.dumps({"before": last.after, "after": None, "source": base,
                                           "op": "d", "ts_ms": cut.ts_ms, "transaction": None})))
        out.append((raw_key, None))
    return out
