"""The Redis online feature store: layout, overwrite rule and staleness, pure (no I/O).

Layout (Feast's Redis layout, with its expired-values complaint fixed):

- one hash per entity, key `<prefix><kind>:<id>` (`settings.redis_key(kind, id)`),
  kinds `user`, `item` and `popular` (one per `features` partition, see
  `streams.feature_windows.Popularity`);
- field `_v`: the feature-set version that wrote the hash;
- per feature group `g`: field `_ts:g`, the event time (epoch ms) the group's
  values were computed as of, and one field `g:<feature>` per feature, the
  value as JSON text (int, float, str, bool, null or a list), so `HGETALL`
  returns everything in one round trip and values keep their types;
- a TTL per entity kind, refreshed by every accepted write, so entities that
  went quiet leave Redis by themselves.

Write rule, per group: a write whose timestamp is older than the stored `_ts:g`
never overwrites it (replays and restarts re-send old writes; the newer values
stay). An equal timestamp overwrites: the same event time can carry more
events. A group is written whole (all its declared features) with its own
timestamp. Versions: a write of a newer feature-set version than the stored
`_v` (or into a hash without one, e.g. the pre-version layout) deletes the hash
first, so no field of the old layout survives; a write of an older version is
refused entirely, so an old worker still running during a rollout cannot mix
layouts. `apply_writes` is this rule on a dict; `WRITE_SCRIPT` is the same rule
in Lua, for Redis to apply atomically (`EVALSHA` in the writer's pipeline).

Read rule: each declared group comes back with its values and a status:
`fresh`, `stale` (its `_ts` is more than the group's max age before `now`), or
`missing` (absent, unreadable, or written by another feature-set version).
Stale values are returned for inspection but never as fresh: `EntityRead.fresh`
hands out only fresh groups. A group's age measures how far behind the writer
is: the worker rewrites a group when its values change, including when a
window expires a bucket, so an old group means a stopped pipeline or an
entity that went quiet; either way the reader should not trust it.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import orjson

VERSION_FIELD = "_v"
_VERSION_BYTES = VERSION_FIELD.encode()
TS_PREFIX = "_ts:"

FeatureValue = Union[int, float, str, bool, None, list]
Status = Literal["fresh", "stale", "missing"]

# Codes returned per group by `apply_writes` and by WRITE_SCRIPT.
WRITTEN, SKIPPED_OLDER, REFUSED_VERSION = 1, 0, -1


class FeatureError(ValueError):
    """A write that does not match the declared feature set."""


@dataclass(frozen=True, slots=True)
class FeatureGroup:
    """Features written together with one event-time timestamp."""

    name: str
    features: tuple[str, ...]
    max_age_ms: int

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name or self.name.startswith("_"):
            raise ValueError(f"group name {self.name!r}: non-empty, no ':', not starting with '_'")
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"group {self.name!r}: features must be non-empty and unique")

    @property
    def ts_field(self) -> str:
        """The hash field holding the group's event-time timestamp, `_ts:<group>`."""
        return TS_PREFIX + self.name

    def field(self, feature: str) -> str:
        """The hash field of one feature, `<group>:<feature>`."""
        return f"{self.name}:{feature}"


@dataclass(frozen=True, slots=True)
class EntitySpec:
    """One kind of entity hash: its groups and TTL (0 = no TTL)."""

    kind: str
    groups: tuple[FeatureGroup, ...]
    ttl_ms: int

    def group(self, name: str) -> FeatureGroup:
        """The declared group of that name; FeatureError when there is none."""
        for g in self.groups:
            if g.name == name:
                return g
        raise FeatureError(f"{self.kind}: no feature group {name!r}")


@dataclass(frozen=True, slots=True)
class GroupWrite:
    """New values of one group, computed as of event time `ts`."""

    group: str
    ts: int
    values: Mapping[str, FeatureValue]


@dataclass(frozen=True, slots=True)
class GroupRead:
    """One group as read: status, values (empty when missing), timestamp and age."""

    status: Status
    values: dict[str, FeatureValue]
    ts: int | None
    age_ms: int | None


