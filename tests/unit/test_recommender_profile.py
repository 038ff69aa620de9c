"""A visitor's profile from the pipeline's answers: only fresh groups used, top-k parsed or ignored."""
from __future__ import annotations

import orjson
import pytest

from services.recommender.profile import parse_topk, profile_of
from streams.feature_store import FEATURE_SET_VERSION, USER, GroupWrite, apply_writes

DAY = 86_400_000
NOW = 1_800_000_000_000


def user_hash(recent_ts: int, activity_ts: int, items=(("i1", "click"), ("i2", "view")), version=FEATURE_SET_VERSION):
    writes = [GroupWrite("activity", activity_ts, {"searches_7d": 1, "searches_30d": 1, "sessions_7d": 1,
                                                   "avg_session_ms_30d": 1.0, "last_seen": activity_ts}),
              GroupWrite("recent", recent_ts, {"items": [[i, a, recent_ts] for i, a in items]})]
    fields, _ = apply_writes({}, USER, version, writes)
    return {k.encode(): v.encode() for k, v in fields.items()}


@pytest.mark.parametrize("recent_age,activity_age,status,n_recent,why", [
    (0, 0, {"activity": "fresh", "recent": "fresh"}, 2, "both fresh"),
    (29 * DAY, 2 * DAY, {"activity": "stale", "recent": "fresh"}, 2, "activity's max age is a day"),
    (31 * DAY, 0, {"activity": "fresh", "recent": "stale"}, 0, "stale recent items are not used"),
])
def test_freshness_decides_what_is_used(recent_age, activity_age, status, n_recent, why):
    p = profile_of(user_hash(NOW - recent_age, NOW - activity_age), None, NOW)
    assert p.status == status, why
    assert len(p.recent) == n_recent and len(p.seen) == n_recent, why


def test_fresh_recent_items_are_seen_in_order():
    p = profile_of(user_hash(NOW, NOW), None, NOW)
    assert p.recent == (("i1", "click", NOW), ("i2", "view", NOW))
    assert p.seen == {"i1", "i2"}


def test_missing_hash_and_other_feature_set_version():
    assert profile_of({}, None, NOW).status == {"activity": "missing", "recent": "missing"}
    other = profile_of(user_hash(NOW, NOW, version=FEATURE_SET_VERSION + 1), None, NOW)
    assert other.status == {"activity": "missing", "recent": "missing"} and other.recent == ()


@pytest.mark.parametrize("raw,ok,why", [
    (orjson.dumps({"name": "als", "version": "v1", "items": [["a", 0.5]], "computed_ms": 1}), True, "valid"),
    (orjson.dumps({"name": "als", "version": "v1", "items": []}), True, "computed_ms optional"),
    (None, False, "absent"),
    (b"", False, "empty"),
    (b"{not json", False, "unreadable"),
    (orjson.dumps({"name": "als", "items": []}), False, "no version"),
    (orjson.dumps({"name": "als", "version": "v1", "items": [["a"]]}), False, "malformed item"),
])
def test_topk_parsing(raw, ok, why):
    topk = parse_topk(raw)
    assert (topk is not None) is ok, why
    if ok:
        assert topk.name == "als" and topk.version == "v1"


def test_only_well_formed_recent_entries_are_kept():
    """An odd entry (an action that is a list, an item that is a number, a time that is
    text) would fail the fold-in: it is left out, the rest is used."""
    writes = [GroupWrite("recent", NOW, {"items": [["i1", "click", NOW], ["i2", ["view"], NOW],
                                                   [7, "view", NOW], ["i3", "view", "now"],
                                                   ["i4", "view"], "i5", ["i6", "view", NOW]]})]
    fields, _ = apply_writes({}, USER, FEATURE_SET_VERSION, writes)
    p = profile_of({k.encode(): v.encode() for k, v in fields.items()}, None, NOW)
    assert p.recent == (("i1", "click", NOW), ("i6", "view", NOW)) and p.seen == {"i1", "i6"}


def test_precomputed_entries_need_a_string_item_and_a_finite_score_once():
    raw = b'{"name": "als", "version": "v1", "items": [["a", 0.9], ["a", 0.8], [3, 0.7], ' \
          b'["b", "-inf"], ["c", null], ["d", 0.5]]}'
    assert parse_topk(raw).items == [("a", 0.9), ("d", 0.5)]
