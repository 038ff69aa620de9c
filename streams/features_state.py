"""The `features` worker's per-partition state: pure (no I/O, no clock), built on
`streams.feature_windows`.

Two owners, one per Kafka partition each:

- `UserPartition` (a `clicks` + `sessions` partition: they are co-partitioned
  by visitor, so partition p of both lands here): user windows, the
  partition's popularity, its event-time watermark and the next offset of each
  input topic;
- `ItemPartition` (a `FEATURES_ITEMS` partition): item windows. Item deltas
  come from every user partition, so the user side sends them on, grouped by
  `item_partition(item)`, and only the item's own partition counts them.

Both have the same shape: records are folded into a pending delta
(`FeatureBatch` / item `Windows`, cheap, per record); `flush()` merges the
pending delta into the state at the new watermark, once per flush, and says
what to write to Redis: every touched entity's feature groups, plus the
entities whose windows drop a bucket at the new watermark (`Windows.next_change`
schedules them, so a 7 d count drops on day 8 also for a visitor who sent
nothing since). An entity with nothing left in its windows is evicted once
its kind's TTL has passed in event time. `take_dirty()` gives the changelog
entries changed since the last call, with the meta entry (watermark, next
offsets). The worker must `flush()` before `take_dirty()` so that the
changelog never holds offsets whose records are still pending.

Values are computed as of the partition watermark, and that watermark is the
`_ts` of the groups written: it only grows within a partition, so a later
write of an entity never carries an older timestamp than an earlier one of
the same incarnation.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import orjson

from schemas.clicks import ClickEvent
from streams.codec import BadRecord
from streams.feature_store import ITEM, POPULAR, USER, EntitySpec, FeatureValue
from streams.feature_windows import (ITEM_WINDOWS, USER_WINDOWS, FeatureBatch, Popularity, Windows,
                                     item_features, user_features)
from streams.partitioning import key_partition

Groups = dict[str, dict[str, FeatureValue]]
NO_WATERMARK = -1

# Changelog keys: users and items share the FEATURES_STATE topic (same partition
# count), each owner reads only its own prefix.
# Popularity: one entry per item score (p:<item>) and one for its anchor, so a commit
# writes only the items its batches touched.
USER_PREFIX, ITEM_PREFIX, POPULAR_PREFIX = b"u:", b"i:", b"p:"
USER_META, ITEM_META, POPULAR_META = b"\x00meta:u", b"\x00meta:i", b"\x00popular"


@dataclass(frozen=True, slots=True)
class EntityWrite:
    """Feature groups of one entity to write, computed as of `ts` (the watermark)."""

    spec: EntitySpec
    entity: str
    ts: int
    groups: Groups


def item_partition(item: str, partitions: int) -> int:
    """The FEATURES_ITEMS partition of an item: Kafka's default partitioner on its id."""
    return key_partition(item.encode(), partitions)


def session_problem(session: Mapping) -> str | None:
    """Why a `sessions` record cannot be counted, or None when it can."""
    if not all(type(session.get(k)) is int for k in ("start", "end", "duration_ms")):
        return "session lacks integer start, end and duration_ms"
    if session["duration_ms"] < 0 or session["end"] < session["start"]:
        return "session ends before it starts"
    return None


