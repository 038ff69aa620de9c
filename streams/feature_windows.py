"""Event-time windowed features per user and item, and global popularity: pure, mergeable state.

Counts live in buckets keyed by absolute bucket index (`ts // bucket_ms`):
hourly buckets for the 7 d and 30 d user windows and the 24 h item windows,
minute buckets for the 1 h item windows. A count "over the last W as of
watermark T" sums the W / bucket_ms buckets ending with T's own bucket, so it
never counts an event older than W (it may drop one up to a bucket early:
exact to the bucket, never too long). A bucket older than the longest window
is pruned, so a 7 d count really drops day 8. An event is counted in the
bucket of its own event time, so out-of-order events land where they belong;
one older than the longest window when merged is pruned away.

State is a sufficient statistic that merges with `merge` (bucket-wise sums,
max last-seen, union of recent views): a processor builds one `FeatureBatch`
of deltas from a whole batch of events, then merges each touched entity's
delta into its stored state once, prunes at the partition watermark and
writes the state back once (`to_state` is plain lists, for a Faust table or
Redis). `next_change` says at which watermark an entity's counts next drop,
so the writer can refresh groups whose windows expire without new events.

Users are keyed by visitor, like `clicks` partitions; item deltas come from
every partition, so the item processor must own its items (repartition the
item deltas by item id, Faust `group_by`). Popularity is decayed with a
half-life in event time; each partition keeps its own and the reader merges
their snapshots (`Popularity.merge`).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.clicks import ClickEvent, visitor_key
from schemas.sessions import Session
from services.model.transform import ACTION_WEIGHTS, interaction_of
from streams.codec import event_problem
from streams.feature_store import FeatureValue
from streams.sessions import SEARCH_EVENTS, event_name

MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
RECENT_MAX = 50
# A user remembers the CRC-32 of its latest IDS_KEPT message ids: an event seen again
# (a client's retry of a batch after a 503, the same id twice in a batch) is not
# counted twice. (A false match needs one of 64 other ids of the same user to share
# the 32-bit checksum: about 1 in 67 million events.)
IDS_KEPT = 64


@dataclass(frozen=True, slots=True)
class Resolution:
    """Bucket size and the longest window a counter answers (a multiple of it)."""

    bucket_ms: int
    horizon_ms: int


# Every counter, by name; an entity only holds those it counts.
COUNTERS: dict[str, Resolution] = {
    "searches": Resolution(HOUR, 30 * DAY),
    "sessions": Resolution(HOUR, 30 * DAY),
    "session_ms": Resolution(HOUR, 30 * DAY),
    "views_m": Resolution(MINUTE, HOUR),
    "views_h": Resolution(HOUR, DAY),
    "clicks_m": Resolution(MINUTE, HOUR),
    "clicks_h": Resolution(HOUR, DAY),
}

# A recent view: (item, strongest action, latest event time).
Recent = tuple[str, str, int]


@dataclass(slots=True)
class Windows:
    """One entity's windowed state (user or item)."""

    counts: dict[str, dict[int, int]] = field(default_factory=dict)
    last_seen: int | None = None
    recent: list[Recent] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)   # users: checksums of the latest message ids

    def add(self, counter: str, ts: int, n: int = 1) -> None:
        """Count n at event time ts."""
        buckets = self.counts.setdefault(counter, {})
        b = ts // COUNTERS[counter].bucket_ms
        buckets[b] = buckets.get(b, 0) + n

    def seen(self, ts: int) -> None:
        """Move last-seen forward to ts (never back)."""
        if self.last_seen is None or ts > self.last_seen:
            self.last_seen = ts

    def view(self, item: str, action: str, ts: int) -> None:
        """Add one item interaction to the recent list (compacted in bulk, not per event)."""
        self.recent.append((item, action, ts))
        if len(self.recent) > 2 * RECENT_MAX:
            self.recent = merge_recent(self.recent, ())

    def merge(self, other: "Windows") -> "Windows":
        """Add another state (a batch's delta) into this one; returns self."""
        for name, buckets in other.counts.items():
            mine = self.counts.setdefault(name, {})
            for b, n in buckets.items():
                mine[b] = mine.get(b, 0) + n
        if other.last_seen is not None:
            self.seen(other.last_seen)
        if other.recent:
            self.recent = merge_recent(self.recent, other.recent)
        if other.ids:
            self.ids = (self.ids + other.ids)[-IDS_KEPT:]
        return self

    def prune(self, watermark: int) -> int:
        """Drop buckets older than each counter's horizon; returns how many events went."""
        dropped = 0
        for name, buckets in self.counts.items():
            res = COUNTERS[name]
            oldest = watermark // res.bucket_ms - res.horizon_ms // res.bucket_ms
            for b in [b for b in buckets if b <= oldest]:
                dropped += buckets.pop(b)
        return dropped

    def total(self, counter: str, span_ms: int, watermark: int) -> int:
        """The count over the last span_ms as of the watermark (whole buckets)."""
        res = COUNTERS[counter]
        oldest = watermark // res.bucket_ms - span_ms // res.bucket_ms
        return sum(n for b, n in self.counts.get(counter, {}).items() if b > oldest)

    def next_change(self, windows: Iterable[tuple[str, int]], watermark: int) -> int | None:
        """The smallest watermark after this one at which one of (counter, span) drops a bucket."""
        best = None
        for counter, span_ms in windows:
            res = COUNTERS[counter]
            n = span_ms // res.bucket_ms
            live = [b for b in self.counts.get(counter, {}) if b > watermark // res.bucket_ms - n]
            if live:
                at = (min(live) + n) * res.bucket_ms
                best = at if best is None else min(best, at)
        return best

    def to_state(self) -> dict:
        """Plain JSON-able state: counters as flat [bucket, count, ...] lists."""
        state = {"c": {name: [x for b in sorted(bs) for x in (b, bs[b])]
                       for name, bs in self.counts.items() if bs},
                 "l": self.last_seen, "r": [list(r) for r in self.recent]}
        if self.ids:
            state["i"] = self.ids
        return state

    @classmethod
    def from_state(cls, state: Mapping) -> "Windows":
        """The inverse of `to_state`."""
        return cls({name: dict(zip(flat[::2], flat[1::2])) for name, flat in state["c"].items()},
                   state["l"], [(i, a, t) for i, a, t in state["r"]], list(state.get("i", ())))


def merge_recent(a: Iterable[Recent], b: Iterable[Recent], limit: int = RECENT_MAX) -> list[Recent]:
    """Recent views deduplicated by item (latest time, strongest action), most recent first,
    ties by item id, at most `limit`."""
    best: dict[str, Recent] = {}
    for item, action, ts in (*a, *b):
        old = best.get(item)
        if old is None:
            best[item] = (item, action, ts)
            continue
        strongest = action if ACTION_WEIGHTS[action] > ACTION_WEIGHTS[old[1]] else old[1]
        best[item] = (item, strongest, max(ts, old[2]))
    return sorted(best.values(), key=lambda r: (-r[2], r[0]))[:limit]


USER_WINDOWS = (("searches", 7 * DAY), ("searches", 30 * DAY), ("sessions", 7 * DAY),
                ("sessions", 30 * DAY))
ITEM_WINDOWS = (("views_m", HOUR), ("views_h", DAY), ("clicks_m", HOUR), ("clicks_h", DAY))


def user_features(w: Windows, watermark: int) -> dict[str, dict[str, FeatureValue]]:
    """The user's feature groups (`streams.feature_store.USER`) as of the watermark."""
    sessions_30d = w.total("sessions", 30 * DAY, watermark)
    duration = w.total("session_ms", 30 * DAY, watermark)
    return {
        "activity": {"searches_7d": w.total("searches", 7 * DAY, watermark),
                     "searches_30d": w.total("searches", 30 * DAY, watermark),
                     "sessions_7d": w.total("sessions", 7 * DAY, watermark),
                     "avg_session_ms_30d": duration / sessions_30d if sessions_30d else 0.0,
                     "last_seen": w.last_seen},
        "recent": {"items": [list(r) for r in merge_recent(w.recent, ())]},
    }


def item_features(w: Windows, watermark: int) -> dict[str, dict[str, FeatureValue]]:
    """The item's feature groups (`streams.feature_store.ITEM`); CTR is 0.0 without views."""
    views_24h = w.total("views_h", DAY, watermark)
    clicks_24h = w.total("clicks_h", DAY, watermark)
    return {"engagement": {"views_1h": w.total("views_m", HOUR, watermark), "views_24h": views_24h,
                           "clicks_1h": w.total("clicks_m", HOUR, watermark), "clicks_24h": clicks_24h,
                           "ctr_24h": clicks_24h / views_24h if views_24h else 0.0,
                           "last_seen": w.last_seen}}


def merged(state: Mapping | None, delta: Windows, watermark: int) -> Windows:
    """A stored state (`to_state`, or None) with a batch's delta added, pruned at the watermark."""
    w = Windows.from_state(state) if state else Windows()
    w.merge(delta)
    w.prune(watermark)
    return w


REBASE_HALF_LIVES = 64  # 2**64 stays far inside float range


@dataclass(slots=True)
class Popularity:
    """Item popularity decayed with a half-life in event time; top N for the fallback.

    Scores are kept as of `anchor` (decayed weight sums), so adding an event is
    one multiplication whatever its time, old events count for less, and two
    instances merge by summing after rescaling the other to this one's anchor. Past
    2 * capacity items the least popular are dropped, which makes very long
    tails approximate (space-saving style) but keeps the state bounded.
    """

    half_life_ms: int = 6 * HOUR
    capacity: int = 1_000
    anchor: int | None = None
    scores: dict[str, float] = field(default_factory=dict)

    def add(self, item: str, ts: int, weight: float = 1.0) -> None:
        """Count an interaction of `weight` with an item at event time ts."""
        if self.anchor is None:
            self.anchor = ts
        elif ts - self.anchor > REBASE_HALF_LIVES * self.half_life_ms:
            self._rebase(ts)
        self.scores[item] = self.scores.get(item, 0.0) + \
            weight * 2.0 ** ((ts - self.anchor) / self.half_life_ms)
        if len(self.scores) > 2 * self.capacity:
            self._trim()

    def _rebase(self, anchor: int) -> None:
        factor = 2.0 ** ((self.anchor - anchor) / self.half_life_ms) if self.anchor is not None else 1.0
        self.scores = {i: s * factor for i, s in self.scores.items() if s * factor > 0.0}
        self.anchor = anchor

    def _trim(self) -> None:
        keep = sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))[:self.capacity]
        self.scores = dict(keep)

    def merge(self, other: "Popularity") -> "Popularity":
        """Add another instance (same half-life) into this one; returns self."""
        if other.half_life_ms != self.half_life_ms:
            raise ValueError("popularity with different half-lives does not merge")
        if other.anchor is None:
            return self
        # Keep this instance's anchor unless the other is too far ahead (as `add` does):
        # a long-lived instance merging batch after batch then rescales only the
        # batch, and its unchanged items keep their stored scores (a changelog
        # writes only the items a batch touched).
        if self.anchor is None:
            self.anchor = other.anchor
        elif other.anchor - self.anchor > REBASE_HALF_LIVES * self.half_life_ms:
            self._rebase(other.anchor)
        factor = 2.0 ** ((other.anchor - self.anchor) / self.half_life_ms)
        for item, s in other.scores.items():
            self.scores[item] = self.scores.get(item, 0.0) + s * factor
        if len(self.scores) > 2 * self.capacity:
            self._trim()
        return self

    def top(self, n: int, now: int) -> list[tuple[str, float]]:
        """The n most popular items with their decayed weight as of now; ties by item id."""
        if self.anchor is None:
            return []
        factor = 2.0 ** ((self.anchor - now) / self.half_life_ms)
        best = sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return [(item, s * factor) for item, s in best]

    def snapshot(self, n: int, as_of: int) -> dict[str, FeatureValue]:
        """The `popular` entity's `top` group values (`streams.feature_store.POPULAR`)."""
        return {"items": [[i, s] for i, s in self.top(n, as_of)], "half_life_ms": self.half_life_ms}

    @classmethod
    def from_snapshot(cls, values: Mapping[str, Any], as_of: int,
                      capacity: int = 1_000) -> "Popularity":
        """A snapshot read back (as of its group timestamp), ready to merge with other partitions'."""
        half_life = int(values["half_life_ms"])
        scores = {str(i): float(s) for i, s in values["items"]}
        if half_life <= 0 or not all(math.isfinite(s) and s >= 0 for s in scores.values()):
            raise ValueError("a popularity snapshot needs a positive half-life and finite, "
                             "non-negative scores")
        return cls(half_life, capacity, as_of, scores)

    def to_state(self) -> dict:
        """Plain JSON-able state (for a Faust table)."""
        return {"h": self.half_life_ms, "n": self.capacity, "a": self.anchor, "s": self.scores}

    @classmethod
    def from_state(cls, state: Mapping) -> "Popularity":
        """The inverse of `to_state`."""
        return cls(state["h"], state["n"], state["a"], dict(state["s"]))


