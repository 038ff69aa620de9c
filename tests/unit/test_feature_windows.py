"""Windowed features: expiry, out-of-order events, batching equals one-by-one, state round trip,
popularity decay and merge; checked against brute-force recomputation from raw events."""
from __future__ import annotations

import random

import orjson
import pytest

from streams.feature_store import ITEM, POPULAR, USER, GroupWrite, apply_writes, read
from streams.feature_windows import (DAY, HOUR, ITEM_WINDOWS, MINUTE, RECENT_MAX, USER_WINDOWS,
                                     FeatureBatch, Popularity, Windows, item_features, merge_recent,
                                     merged, user_features)

T0 = 1_790_000_000_000 // DAY * DAY  # a midnight, UTC


def ev(visitor: str, ts: int, name: str = "Product Viewed", item: str | None = "i1",
       mid: str | None = None) -> dict:
    return {"message_id": mid or f"{visitor}-{ts}-{name}-{item}", "type": "track", "event": name,
            "user_id": visitor, "anonymous_id": None, "timestamp": ts, "received_at": ts,
            "context": {}, "properties": {"item_id": item} if item else {}}


def search(visitor: str, ts: int) -> dict:
    return ev(visitor, ts, name="Products Searched", item=None)


def session(visitor: str, start: int, duration: int) -> dict:
    return {"v": 1, "session_id": f"s{start}", "visitor": visitor, "start": start,
            "end": start + duration, "duration_ms": duration}


@pytest.mark.parametrize("event_at,watermark,count_7d,count_30d,why", [
    (T0 + 12 * HOUR, T0 + 12 * HOUR, 1, 1, "counted at once"),
    (T0 + 12 * HOUR, T0 + 7 * DAY + 11 * HOUR + 59 * MINUTE, 1, 1, "inside on day 7 before its hour"),
    (T0 + 12 * HOUR, T0 + 7 * DAY + 12 * HOUR, 0, 1, "day 8: gone 7 d after its bucket began"),
    (T0 + 12 * HOUR + 30 * MINUTE, T0 + 7 * DAY + 12 * HOUR, 0, 1,
     "whole hourly buckets: dropped up to one hour early, never counted too long"),
    (T0 + 12 * HOUR, T0 + 30 * DAY + 11 * HOUR, 0, 1, "the 30 d window still holds it"),
    (T0 + 12 * HOUR, T0 + 30 * DAY + 12 * HOUR, 0, 0, "day 31: gone from both"),
])
def test_seven_day_count_really_drops_day_eight(event_at, watermark, count_7d, count_30d, why):
    w = Windows()
    w.add("searches", event_at)
    assert w.total("searches", 7 * DAY, watermark) == count_7d, why
    assert w.total("searches", 30 * DAY, watermark) == count_30d, why


@pytest.mark.parametrize("counter,span,offsets_min,watermark_min,expected,why", [
    ("views_m", HOUR, [0, 30, 59], 59, 3, "three views within the hour"),
    ("views_m", HOUR, [0, 30, 59], 60, 2, "minute 0 leaves the 1 h window at minute 60"),
    ("views_h", DAY, [0, 30, 59], 60, 3, "but stays in the 24 h window"),
    ("views_h", DAY, [0, 30, 59], 24 * 60, 0, "until the next day"),
    ("views_m", HOUR, [10, 5, 50, 1], 55, 4, "out of order within the window: all counted"),
])
def test_item_windows(counter, span, offsets_min, watermark_min, expected, why):
    w = Windows()
    for m in offsets_min:
        w.add(counter, T0 + m * MINUTE)
    assert w.total(counter, span, T0 + watermark_min * MINUTE) == expected, why