class Entities:
    """Windows of one entity kind in one partition, with its expiry schedule.

    `features(windows, watermark)` computes the groups; `windowed` names the
    groups that change when a window drops a bucket (rewritten on expiry).
    """

    def __init__(self, spec: EntitySpec, windows: tuple[tuple[str, int], ...],
                 features: Callable[[Windows, int], Groups], windowed: tuple[str, ...]) -> None:
        self.spec, self.windows, self.features, self.windowed = spec, windows, features, windowed
        self.state: dict[str, Windows] = {}
        self._due: dict[str, int] = {}                 # entity -> its scheduled watermark
        self._heap: list[tuple[int, str]] = []         # (due, entity), stale entries skipped
        self.dirty: set[str] = set()

    def _schedule(self, entity: str, w: Windows, watermark: int) -> None:
        at = w.next_change(self.windows, watermark)
        if w.last_seen is not None:
            evict = w.last_seen + self.spec.ttl_ms
            at = evict if at is None else min(at, evict)
        if at is None:
            self._due.pop(entity, None)
            return
        at = max(at, watermark + 1)
        if self._due.get(entity) != at:
            self._due[entity] = at
            heapq.heappush(self._heap, (at, entity))

    def apply(self, deltas: Mapping[str, Windows], watermark: int) -> list[EntityWrite]:
        """Merge deltas at the watermark; the touched entities' groups, all of them."""
        out = []
        for entity, delta in deltas.items():
            w = self.state.get(entity)
            if w is None:
                w = self.state[entity] = Windows()
            w.merge(delta)
            w.prune(watermark)
            self.dirty.add(entity)
            self._schedule(entity, w, watermark)
            out.append(EntityWrite(self.spec, entity, watermark, self.features(w, watermark)))
        return out

    def rewrite(self, entities: Iterable[str], watermark: int) -> list[EntityWrite]:
        """All groups of these entities (those still held) as of the watermark."""
        return [EntityWrite(self.spec, e, watermark, self.features(self.state[e], watermark))
                for e in entities if e in self.state]

    def expire(self, watermark: int, skip: Iterable[str] = ()) -> list[EntityWrite]:
        """Entities whose windows changed by the watermark: their windowed groups, rewritten;
        entities empty past their TTL: evicted (a tombstone in the changelog, no write:
        Redis drops the hash by its own TTL)."""
        out, skip = [], set(skip)
        while self._heap and self._heap[0][0] <= watermark:
            at, entity = heapq.heappop(self._heap)
            if self._due.get(entity) != at:
                continue                                # rescheduled since
            del self._due[entity]
            w = self.state[entity]
            w.prune(watermark)
            self.dirty.add(entity)
            if w.last_seen is not None and w.last_seen + self.spec.ttl_ms <= watermark \
                    and not any(w.counts.values()):
                del self.state[entity]
                continue
            self._schedule(entity, w, watermark)
            if entity not in skip:
                groups = self.features(w, watermark)
                out.append(EntityWrite(self.spec, entity, watermark,
                                       {g: groups[g] for g in self.windowed}))
        return out

    def take_dirty(self, prefix: bytes) -> list[tuple[bytes, bytes | None]]:
        out = []
        for entity in self.dirty:
            w = self.state.get(entity)
            out.append((prefix + entity.encode(), None if w is None else orjson.dumps(w.to_state())))
        self.dirty = set()
        return out

    def load(self, entity: str, state: bytes, watermark: int) -> None:
        w = self.state[entity] = Windows.from_state(orjson.loads(state))
        self._schedule(entity, w, watermark)


@dataclass(slots=True)
class Flush:
    """What one flush produced: Redis writes, and (users) the item deltas to send on."""

    watermark: int
    writes: list[EntityWrite] = field(default_factory=list)
    item_deltas: dict[str, Windows] = field(default_factory=dict)


class _Partition:
    """What users and items share: a watermark, entities, rewrites asked for, next offsets."""

    entities: Entities

    def __init__(self, watermark: int, offsets: Mapping[str, int]) -> None:
        self.watermark = watermark
        self.offsets: dict[str, int] = dict(offsets)      # applied (in the state)
        self._pending_offsets: dict[str, int] = {}
        self.pending_events = 0
        self._rewrite: dict[str, int] = {}                # entity -> ts of a refused write

    def next_offset(self, topic: str) -> int:
        """The next offset of `topic` still to apply (records below it are in the state)."""
        return self._pending_offsets.get(topic, self.offsets.get(topic, 0))

    def skip(self, topic: str, next_offset: int) -> None:
        """A record that counted nothing (dead-lettered): only the position moves."""
        self._pending_offsets[topic] = next_offset

    def refused(self, entity: str, ts: int) -> None:
        """Redis holds a newer write of the entity (from before a restart): rewrite it
        once the watermark has passed `ts`."""
        self._rewrite[entity] = max(ts, self._rewrite.get(entity, ts))

    @property
    def has_work(self) -> bool:
        """Whether `flush()` has something to do (pending records or refused writes)."""
        return bool(self._pending_offsets or self._rewrite)

    def _finish(self, watermark: int, touched: set[str], out: Flush) -> None:
        if watermark > self.watermark:
            out.writes += self.entities.expire(watermark, skip=touched)
        self.watermark = watermark
        self.offsets.update(self._pending_offsets)
        self._pending_offsets = {}
        self.pending_events = 0
        again = [e for e, ts in self._rewrite.items() if watermark > ts]
        for e in again:
            del self._rewrite[e]
        out.writes += self.entities.rewrite([e for e in again if e not in touched], watermark)

    def meta(self) -> dict:
        return {"w": self.watermark, "o": self.offsets}


