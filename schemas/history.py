"""The `history.<table>` topics: SCD2 versions of a captured table, keyed by primary key.

Written by the `cdc_history` worker (streams/history.py folds Debezium change
events into these records); read by features and the archive, and by training
code through `streams.history.as_of` / `resolve`.

A record is the latest state of one *version* of one row. A version is named
by (`key_id`, `position`): `position` is the source position of the change
event that opened it, and versions of a key are ordered by it. The same
version is written again when it changes: closed by a later version
(`valid_to` set, `is_current` false), shortened or lengthened when a late
event is placed before it or a version after it disappears, or retracted
(`is_retracted`) when it stops being a version at all (a snapshot read found
identical to a version placed before it late). `revision` counts the records
written for the key, so the latest state of a version is the one with the
highest revision, in whatever order the records are read.

Valid time is the source database's commit time (`source.ts_ms`), made
non-decreasing along the key's position order: versions are half-open
`[valid_from, valid_to)` in epoch milliseconds, UTC; `valid_to` is null while
the version is open (no sentinel date). A deleted row is a version of its own,
`is_deleted` true, whose `row` is the last known image (Debezium's `before`
over the version it closes), so "deleted" and "never existed" stay distinct.
"""
from __future__ import annotations

from typing import Literal, TypedDict

SCHEMA_VERSION = 1

# The Debezium operation that opened the version: create, update, delete, read
# (snapshot) or truncate (a deleted marker for every row the worker holds).
Op = Literal["c", "u", "d", "r", "t"]


class HistoryRow(TypedDict):
    v: int                      # SCHEMA_VERSION
    table: str                  # "<schema>.<table>" (PostgreSQL) or "<database>.<table>" (MySQL)
    key: dict                   # the primary-key columns, as Debezium's record key carries them
    key_id: str                 # streams.debezium.key_id(key): the record key and the lookup key
    position: list[int]         # ordering key of the opening event (streams.debezium, "Positions")
    source_position: str        # the same position as the source names it (LSNs, binlog file:pos)
    tx_id: str | None           # source transaction id (PostgreSQL txId, MySQL GTID)
    op: Op
    ts_ms: int                  # source.ts_ms of the opening event (commit time)
    valid_from: int             # epoch ms, inclusive
    valid_to: int | None        # epoch ms, exclusive; null while open
    is_current: bool
    is_deleted: bool
    is_retracted: bool          # no longer a version: drop it (see the module docstring)
    row: dict | None            # the row's columns; for a deleted marker the last known image
    moved_from: str | None      # key_id of the old key when a primary-key change created this row
    moved_to: str | None        # key_id of the new key when a primary-key change deleted this row
    revision: int               # per key, increasing with every record written for the key
