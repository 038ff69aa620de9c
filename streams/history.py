"""SCD2 history of a captured table from Debezium change events: pure logic, no I/O, no clock.

Each primary key has a history of versions, `[valid_from, valid_to)` in the
source's commit time (`source.ts_ms`, epoch ms, UTC), ordered by the source
position of the event that opened them (streams/debezium.py, "Positions").
The history of a key is a function of the *set* of events received for it,
not of their arrival order:

- every distinct position is one event; a second event at a position already
  held is a duplicate and changes nothing;
- each create, update or delete opens a version and closes the one before it
  (by position, not by arrival): an event older than the current version is
  placed where it belongs, and the versions around it are written again;
- a snapshot read (`op=r`) opens a version only when its row differs from the
  version before it, so a snapshot taken after the stream began, or a second
  snapshot, adds no fake changes; should a late event make an earlier read
  identical to its new predecessor, that read's version is retracted;
  rows compare with a missing column equal to null (a column added since);
- a delete opens a deleted marker (`is_deleted`), whose row is the last known
  image: Debezium's `before` laid over the version it closes (with REPLICA
  IDENTITY DEFAULT `before` holds only the key). A tombstone (null value)
  changes nothing. A primary-key change arrives as a delete on the old key
  and a create on the new one; both carry the other key when Debezium's
  `__debezium.newkey`/`oldkey` headers are there (`moved_to`/`moved_from`);
- a truncate (`op=t`) opens a deleted marker for every key held here;
- a column Debezium could not read (PostgreSQL's unchanged TOAST values,
  `__debezium_unavailable_value`) takes the value of the version before;
- valid time never runs backwards along the position order: a version's
  valid_from is its commit time or its predecessor's valid_from, whichever is
  later (commit clocks can step back); the open version has valid_to null.

Every change to a version is emitted as a `HistoryRow` (schemas/history.py):
the new version, the one it closed, versions re-cut by a late event, and
retractions. Per key, the state is the last `max_versions` events (with their
rows), what is needed to place late events among them, and the version just
before them; the full history is in the output topic. An event older than
the oldest event held (once older ones were let go) cannot be placed: it is
handed back in `Outputs.late` with the reason, never applied and never dropped.

`resolve`, `version_at` and `as_of` read history rows back (from the topic or
the archive): the latest revision of each version, minus retractions.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Iterable

import orjson

from schemas.history import SCHEMA_VERSION, HistoryRow
from streams.debezium import ChangeEvent

UNAVAILABLE = "__debezium_unavailable_value"


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    max_versions: int = 16                 # events held per key to place late ones
    unavailable_value: str = UNAVAILABLE   # the connector's unavailable.value.placeholder

    def __post_init__(self) -> None:
        if self.max_versions < 1:
            raise ValueError("max_versions must be at least 1")


@dataclass(slots=True)
class Entry:
    """One event of a key as held in state: its raw image, before resolution."""
    position: tuple[int, ...]
    op: str
    ts_ms: int
    row: dict | None               # after (c, u, r), before (d), None (t)
    tx_id: str | None
    source_position: str
    moved_from: str | None = None
    moved_to: str | None = None


@dataclass(slots=True)
class Base:
    """The version just before the held events, once older events were let go."""
    row: dict | None
    is_deleted: bool
    valid_from: int


@dataclass(slots=True)
class KeyState:
    table: str
    key: dict
    key_id: str
    revision: int = 0              # records written for the key so far
    base: Base | None = None
    entries: list[Entry] = field(default_factory=list)    # by position
    # The versions last emitted, by position (derived; rebuilt after a load).
    emitted: dict[tuple[int, ...], HistoryRow] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps({
            "table": self.table, "key": self.key, "key_id": self.key_id,
            "revision": self.revision,
            "base": None if self.base is None else
            [self.base.row, self.base.is_deleted, self.base.valid_from],
            "entries": [[list(e.position), e.op, e.ts_ms, e.row, e.tx_id, e.source_position,
                         e.moved_from, e.moved_to] for e in self.entries],
        })

    @classmethod
    def from_json(cls, raw: bytes) -> KeyState:
        doc = orjson.loads(raw)
        base = doc["base"]
        return cls(doc["table"], doc["key"], doc["key_id"], doc["revision"],
                   None if base is None else Base(*base),
                   [Entry(tuple(e[0]), *e[1:]) for e in doc["entries"]])


@dataclass(slots=True)
class Outputs:
    versions: list[HistoryRow] = field(default_factory=list)   # to `history.<table>`
    duplicates: int = 0
    tombstones: int = 0
    late: list[tuple[ChangeEvent, str]] = field(default_factory=list)   # not applied


def same_row(a: dict | None, b: dict | None) -> bool:
    """Rows equal column by column, a missing column counting as null."""
    if a is None or b is None:
        return a is b
    return all(a.get(c) == b.get(c) for c in a.keys() | b.keys())


def _entry(event: ChangeEvent, op: str | None = None) -> Entry:
    op = op or event.op
    row = event.after if op in ("c", "u", "r") else event.before if op == "d" else None
    return Entry(event.position, op, event.ts_ms, row, event.tx_id, event.source_position,
                 event.moved_from, event.moved_to)


def _open(config: HistoryConfig, state: KeyState, e: Entry, row: dict | None, deleted: bool,
          valid_from: int | None) -> HistoryRow | None:
    """The version `e` opens after a version with `row`, `deleted`, `valid_from` (None:
    no version before), or None for a read that repeats the version before."""
    op, unavailable = e.op, config.unavailable_value
    known = None if deleted else row
    if op == "r" and valid_from is not None and same_row(e.row, known):
        return None
    if op == "t":
        image = known
    elif op == "d":
        image = e.row if known is None else \
            {**known, **{c: v for c, v in (e.row or {}).items() if v is not None and v != unavailable}}
    else:
        image = e.row
        if known is not None and unavailable in image.values():
            image = {c: known.get(c, v) if v == unavailable else v for c, v in image.items()}
    ts = e.ts_ms
    return {
        "v": SCHEMA_VERSION, "table": state.table, "key": state.key, "key_id": state.key_id,
        "position": list(e.position), "source_position": e.source_position,
        "tx_id": e.tx_id, "op": op, "ts_ms": ts,
        "valid_from": ts if valid_from is None or ts > valid_from else valid_from,
        "valid_to": None, "is_current": True, "is_deleted": op == "d" or op == "t",
        "is_retracted": False, "row": image,
        "moved_from": e.moved_from, "moved_to": e.moved_to, "revision": 0,
    }


def _closed(version: HistoryRow, valid_to: int) -> HistoryRow:
    return {**version, "valid_to": valid_to, "is_current": False}


def derive(config: HistoryConfig, state: KeyState) -> dict[tuple[int, ...], HistoryRow]:
    """The versions of the held events, by position (revision not yet set)."""
    base, out, prev = state.base, {}, None
    row, deleted, valid_from = (None, True, None) if base is None else \
        (base.row, base.is_deleted, base.valid_from)
    for e in state.entries:
        version = _open(config, state, e, row, deleted, valid_from)
        if version is None:
            continue
        if prev is not None:
            out[tuple(prev["position"])] = _closed(prev, version["valid_from"])
        out[e.position] = prev = version
        row, deleted, valid_from = version["row"], version["is_deleted"], version["valid_from"]
    return out


def _same_version(a: HistoryRow, b: HistoryRow) -> bool:
    return all(a[f] == b[f] for f in a if f != "revision")


def step(config: HistoryConfig, state: KeyState, event: ChangeEvent,
         out: Outputs, op: str | None = None) -> None:
    """Fold one change event of `state`'s key in; what it changed goes to `out`."""
    entries = state.entries
    if state.emitted is None:
        state.emitted = derive(config, state)
    pos = event.position
    if entries and pos <= entries[-1].position:
        i = bisect_left(entries, pos, key=lambda e: e.position)
        if i < len(entries) and entries[i].position == pos:
            out.duplicates += 1
            return
        if i == 0 and state.base is not None:
            out.late.append((event, f"position {event.source_position} is older than the oldest "
                             f"event held for key {state.key_id} ({entries[0].source_position}): a "
                             "re-delivered duplicate or a late event, which cannot be told apart "
                             "here; history before it is final (raise max_versions, or rebuild "
                             "with `clickloop replay`)"))
            return
        entries.insert(i, _entry(event, op))
        new = derive(config, state)
    else:
        entries.append(_entry(event, op))
        _append(config, state, out)
        _trim(config, state)
        return
    _emit(state, new, out)
    _trim(config, state)