class UserPartition(_Partition):
    """Users of one `clicks`/`sessions` partition, and that partition's popularity."""

    def __init__(self, popular_items: int = 1000, watermark: int = NO_WATERMARK,
                 offsets: Mapping[str, int] | None = None) -> None:
        super().__init__(watermark, offsets or {})
        self.entities = Entities(USER, USER_WINDOWS, user_features, ("activity",))
        self.popular_items = popular_items
        self.popularity = Popularity(capacity=popular_items)
        self.pending = FeatureBatch()
        self._popular_dirty = False             # since the last Redis snapshot
        self._popular_changed: set[str] = set()  # items since the last changelog dump
        self._popular_dumped: set[str] = set()   # items the changelog holds
        self._popular_anchor: int | None = None  # the anchor the changelog holds

    def add_clicks(self, events: list[ClickEvent], topic: str, next_offset: int,
                   not_after: int | None = None) -> None:
        """Fold a `clicks` record's events into the pending delta (`not_after`: the latest
        event time the record allows, `codec.not_after`)."""
        self.pending.add_clicks(events, self.entities.state, not_after)
        self._pending_offsets[topic] = next_offset
        self.pending_events += len(events)

    def add_session(self, session, topic: str, next_offset: int) -> None:
        """Fold a session (one `session_problem` accepts) into the pending delta."""
        self.pending.add_session(session)
        self._pending_offsets[topic] = next_offset
        self.pending_events += 1

    def flush(self) -> Flush:
        """Apply the pending delta at the new watermark; what to write and send."""
        batch, self.pending = self.pending, FeatureBatch()
        watermark = self.watermark if batch.max_ts is None else max(self.watermark, batch.max_ts)
        out = Flush(watermark, self.entities.apply(batch.users, watermark), batch.items)
        if batch.popularity.anchor is not None:
            self.popularity.merge(batch.popularity)
            self._popular_dirty = True
            self._popular_changed |= batch.popularity.scores.keys()
        self._finish(watermark, set(batch.users), out)
        return out

    def popular(self, partition: int) -> EntityWrite | None:
        """The partition's `popular:<p>` snapshot when it changed since the last call."""
        if not self._popular_dirty:
            return None
        self._popular_dirty = False
        return EntityWrite(POPULAR, str(partition), self.watermark,
                           {"top": self.popularity.snapshot(self.popular_items, self.watermark)})

    def take_dirty(self) -> list[tuple[bytes, bytes | None]]:
        """Changelog entries changed since the last call, popularity and meta included."""
        return [*self.entities.take_dirty(USER_PREFIX), *self._popular_entries(),
                (USER_META, orjson.dumps(self.meta()))]

    def _popular_entries(self) -> list[tuple[bytes, bytes | None]]:
        pop = self.popularity
        if pop.anchor != self._popular_anchor:          # rescaled: every score changed
            changed = set(pop.scores)
        elif self._popular_changed:
            changed = self._popular_changed & pop.scores.keys()
        else:
            return []
        self._popular_changed = set()
        out: list[tuple[bytes, bytes | None]] = [
            (POPULAR_PREFIX + i.encode(), orjson.dumps(pop.scores[i])) for i in changed]
        out += [(POPULAR_PREFIX + i.encode(), None) for i in self._popular_dumped - pop.scores.keys()]
        self._popular_dumped = set(pop.scores)
        if pop.anchor != self._popular_anchor:
            self._popular_anchor = pop.anchor
            out.append((POPULAR_META, orjson.dumps({"h": pop.half_life_ms, "a": pop.anchor})))
        return out

    @classmethod
    def restore(cls, entries: Mapping[bytes, bytes], popular_items: int = 1000) -> "UserPartition":
        """The partition as its changelog left it (its keys only; others are ignored)."""
        meta = orjson.loads(entries[USER_META]) if USER_META in entries else {}
        part = cls(popular_items, meta.get("w", NO_WATERMARK), meta.get("o", {}))
        if POPULAR_META in entries:
            pop = orjson.loads(entries[POPULAR_META])
            part.popularity = Popularity(pop["h"], popular_items, pop["a"])
            part._popular_anchor = pop["a"]
        n = len(USER_PREFIX)
        for key, value in entries.items():
            if key.startswith(USER_PREFIX):
                part.entities.load(key[n:].decode(), value, part.watermark)
            elif key.startswith(POPULAR_PREFIX):
                part.popularity.scores[key[n:].decode()] = orjson.loads(value)
        part._popular_dumped = set(part.popularity.scores)
        return part


