"""Subscription features from a captured table's history: pure, no I/O, no clock.

The `features` worker folds the rows of `history.<table>` (schemas/history.py;
`CLICKLOOP_SUBSCRIPTIONS_TABLE`, default `subscriptions`) into the feature group
`subscription` of `user:<user_id>` (streams/feature_store.py, `USER_SUBSCRIPTION`):

- `status`: the status column of the user's current subscription row: among the
  user's rows whose latest version is not deleted, an active one (status in
  `CLICKLOOP_SUBSCRIPTIONS_ACTIVE`) wins, the most recently changed first; null
  when the user has no live row (never had one, or all were deleted);
- `days_since_subscribed`: whole days from the first time any of the user's rows
  was active to the group's timestamp; null when never active;
- `cancellations`: how many times one of the user's rows left the active set
  (its next version not active, or a deleted marker), over the whole history.

History is keyed by the table's primary key, not by user: a user may have several
rows, in different partitions. So the worker repartitions each history row by its
user column (`route`) and the fold holds, per user, every version of every row it
saw, named by (key_id, position), with the fields the features need. As history
readers do (`streams.history.resolve`), the highest `revision` of a version wins
and retracted versions drop out; so the fold is a function of the *set* of rows
received, whatever their order and however often one is re-delivered: a re-read
row, a re-cut version or a replay after a crash changes nothing or converges to
the same values.

The group's timestamp is the latest `valid_from` of any row seen for the user
(source commit time, event time): it never decreases, so Redis's write rule (an
older timestamp never overwrites, an equal one does) keeps the last computation.
The group is a state, not a window: it holds until the user's next change, and
`days_since_subscribed` is as of that timestamp (add `(now - _ts:subscription)`
for today's value).

A row's user is the user column of its row image (a deleted marker carries the
last image). A row without it (a truncate marker, a key-only image) cannot be
routed and is counted in `SubscriptionPartition.unrouted`. A row moved from one
user to another keeps its old versions under the old user.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import orjson

from streams.feature_store import DAY, USER_SUBSCRIPTION

GROUP = "subscription"
FEATURES = USER_SUBSCRIPTION.group(GROUP).features     # status, days_since_subscribed, cancellations
# Changelog keys (the features worker's FEATURES_STATE, apart from u:, i:, p:).
USER_PREFIX = b"s:"
META = b"\x00meta:s"
ROUTER_META = b"\x00meta:h"


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    user_column: str = "user_id"
    status_column: str = "status"
    active: frozenset[str] = frozenset({"active", "trialing"})


# One version as the fold keeps it: [revision, valid_from, status, is_deleted, is_retracted].
Version = list


@dataclass(slots=True)
class UserState:
    """Every version seen of the user's rows: key_id -> position (as a tuple) -> Version."""

    rows: dict[str, dict[tuple[int, ...], Version]] = field(default_factory=dict)
    ts: int | None = None               # the latest valid_from seen (the group's timestamp)

    def to_json(self) -> bytes:
        return orjson.dumps({"ts": self.ts, "rows": {
            k: [[list(p), *v] for p, v in versions.items()] for k, versions in self.rows.items()}})

    @classmethod
    def from_json(cls, raw: bytes) -> "UserState":
        doc = orjson.loads(raw)
        return cls({k: {tuple(p): v for p, *v in versions} for k, versions in doc["rows"].items()},
                   doc["ts"])


def route(row: Mapping, cfg: SubscriptionConfig) -> tuple[str, bytes] | None:
    """The user a history row belongs to and the compact record sent to the user's
    partition; None when the row names no user."""
    image = row.get("row")
    user = image.get(cfg.user_column) if isinstance(image, dict) else None
    if user is None or user == "":
        return None
    user = user if isinstance(user, str) else orjson.dumps(user).decode()
    status = image.get(cfg.status_column)
    return user, orjson.dumps([row["key_id"], row["position"], row["revision"], row["valid_from"],
                               None if status is None else str(status), bool(row["is_deleted"]),
                               bool(row["is_retracted"])])


def decode_routed(value: bytes) -> tuple[str, tuple[int, ...], Version]:
    """A routed record back to (key_id, position, version); ValueError when it is not one."""
    try:
        key_id, position, revision, valid_from, status, deleted, retracted = orjson.loads(value)
        return str(key_id), tuple(int(p) for p in position), \
            [int(revision), int(valid_from), status, bool(deleted), bool(retracted)]
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a routed subscription version: {exc}") from None


def fold(state: UserState | None, key_id: str, position: tuple[int, ...], version: Version) -> UserState:
    """The user's state with one more history row (new state; `state` is not changed)."""
    state = UserState() if state is None else \
        UserState({k: dict(v) for k, v in state.rows.items()}, state.ts)
    versions = state.rows.setdefault(key_id, {})
    seen = versions.get(position)
    if seen is None or version[0] > seen[0]:
        versions[position] = list(version)
    state.ts = version[1] if state.ts is None else max(state.ts, version[1])
    return state