@dataclass(frozen=True, slots=True)
class EntityRead:
    """An entity hash as read: its stored version and every declared group."""

    version: int | None         # the stored `_v`, None when absent
    groups: dict[str, GroupRead]

    def fresh(self, group: str) -> dict[str, FeatureValue] | None:
        """The group's values when fresh, else None: the only way to get values to serve."""
        read = self.groups.get(group)
        return read.values if read is not None and read.status == "fresh" else None


HOUR, DAY = 3_600_000, 86_400_000
FEATURE_SET_VERSION = 1
USER = EntitySpec("user", (
    FeatureGroup("activity", ("searches_7d", "searches_30d", "sessions_7d", "avg_session_ms_30d",
                              "last_seen"), max_age_ms=DAY),
    FeatureGroup("recent", ("items",), max_age_ms=30 * DAY),
), ttl_ms=35 * DAY)
# The same `user:<id>` hashes, group `subscription`, from the history of
# CLICKLOOP_SUBSCRIPTIONS_TABLE (streams/subscription_features.py). A state, rewritten
# only when the user's subscription rows change: its age says how long ago that was,
# not how far behind the writer is. Declared apart from USER (same kind, TTL and
# version; groups are independent under the write rule) because USER's readers
# (services/recommender: metrics labels, status) expect exactly its two groups.
USER_SUBSCRIPTION = EntitySpec("user", (
    FeatureGroup("subscription", ("status", "days_since_subscribed", "cancellations"),
                 max_age_ms=366 * DAY),
), ttl_ms=USER.ttl_ms)
ITEM = EntitySpec("item", (
    FeatureGroup("engagement", ("views_1h", "views_24h", "clicks_1h", "clicks_24h", "ctr_24h",
                                "last_seen"), max_age_ms=2 * HOUR),
), ttl_ms=2 * DAY)
POPULAR = EntitySpec("popular", (
    FeatureGroup("top", ("items", "half_life_ms"), max_age_ms=HOUR),
), ttl_ms=DAY)
ENTITIES: dict[str, EntitySpec] = {e.kind: e for e in (USER, ITEM, POPULAR)}


def encode_value(value: FeatureValue) -> str:
    """A feature value as hash-field text (JSON); non-finite floats are refused."""
    text = orjson.dumps(value).decode()
    # orjson writes a non-finite float as null: only text with a null needs the walk.
    if "null" in text and not _finite(value):
        raise FeatureError(f"feature value {value!r} holds a number that is not finite")
    return text