def encode_item_deltas(watermark: int, deltas: Mapping[str, Windows]) -> bytes:
    """A FEATURES_ITEMS record: the sender's watermark and item deltas of one partition."""
    return orjson.dumps({"v": 1, "w": watermark, "d": {i: w.to_state() for i, w in deltas.items()}})


def decode_item_deltas(value: bytes | None) -> tuple[int, dict[str, Windows]]:
    if value is None:
        raise BadRecord("not JSON: the record has no value")
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON: {exc}") from None
    if not isinstance(record, dict) or type(record.get("w")) is not int \
            or not isinstance(record.get("d"), dict):
        raise BadRecord('not an item-deltas record: expected {"w": int, "d": {...}}')
    try:
        return record["w"], {i: Windows.from_state(s) for i, s in record["d"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadRecord(f"unreadable item delta: {exc!r}") from None


def group_item_deltas(deltas: Mapping[str, Windows], partitions: int) -> dict[int, dict[str, Windows]]:
    """Item deltas by their FEATURES_ITEMS partition."""
    out: dict[int, dict[str, Windows]] = {}
    for item, w in deltas.items():
        out.setdefault(item_partition(item, partitions), {})[item] = w
    return out


class ItemPartition(_Partition):
    """Items of one FEATURES_ITEMS partition. The watermark is the largest sender
    watermark received: every user partition sends its watermark with each flush
    (with or without deltas), so item windows expire while items are quiet."""

    def __init__(self, watermark: int = NO_WATERMARK, offsets: Mapping[str, int] | None = None) -> None:
        super().__init__(watermark, offsets or {})
        self.entities = Entities(ITEM, ITEM_WINDOWS, item_features, ("engagement",))
        self.pending: dict[str, Windows] = {}
        self._pending_watermark = watermark

    def add_record(self, value: bytes | None, topic: str, next_offset: int) -> int:
        """Fold a FEATURES_ITEMS record in; returns the number of item deltas.
        BadRecord (nothing applied) when it is not one."""
        watermark, deltas = decode_item_deltas(value)
        for item, delta in deltas.items():
            mine = self.pending.get(item)
            if mine is None:
                self.pending[item] = delta
            else:
                mine.merge(delta)
        self._pending_watermark = max(self._pending_watermark, watermark)
        self._pending_offsets[topic] = next_offset
        self.pending_events += len(deltas)
        return len(deltas)

    def flush(self) -> Flush:
        deltas, self.pending = self.pending, {}
        watermark = max(self.watermark, self._pending_watermark)
        out = Flush(watermark, self.entities.apply(deltas, watermark))
        self._finish(watermark, set(deltas), out)
        return out

    def take_dirty(self) -> list[tuple[bytes, bytes | None]]:
        return [*self.entities.take_dirty(ITEM_PREFIX), (ITEM_META, orjson.dumps(self.meta()))]

    @classmethod
    def restore(cls, entries: Mapping[bytes, bytes]) -> "ItemPartition":
        meta = orjson.loads(entries[ITEM_META]) if ITEM_META in entries else {}
        part = cls(meta.get("w", NO_WATERMARK), meta.get("o", {}))
        n = len(ITEM_PREFIX)
        for key, value in entries.items():
            if key.startswith(ITEM_PREFIX):
                part.entities.load(key[n:].decode(), value, part.watermark)
        return part
