"""What the recommender knows about a visitor, from one Redis round trip: pure, no I/O.

`profile_of` turns the pipeline's two answers — the `user:<visitor>` hash
(HGETALL, layout in `streams.feature_store`) and the precomputed top-k string
(`topk:<visitor>`, JSON written by `clickloop train --precompute`) — into a
`Profile`. Only fresh groups are used: a stale `recent` group (its `_ts` older
than the group's max age) gives no recent items, so the visitor is not folded
in from it and nothing is filtered as seen from it; its status says `stale`
(the response and /metrics show it). An unreadable top-k value is ignored.

A profile is what the hot-key cache keeps, so its rankings are memoized on it
(`rankings`, keyed by model version, k and exclude_seen): the same features and
the same model give the same ranking, so a hot visitor (a page reloaded, a
crawler) pays for one inference per cache period, not one per request, and a
model swap changes the key.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

from streams.feature_store import FEATURE_SET_VERSION, USER, read


@dataclass(frozen=True, slots=True)
class TopK:
    """A precomputed ranking for one visitor, by one model version."""

    name: str
    version: str
    items: list[tuple[str, float]]
    computed_ms: int


@dataclass(slots=True)
class Profile:
    """A visitor's fresh features: recent interactions, seen items, group statuses, top-k."""

    recent: tuple[tuple, ...]            # (item, action, ts), most recent first; fresh only
    seen: frozenset[str]
    status: dict[str, str]               # group -> fresh | stale | missing
    topk: TopK | None
    rankings: dict[tuple, tuple] = field(default_factory=dict)  # (version, sha, k, exclude_seen) ->
                                                                 # (Ranking, source)


EMPTY_STATUS = {g.name: "missing" for g in USER.groups}


def parse_topk(raw: bytes | str | None) -> TopK | None:
    """The precomputed top-k JSON, or None when absent or unreadable. Entries are kept
    only with a string item and a finite score, each item once (its first place)."""
    if not raw:
        return None
    try:
        d = orjson.loads(raw)
        items, taken = [], set()
        for i, s in d["items"]:
            if i.__class__ is str and s.__class__ in (int, float) and math.isfinite(s) \
                    and i not in taken:
                taken.add(i)
                items.append((i, float(s)))
        return TopK(str(d["name"]), str(d["version"]), items, int(d.get("computed_ms") or 0))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def profile_of(user_hash: Mapping[bytes | str, bytes | str], topk_raw: bytes | str | None,
               now_ms: int) -> Profile:
    """A profile from the pipeline's answers as of now (epoch ms, wall clock)."""
    topk = parse_topk(topk_raw)
    if not user_hash:
        return Profile((), frozenset(), dict(EMPTY_STATUS), topk)
    entity = read(USER, FEATURE_SET_VERSION, user_hash, now_ms)
    recent_group = entity.fresh("recent")
    recent: tuple = ()
    if recent_group is not None and isinstance(recent_group.get("items"), list):
        # Tuples of strings and ints: the garbage collector stops tracking them, so a
        # full cache does not lengthen its pauses. Only well-formed entries (item,
        # action, integer time): one odd entry must not fail this visitor's scoring,
        # nor count against the model's breaker for everyone.
        recent = tuple((r[0], r[1], r[2]) for r in recent_group["items"]
                       if r.__class__ is list and len(r) == 3 and r[0].__class__ is str
                       and r[1].__class__ is str and r[2].__class__ is int)
    status = {name: g.status for name, g in entity.groups.items()}
    return Profile(recent, frozenset(str(r[0]) for r in recent), status, topk)