def _finite(value: FeatureValue) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def decode_value(raw: bytes | str) -> FeatureValue:
    """A hash-field text back to its value; FeatureError when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FeatureError(f"unreadable feature value {raw!r}: {exc}") from None


def may_overwrite(stored_ts: int | None, ts: int) -> bool:
    """THE overwrite rule: a write older than the stored group timestamp never wins."""
    return stored_ts is None or ts >= stored_ts


def encode_writes(spec: EntitySpec, writes: Iterable[GroupWrite]) -> list[tuple[str, int, list[tuple[str, str]]]]:
    """Writes as (ts field, ts, [(field, text)]), checked against the declared groups."""
    out = []
    for w in writes:
        group = spec.group(w.group)
        if set(w.values) != set(group.features):
            missing = sorted(set(group.features) - set(w.values))
            extra = sorted(set(w.values) - set(group.features))
            raise FeatureError(f"{spec.kind}.{group.name}: missing {missing}, unknown {extra}")
        out.append((group.ts_field, int(w.ts),
                    [(group.field(f), encode_value(w.values[f])) for f in group.features]))
    return out


def script_args(spec: EntitySpec, version: int, writes: Iterable[GroupWrite]) -> list[str | int]:
    """ARGV for WRITE_SCRIPT (KEYS[1] is the entity's hash)."""
    args: list[str | int] = [version, spec.ttl_ms]
    for ts_field, ts, pairs in encode_writes(spec, writes):
        args += [ts_field, ts, len(pairs)]
        for name, text in pairs:
            args += [name, text]
    return args


def _int_or_none(raw: bytes | str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def apply_writes(stored: Mapping[str, str], spec: EntitySpec, version: int,
                 writes: Sequence[GroupWrite]) -> tuple[dict[str, str], list[int]]:
    """The hash after the writes, and one code per write (WRITTEN, SKIPPED_OLDER,
    REFUSED_VERSION): exactly what WRITE_SCRIPT does in Redis (TTL aside)."""
    encoded = encode_writes(spec, writes)
    stored_version = _int_or_none(stored.get(VERSION_FIELD))
    if stored and stored_version is not None and stored_version > version:
        return dict(stored), [REFUSED_VERSION] * len(encoded)
    fields = dict(stored) if stored and stored_version is not None and stored_version == version else {}
    codes, wrote = [], False
    for ts_field, ts, pairs in encoded:
        if may_overwrite(_int_or_none(fields.get(ts_field)), ts):
            fields[ts_field] = str(ts)
            fields.update(pairs)
            codes.append(WRITTEN)
            wrote = True
        else:
            codes.append(SKIPPED_OLDER)
    if not wrote:
        return dict(stored), codes
    fields[VERSION_FIELD] = str(version)
    return fields, codes


# KEYS[1]: the entity hash. ARGV: version, ttl_ms, then per group: ts field, ts,
# n, and n (field, value) pairs. Returns one code per group: 1 written,
# 0 skipped (older than the stored timestamp), -1 refused (newer version stored).
# A hash of an older version, or without a readable `_v`, is deleted before the
# first write; `_v` and the TTL are set only when some group was written.
WRITE_SCRIPT = """
local key = KEYS[1]
local version = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local stored = tonumber(redis.call('HGET', key, '_v') or '')
local exists = redis.call('EXISTS', key) == 1
local codes = {}
if exists and stored ~= nil and stored > version then
  local i = 3
  while i <= #ARGV do
    codes[#codes + 1] = -1
    i = i + 3 + 2 * tonumber(ARGV[i + 2])
  end
  return codes
end
local reset = exists and (stored == nil or stored < version)
local wrote = false
local i = 3
while i <= #ARGV do
  local ts_field, ts, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local current = nil
  if not reset then current = tonumber(redis.call('HGET', key, ts_field) or '') end
  if current ~= nil and ts < current then
    codes[#codes + 1] = 0
  else
    if reset then
      redis.call('DEL', key)
      reset = false
    end
    redis.call('HSET', key, ts_field, ARGV[i + 1], unpack(ARGV, i + 3, i + 2 + 2 * n))
    codes[#codes + 1] = 1
    wrote = true
  end
  i = i + 3 + 2 * n
end
if wrote then
  redis.call('HSET', key, '_v', ARGV[1])
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end
return codes
"""


@functools.cache
def _hash_fields(group: FeatureGroup, as_bytes: bool) -> tuple:
    """A group's timestamp field and (feature, field) pairs, as str or as bytes."""
    enc = (lambda f: f.encode()) if as_bytes else (lambda f: f)
    return enc(group.ts_field), tuple((f, enc(group.field(f))) for f in group.features)


def read(spec: EntitySpec, version: int, raw: Mapping[bytes | str, bytes | str],
         now: int) -> EntityRead:
    """An entity's hash (as HGETALL returns it) to groups with fresh/stale/missing status."""
    if all(type(k) is bytes for k in raw):  # as Redis answers: fields looked up as bytes
        fields: Mapping = raw
        as_bytes = True
    else:
        fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
        as_bytes = False
    stored_version = _int_or_none(fields.get(_VERSION_BYTES if as_bytes else VERSION_FIELD))
    groups = {}
    for group in spec.groups:
        ts_field, names = _hash_fields(group, as_bytes)
        ts = _int_or_none(fields.get(ts_field))
        read_ = None
        if stored_version == version and ts is not None:
            try:
                values = {f: decode_value(fields[name]) for f, name in names}
                status: Status = "stale" if now - ts > group.max_age_ms else "fresh"
                read_ = GroupRead(status, values, ts, max(0, now - ts))
            except (KeyError, FeatureError):
                pass  # a damaged group is never half-served
        groups[group.name] = read_ or GroupRead("missing", {}, None, None)
    return EntityRead(stored_version, groups)