@dataclass(slots=True)
class FeatureBatch:
    """Deltas of one batch of records: per user, per item and popularity, applied in one go."""

    users: dict[str, Windows] = field(default_factory=dict)
    items: dict[str, Windows] = field(default_factory=dict)
    popularity: Popularity = field(default_factory=Popularity)
    max_ts: int | None = None
    skipped: int = 0
    duplicates: int = 0

    def _saw(self, ts: int) -> None:
        if self.max_ts is None or ts > self.max_ts:
            self.max_ts = ts

    def add_clicks(self, events: Iterable[ClickEvent],
                   stored: Mapping[str, Windows] | None = None,
                   not_after: int | None = None) -> "FeatureBatch":
        """Count a `clicks` record's events; ones that cannot be processed are skipped
        (the sessionizer dead-letters them, with the reason), and ones whose message id
        the user's latest ids hold (in this batch or in `stored`, the state the batch
        will be merged into) are duplicates, not counted."""
        for event in events:
            if event_problem(event, not_after) is not None:
                self.skipped += 1
                continue
            visitor = visitor_key(event)
            user = self.users.get(visitor)
            mid = zlib.crc32(event["message_id"].encode())
            known = stored.get(visitor) if stored is not None else None
            if (user is not None and mid in user.ids) or (known is not None and mid in known.ids):
                self.duplicates += 1
                continue
            ts = event["timestamp"]
            self._saw(ts)
            if user is None:
                user = self.users[visitor] = Windows()
            user.ids.append(mid)
            if len(user.ids) > 2 * IDS_KEPT:
                del user.ids[:-IDS_KEPT]
            user.seen(ts)
            if event_name(event) in SEARCH_EVENTS:
                user.add("searches", ts)
            it = interaction_of(event)
            if it is None:
                continue
            user.view(it.item, it.action, ts)
            item = self.items.get(it.item)
            if item is None:
                item = self.items[it.item] = Windows()
            item.seen(ts)
            suffix = "clicks" if it.action == "click" else "views"
            item.add(f"{suffix}_m", ts)
            item.add(f"{suffix}_h", ts)
            self.popularity.add(it.item, ts, ACTION_WEIGHTS[it.action])
        return self

    def add_session(self, session: Session) -> "FeatureBatch":
        """Count a closed session at its start time (sessions and their duration)."""
        start, end, duration = session.get("start"), session.get("end"), session.get("duration_ms")
        if not all(type(v) is int for v in (start, end, duration)):
            self.skipped += 1
            return self
        user = self.users.setdefault(session["visitor"], Windows())
        user.add("sessions", start)
        user.add("session_ms", start, duration)
        user.seen(end)
        self._saw(end)
        return self