def test_out_of_order_events_land_in_their_own_buckets():
    w = Windows()
    for h in (5, 1, 3, 1):
        w.add("searches", T0 + h * HOUR + 7)
    assert w.counts["searches"] == {T0 // HOUR + 1: 2, T0 // HOUR + 3: 1, T0 // HOUR + 5: 1}


def test_prune_drops_only_buckets_past_the_horizon():
    w = Windows()
    w.add("searches", T0)                 # will be past 30 d
    w.add("searches", T0 + 2 * DAY)
    w.add("views_m", T0 + 30 * DAY)       # minute counter: horizon 1 h
    dropped = w.prune(T0 + 30 * DAY + HOUR)
    assert dropped == 2
    assert w.counts["searches"] == {(T0 + 2 * DAY) // HOUR: 1} and w.counts["views_m"] == {}


@pytest.mark.parametrize("hours,watermark_h,expected_h,why", [
    ([], 0, None, "nothing counted: nothing to expire"),
    ([10], 10, 10 + 24, "the only bucket leaves the 24 h window"),
    ([10, 20], 30, 34, "the oldest live bucket first"),
    ([10, 20], 34, 44, "once it is gone, the next one"),
])
def test_next_change(hours, watermark_h, expected_h, why):
    w = Windows()
    for h in hours:
        w.add("views_h", T0 + h * HOUR)
    got = w.next_change([("views_h", DAY)], T0 + watermark_h * HOUR)
    assert got == (None if expected_h is None else T0 + expected_h * HOUR), why
    if got is not None:
        before = w.total("views_h", DAY, got - 1)
        assert w.total("views_h", DAY, got) < before, "the count really changes there"


@pytest.mark.parametrize("a,b,expected,why", [
    ([("x", "view", 5)], [("y", "view", 7)], [("y", "view", 7), ("x", "view", 5)], "most recent first"),
    ([("x", "view", 5)], [("x", "view", 9)], [("x", "view", 9)], "dedupe keeps the latest time"),
    ([("x", "click", 5)], [("x", "view", 9)], [("x", "click", 9)], "and the strongest action"),
    ([("x", "view", 9)], [("x", "click", 2)], [("x", "click", 9)], "an older click still counts"),
    ([("b", "view", 5)], [("a", "view", 5)], [("a", "view", 5), ("b", "view", 5)], "ties by item id"),
])
def test_merge_recent(a, b, expected, why):
    assert merge_recent(a, b) == expected, why
    assert merge_recent(b, a) == expected, "order of merging does not matter"


def test_recent_list_is_bounded():
    w = Windows()
    for n in range(3 * RECENT_MAX):
        w.view(f"i{n}", "view", T0 + n)
    items = user_features(w, T0)["recent"]["items"]
    assert len(items) == RECENT_MAX
    assert items[0] == [f"i{3 * RECENT_MAX - 1}", "view", T0 + 3 * RECENT_MAX - 1]


def reference(events, sessions, watermark):
    """Offline recomputation from raw events with the same whole-bucket windows."""
    def inside(ts, bucket, span):
        return ts // bucket > watermark // bucket - span // bucket
    users, items = {}, {}
    for e in events:
        u = users.setdefault(e["user_id"], {"s7": 0, "s30": 0, "ses7": 0, "n30": 0, "ms30": 0, "last": None})
        u["last"] = max(u["last"] or e["timestamp"], e["timestamp"])
        if e["event"] == "Products Searched":
            u["s7"] += inside(e["timestamp"], HOUR, 7 * DAY)
            u["s30"] += inside(e["timestamp"], HOUR, 30 * DAY)
        elif e["event"] in ("Product Viewed", "Product Clicked"):
            kind = "c" if e["event"] == "Product Clicked" else "v"
            i = items.setdefault(e["properties"]["item_id"], {"v1": 0, "v24": 0, "c1": 0, "c24": 0})
            i[f"{kind}1"] += inside(e["timestamp"], MINUTE, HOUR)
            i[f"{kind}24"] += inside(e["timestamp"], HOUR, DAY)
    for s in sessions:
        u = users[s["visitor"]]
        u["ses7"] += inside(s["start"], HOUR, 7 * DAY)
        u["n30"] += inside(s["start"], HOUR, 30 * DAY)
        u["ms30"] += s["duration_ms"] * inside(s["start"], HOUR, 30 * DAY)
        u["last"] = max(u["last"], s["end"])
    return users, items


def test_batches_in_any_order_equal_an_offline_recomputation():
    rng = random.Random(7)
    names = ["Products Searched", "Product Viewed", "Product Clicked", "Page Loaded"]
    events = [ev(f"u{rng.randrange(5)}", T0 + rng.randrange(40 * DAY), rng.choice(names),
                 f"i{rng.randrange(8)}", mid=str(n)) for n in range(600)]
    sessions = [session(f"u{n % 5}", T0 + rng.randrange(40 * DAY), rng.randrange(1, 3 * HOUR))
                for n in range(40)]
    watermark = max([e["timestamp"] for e in events] + [s["end"] for s in sessions])
    rng.shuffle(events)
    users: dict[str, dict] = {}
    items: dict[str, dict] = {}
    for start in range(0, len(events), 37):       # batches, each stored and restored as JSON
        batch = FeatureBatch().add_clicks(events[start:start + 37])
        if start < len(sessions):
            for s in sessions[start:start + 37]:
                batch.add_session(s)
        mark = batch.max_ts
        for store, deltas in ((users, batch.users), (items, batch.items)):
            for key, delta in deltas.items():
                state = merged(store.get(key), delta, mark)
                store[key] = orjson.loads(orjson.dumps(state.to_state()))
    ref_users, ref_items = reference(events, sessions, watermark)
    for u, r in ref_users.items():
        got = user_features(Windows.from_state(users[u]), watermark)["activity"]
        assert got == {"searches_7d": r["s7"], "searches_30d": r["s30"], "sessions_7d": r["ses7"],
                       "avg_session_ms_30d": r["ms30"] / r["n30"] if r["n30"] else 0.0,
                       "last_seen": r["last"]}, u
    for i, r in ref_items.items():
        got = item_features(Windows.from_state(items[i]), watermark)["engagement"]
        assert (got["views_1h"], got["views_24h"], got["clicks_1h"], got["clicks_24h"]) == \
            (r["v1"], r["v24"], r["c1"], r["c24"]), i
        assert got["ctr_24h"] == (r["c24"] / r["v24"] if r["v24"] else 0.0)


def test_bad_events_and_sessions_are_skipped_not_counted():
    batch = FeatureBatch().add_clicks([{"type": "track"}, ev("u1", T0, item=None), "junk"])
    batch.add_session({"visitor": "u1", "start": "yesterday", "end": 1, "duration_ms": 1})
    assert batch.skipped == 3
    assert list(batch.users) == ["u1"] and batch.items == {}


def test_an_event_stamped_after_its_record_allows_is_skipped_and_moves_no_clock():
    """One click stamped a year ahead would have moved the features' watermark a year on
    and emptied every window: with the record's bound it is skipped, like a bad event."""
    year = 365 * DAY
    batch = FeatureBatch().add_clicks([ev("u1", T0), ev("u2", T0 + year, mid="m-future")],
                                      not_after=T0 + 300_000)
    assert batch.skipped == 1 and list(batch.users) == ["u1"] and batch.max_ts == T0


def test_features_fit_the_declared_store_layout():
    batch = FeatureBatch().add_clicks([ev("u1", T0), ev("u1", T0 + 1, "Product Clicked")])
    batch.add_session(session("u1", T0, 60_000))
    user = user_features(batch.users["u1"], T0 + 1)
    item = item_features(batch.items["i1"], T0 + 1)
    popular = {"top": batch.popularity.snapshot(10, T0 + 1)}
    for spec, groups in ((USER, user), (ITEM, item), (POPULAR, popular)):
        writes = [GroupWrite(g, T0 + 1, values) for g, values in groups.items()]
        stored, _ = apply_writes({}, spec, 1, writes)
        back = read(spec, 1, stored, T0 + 1)
        assert {g: back.fresh(g) for g in groups} == groups, spec.kind
    assert user["recent"]["items"] == [["i1", "click", T0 + 1]]
    assert item["engagement"]["ctr_24h"] == 1.0


def test_windows_declared_for_expiry_cover_the_features():
    assert {c for c, _ in USER_WINDOWS} <= {"searches", "sessions"}
    assert {c for c, _ in ITEM_WINDOWS} == {"views_m", "views_h", "clicks_m", "clicks_h"}


H = 6 * HOUR


@pytest.mark.parametrize("adds,now,expected,why", [
    ([("a", 0, 1.0)], 0, [("a", 1.0)], "one view, now"),
    ([("a", 0, 1.0)], H, [("a", 0.5)], "one half-life later: half"),
    ([("a", 0, 1.0)], 3 * H, [("a", 0.125)], "three half-lives"),
    ([("a", 0, 1.0), ("b", H, 1.0)], H, [("b", 1.0), ("a", 0.5)], "recent beats old"),
    ([("b", H, 1.0), ("a", 0, 1.0)], H, [("b", 1.0), ("a", 0.5)], "order of events does not matter"),
    ([("a", 0, 2.0), ("b", H, 1.0)], H, [("a", 1.0), ("b", 1.0)], "tie broken by item id"),
    ([("a", 0, 1.0), ("a", 100 * H, 1.0)], 100 * H, [("a", 1.0 + 2.0 ** -100)], "rebased anchor"),
])
def test_popularity_decay(adds, now, expected, why):
    p = Popularity(half_life_ms=H)
    for item, at, weight in adds:
        p.add(item, T0 + at, weight)
    got = p.top(10, T0 + now)
    assert [i for i, _ in got] == [i for i, _ in expected], why
    assert [s for _, s in got] == pytest.approx([s for _, s in expected]), why


def test_popularity_merge_equals_one_instance():
    rng = random.Random(3)
    adds = [(f"i{rng.randrange(20)}", T0 + rng.randrange(200 * H), rng.choice([1.0, 2.0]))
            for _ in range(500)]
    whole, parts = Popularity(half_life_ms=H), [Popularity(half_life_ms=H) for _ in range(3)]
    for n, (item, at, w) in enumerate(adds):
        whole.add(item, at, w)
        parts[n % 3].add(item, at, w)
    now = T0 + 200 * H
    snapshots = [Popularity.from_snapshot(p.snapshot(50, now - n * H), now - n * H)
                 for n, p in enumerate(parts)]  # read back from Redis at different ages
    combined = Popularity(half_life_ms=H)
    for s in snapshots:
        combined.merge(s)
    assert [i for i, _ in combined.top(5, now)] == [i for i, _ in whole.top(5, now)]
    assert dict(combined.top(20, now)) == pytest.approx(dict(whole.top(20, now)))
    restored = Popularity.from_state(orjson.loads(orjson.dumps(whole.to_state())))
    assert restored.top(20, now) == whole.top(20, now)


def test_popularity_is_bounded_and_refuses_mixed_half_lives():
    p = Popularity(half_life_ms=H, capacity=3)
    for n in range(10):
        p.add(f"i{n}", T0, float(n))
    assert len(p.scores) <= 6 and [i for i, _ in p.top(3, T0)] == ["i9", "i8", "i7"]
    with pytest.raises(ValueError):
        p.merge(Popularity(half_life_ms=H + 1, anchor=T0, scores={"x": 1.0}))
    assert Popularity().top(3, T0) == []


def test_odd_event_names_and_item_ids_name_nothing_and_never_fail():
    """An `event` that is a list, an object or a number (the collector only checks track
    events' names) names nothing, as in the compiled sessionizer; so does an item id
    that is an object; and only track events carry items or searches (the audit found
    `["x"]` crashing the features agent and losing the rest of its record)."""
    from streams.sessions import item_of

    odd = [{**ev("mallory", T0), "event": ["x"]}, {**ev("mallory", T0), "event": {"a": 1}},
           {**ev("mallory", T0), "event": 7}, {**ev("mallory", T0), "type": "page"},
           {**search("mallory", T0), "type": "page"},
           {**ev("mallory", T0), "properties": {"item_id": {"a": 1}}},
           {**ev("mallory", T0), "properties": ["i1"]}]
    batch = FeatureBatch().add_clicks(odd + [ev("bob", T0), search("bob", T0)])
    assert batch.items.keys() == {"i1"} and batch.skipped == 0
    assert user_features(batch.users["mallory"], T0)["activity"]["searches_7d"] == 0
    assert user_features(batch.users["bob"], T0)["activity"]["searches_7d"] == 1
    assert [item_of(e) for e in odd] == [None] * len(odd)
    assert [item_of({**ev("u", T0), "properties": {"item_id": v}}) for v in (7, 2.5, True, "")] == \
        ["7", "2.5", "True", None]
    assert item_of({**ev("u", T0), "properties": {"item_id": "", "product_id": "p9"}}) == "p9"


def test_a_retried_event_is_counted_once_in_the_batch_and_after_a_flush_and_a_restore():
    """The collector answers 503, the client retries the batch: the same message ids come
    again. The sessionizer dedupes them; the features must not count them twice either."""
    from streams.features_state import UserPartition

    first = [search("u1", T0), ev("u1", T0 + 1, mid="m-view")]
    part = UserPartition()
    part.add_clicks(first + [search("u1", T0)], "clicks", 1)       # the same id twice in a batch
    part.flush()
    part.add_clicks(first, "clicks", 2)                             # the retry, after a flush
    part.flush()
    restored = UserPartition.restore(dict(part.take_dirty()))
    restored.add_clicks(first + [ev("u2", T0, mid="m-view")], "clicks", 3)   # after a restart
    restored.flush()
    w = restored.entities.state["u1"]
    assert user_features(w, T0 + 1)["activity"]["searches_7d"] == 1
    assert restored.entities.state["u2"].recent == [("i1", "view", T0)], "another user's id is its own"
    batch = FeatureBatch().add_clicks([ev("u3", T0 + n, mid=f"m{n}") for n in range(500)])
    assert len(batch.users["u3"].ids) <= 128 and batch.duplicates == 0
    assert len(Windows().merge(batch.users["u3"]).ids) == 64
