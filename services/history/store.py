"""The history topics' rows held in memory for lookups: pure, no I/O.

Rows arrive in any order and more than once (a re-cut version is written
again with a higher `revision`; a worker restarted after a crash may write a
version again with the same content): per (key_id, position) the highest
revision wins and retracted versions drop out, exactly as
`streams.history.resolve` reads them. A key's resolved history is rebuilt
lazily, only when asked for after a change, so a lookup is a dict access and
a binary search (`streams.history.version_at`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from schemas.history import HistoryRow
from streams.history import version_at


@dataclass(slots=True)
class KeyHistory:
    latest: dict[tuple[int, ...], HistoryRow] = field(default_factory=dict)
    resolved: list[HistoryRow] | None = None      # None: to rebuild

    def add(self, row: HistoryRow) -> None:
        name = tuple(row["position"])
        seen = self.latest.get(name)
        if seen is None or row["revision"] > seen["revision"]:
            self.latest[name] = row
            self.resolved = None

    def versions(self) -> list[HistoryRow]:
        if self.resolved is None:
            self.resolved = [self.latest[p] for p in sorted(self.latest)
                             if not self.latest[p]["is_retracted"]]
        return self.resolved


class HistoryStore:
    """Resolved history per table (the `history.<table>` topic's suffix) and key_id."""

    __slots__ = ("tables", "rows")

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, KeyHistory]] = {}
        self.rows = 0

    def add(self, table: str, row: HistoryRow) -> None:
        keys = self.tables.get(table)
        if keys is None:
            keys = self.tables[table] = {}
        history = keys.get(row["key_id"])
        if history is None:
            history = keys[row["key_id"]] = KeyHistory()
        history.add(row)
        self.rows += 1

    def history(self, table: str, key_id: str) -> list[HistoryRow] | None:
        """The key's versions by position, or None for a key (or table) never seen."""
        history = self.tables.get(table, {}).get(key_id)
        return None if history is None else history.versions()

    def at(self, table: str, key_id: str, when: int) -> HistoryRow | None:
        versions = self.history(table, key_id)
        return None if versions is None else version_at(versions, when)