def fold_row(state: UserState | None, row: Mapping, cfg: SubscriptionConfig) -> UserState | None:
    """`fold` of a history row as read from the topic (the state unchanged when the row
    names no user)."""
    routed = route(row, cfg)
    if routed is None:
        return state
    return fold(state, *decode_routed(routed[1]))


def features(state: UserState, cfg: SubscriptionConfig) -> dict:
    """The `subscription` group's values (see the module docstring)."""
    first: int | None = None
    cancellations = 0
    live: list[tuple[bool, int, tuple[int, ...], str | None]] = []
    for versions in state.rows.values():
        chain = [(p, versions[p]) for p in sorted(versions) if not versions[p][4]]
        was_active = False
        for _, (_, valid_from, status, deleted, _) in chain:
            active = not deleted and status in cfg.active
            if active and (first is None or valid_from < first):
                first = valid_from
            if was_active and not active:
                cancellations += 1
            was_active = active
        if chain and not chain[-1][1][3]:
            position, (_, valid_from, status, _, _) = chain[-1]
            live.append((status in cfg.active, valid_from, position, status))
    status = max(live)[3] if live else None
    days = None if first is None or state.ts is None else (state.ts - first) // DAY
    return {"status": status, "days_since_subscribed": days, "cancellations": cancellations}


class SubscriptionPartition:
    """The users of one FEATURES_SUBSCRIPTIONS partition (for streams/txstate.py):
    routed versions folded in as they come, the changed users' groups at `flush`,
    the changed users' states and the next offsets at `take_dirty`. A restored
    partition flushes all its users once."""

    def __init__(self, cfg: SubscriptionConfig, offsets: Mapping[str, int] | None = None) -> None:
        self.cfg = cfg
        self.users: dict[str, UserState] = {}
        self.offsets: dict[str, int] = dict(offsets or {})
        self._changed: set[str] = set()      # since the last flush (Redis)
        self._dirty: set[str] = set()        # since the last dump (changelog)
        self.pending_events = 0

    def next_offset(self, topic: str) -> int:
        return self.offsets.get(topic, 0)

    def skip(self, topic: str, next_offset: int) -> None:
        self.offsets[topic] = next_offset

    def add_record(self, user: str, value: bytes, topic: str, next_offset: int) -> None:
        """Fold a routed record in; ValueError (only the offset moves) when it is not one."""
        self.offsets[topic] = next_offset
        key_id, position, version = decode_routed(value)
        state = self.users.get(user)
        new = fold(state, key_id, position, version)
        if state is None or new.rows != state.rows or new.ts != state.ts:
            self.users[user] = new
            self._changed.add(user)
            self._dirty.add(user)
        self.pending_events += 1

    @property
    def has_work(self) -> bool:
        return bool(self._changed)

    def flush(self) -> list[tuple[str, int, dict]]:
        """(user, ts, the group's values) of every user changed since the last flush."""
        changed, self._changed = sorted(self._changed), set()
        self.pending_events = 0
        return [(u, self.users[u].ts, features(self.users[u], self.cfg)) for u in changed]

    def take_dirty(self) -> list[tuple[bytes, bytes | None]]:
        dirty, self._dirty = sorted(self._dirty), set()
        return [*((USER_PREFIX + u.encode(), self.users[u].to_json()) for u in dirty),
                (META, orjson.dumps({"o": self.offsets}))]

    @classmethod
    def restore(cls, cfg: SubscriptionConfig, entries: Mapping[bytes, bytes]) -> "SubscriptionPartition":
        meta = orjson.loads(entries[META]) if META in entries else {}
        part = cls(cfg, meta.get("o", {}))
        n = len(USER_PREFIX)
        for key, value in entries.items():
            if key.startswith(USER_PREFIX):
                part.users[key[n:].decode()] = UserState.from_json(value)
        # Every restored user is written again: a crash may have come between the commit
        # of a state and its Redis write (an equal timestamp overwrites: same values).
        part._changed = set(part.users)
        return part


class HistoryRouter:
    """The routing stage's state: only the next offset of each history partition
    (the routed records are committed in the same transaction)."""

    def __init__(self, offsets: Mapping[str, int] | None = None) -> None:
        self.offsets: dict[str, int] = dict(offsets or {})
        self.unrouted = 0

    def next_offset(self, topic: str) -> int:
        return self.offsets.get(topic, 0)

    def done(self, topic: str, next_offset: int) -> None:
        self.offsets[topic] = next_offset

    def take_dirty(self) -> list[tuple[bytes, bytes | None]]:
        return [(ROUTER_META, orjson.dumps({"o": self.offsets}))]

    @classmethod
    def restore(cls, entries: Mapping[bytes, bytes]) -> "HistoryRouter":
        meta = orjson.loads(entries[ROUTER_META]) if ROUTER_META in entries else {}
        return cls(meta.get("o", {}))