def _append(config: HistoryConfig, state: KeyState, out: Outputs) -> None:
    """After an event appended at the end only the current version can change (it
    closes), so this is `derive` + `_emit` without comparing the rest."""
    emitted = state.emitted
    current = next(reversed(emitted.values())) if emitted else None
    if current is not None:
        version = _open(config, state, state.entries[-1], current["row"], current["is_deleted"],
                        current["valid_from"])
    elif state.base is not None:
        base = state.base
        version = _open(config, state, state.entries[-1], base.row, base.is_deleted, base.valid_from)
    else:
        version = _open(config, state, state.entries[-1], None, True, None)
    if version is None:
        return
    if current is not None:
        closed = _closed(current, version["valid_from"])
        state.revision += 1
        closed["revision"] = state.revision
        emitted[tuple(current["position"])] = closed
        out.versions.append(closed)
    state.revision += 1
    version["revision"] = state.revision
    emitted[state.entries[-1].position] = version
    out.versions.append(version)


def _emit(state: KeyState, new: dict[tuple[int, ...], HistoryRow], out: Outputs) -> None:
    old = state.emitted
    changed = [v for p, v in new.items() if p not in old or not _same_version(old[p], v)]
    changed += [{**v, "is_retracted": True, "is_current": False}
                for p, v in old.items() if p not in new]
    changed.sort(key=lambda v: v["position"])
    for version in changed:
        state.revision += 1
        version["revision"] = state.revision
    for p, v in new.items():
        if v["revision"] == 0:      # unchanged: keep the record as it was written
            new[p] = old[p]
    out.versions += changed
    state.emitted = new


def _trim(config: HistoryConfig, state: KeyState) -> None:
    """Let go of the oldest events beyond `max_versions`. The first event held stays a
    version (so nothing held can be re-cut by what was let go), and the current
    version is never let go (the next event must close it)."""
    entries, emitted = state.entries, state.emitted
    while len(entries) > config.max_versions:
        after = 1     # reads that repeat the dropped version go with it
        while after < len(entries) and entries[after].position not in emitted:
            after += 1
        if after == len(entries):
            return
        version = emitted.pop(entries[0].position)
        state.base = Base(version["row"], version["is_deleted"], version["valid_from"])
        del entries[:after]


class TableHistory:
    """The history state of the keys of one table partition (the worker's logic object).

    One per captured table: key_ids of different tables would collide. A truncate
    reaches only the keys held here, so the worker applies it to every partition's
    state. `take_dirty`/`load` carry the state through a changelog; after a load the
    versions are derived again from it (their `revision` reads 0 until rewritten).
    """

    __slots__ = ("config", "states", "_dirty")

    def __init__(self, config: HistoryConfig = HistoryConfig(),
                 states: dict[str, KeyState] | None = None) -> None:
        self.config = config
        self.states: dict[str, KeyState] = states or {}
        self._dirty: set[str] = set()

    def apply(self, event: ChangeEvent | None, out: Outputs | None = None) -> Outputs:
        """Fold a decoded change event in (None, a tombstone, changes nothing)."""
        out = out if out is not None else Outputs()
        if event is None:
            out.tombstones += 1
            return out
        if event.op == "t":
            for kid, state in self.states.items():
                if state.emitted is None:
                    state.emitted = derive(self.config, state)
                current = next(reversed(state.emitted.values()), None)
                if current is not None and not current["is_deleted"] or \
                        state.entries and event.position < state.entries[-1].position:
                    step(self.config, state, event, out, op="t")
                    self._dirty.add(kid)
            return out
        state = self.states.get(event.key_id)
        if state is None:
            state = self.states[event.key_id] = KeyState(event.table, event.key, event.key_id)
        step(self.config, state, event, out)
        self._dirty.add(event.key_id)
        return out

    def load(self, key_id: str, raw: bytes) -> None:
        """Put back a key's state as `take_dirty` returned it (a changelog entry)."""
        self.states[key_id] = KeyState.from_json(raw)

    def take_dirty(self) -> list[tuple[str, bytes]]:
        dirty = [(k, self.states[k].to_json()) for k in sorted(self._dirty)]
        self._dirty.clear()
        return dirty

    def current(self, key_id: str) -> HistoryRow | None:
        state = self.states.get(key_id)
        if state is None:
            return None
        if state.emitted is None:
            state.emitted = derive(self.config, state)
        return next(reversed(state.emitted.values()), None)


# Reading history back ------------------------------------------------------------------

def resolve(rows: Iterable[HistoryRow]) -> dict[str, list[HistoryRow]]:
    """Full history per key_id from history rows in any order: the highest revision of
    each version, retracted versions dropped, ordered by position (so by valid_from).
    Rows of one table per call."""
    latest: dict[tuple[str, tuple[int, ...]], HistoryRow] = {}
    for row in rows:
        name = (row["key_id"], tuple(row["position"]))
        seen = latest.get(name)
        if seen is None or row["revision"] > seen["revision"]:
            latest[name] = row
    by_key: dict[str, list[HistoryRow]] = {}
    for (kid, _), row in latest.items():
        if not row["is_retracted"]:
            by_key.setdefault(kid, []).append(row)
    for versions in by_key.values():
        versions.sort(key=lambda v: v["position"])
    return by_key


def version_at(versions: list[HistoryRow], when: int) -> HistoryRow | None:
    """The version of one key in effect at `when` (valid_from <= when < valid_to), from
    its resolved history; None before the first version. Binary search: valid_from
    never decreases along a resolved history."""
    i = bisect_right(versions, when, key=lambda v: v["valid_from"]) - 1
    if i < 0:
        return None
    version = versions[i]
    if version["valid_to"] is not None and when >= version["valid_to"]:
        return None
    return version


def as_of(rows: Iterable[HistoryRow], when: int, *,
          include_deleted: bool = False) -> dict[str, HistoryRow]:
    """Each key's row as it was at `when` (epoch ms): the version in effect then.
    A key deleted at that time is left out unless `include_deleted` (its deleted
    marker then says so); a key not yet created is always left out."""
    out = {}
    for kid, versions in resolve(rows).items():
        version = version_at(versions, when)
        if version is not None and (include_deleted or not version["is_deleted"]):
            out[kid] = version
    return out
