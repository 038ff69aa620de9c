"""The features worker's partition state: expiry without new events, refused writes
rewritten later, eviction, changelog round trip, item repartitioning, bad records."""
from __future__ import annotations

import random

import orjson
import pytest

from schemas.clicks import partition_of
from streams.codec import BadRecord
from streams.feature_windows import DAY, HOUR, MINUTE, FeatureBatch, Windows, merged, user_features
from streams.features_state import (ItemPartition, UserPartition, decode_item_deltas,
                                    encode_item_deltas, group_item_deltas, item_partition,
                                    session_problem)

T0 = 1_790_000_000_000 // DAY * DAY
CLICKS, SESSIONS, ITEMS = "clicks", "sessions", "items"


def ev(visitor: str, ts: int, name: str = "Product Viewed", item: str | None = "i1",
       mid: str | None = None) -> dict:
    return {"message_id": mid or f"{visitor}-{ts}-{name}-{item}", "type": "track", "event": name,
            "user_id": visitor, "anonymous_id": None, "timestamp": ts, "received_at": ts,
            "context": {}, "properties": {"item_id": item} if item else {}}


def search(visitor: str, ts: int) -> dict:
    return ev(visitor, ts, "Products Searched", None)


def writes_of(flush, kind: str = "user") -> dict:
    return {w.entity: (w.ts, w.groups) for w in flush.writes if w.spec.kind == kind}


@pytest.mark.parametrize("clock_at,rewritten,searches_7d,why", [
    (T0 + 7 * DAY + 11 * HOUR, False, None, "day 7 before its hour: nothing changes, no write"),
    (T0 + 7 * DAY + 12 * HOUR, True, 0, "day 8: the 7 d count drops, rewritten without an event"),
    (T0 + 10 * DAY, True, 0, "a jump past it: rewritten once, as of the new watermark"),
])
def test_a_quiet_visitor_is_rewritten_when_its_window_drops(clock_at, rewritten, searches_7d, why):
    part = UserPartition()
    part.add_clicks([search("quiet", T0 + 12 * HOUR)], CLICKS, 1)
    first = part.flush()
    assert writes_of(first)["quiet"][1]["activity"]["searches_7d"] == 1
    part.add_clicks([ev("other", clock_at, "Page Loaded", None)], CLICKS, 2)
    got = writes_of(part.flush())
    assert ("quiet" in got) == rewritten, why
    if rewritten:
        ts, groups = got["quiet"]
        assert ts == clock_at and set(groups) == {"activity"}, "only the windowed group, at the watermark"
        assert groups["activity"]["searches_7d"] == searches_7d
        assert groups["activity"]["searches_30d"] == 1


def test_expiry_follows_each_window_in_turn():
    part = UserPartition()
    part.add_clicks([search("u", T0), search("u", T0 + 2 * DAY)], CLICKS, 1)
    part.flush()
    seen = []
    for day in range(1, 33):
        part.add_clicks([ev("clock", T0 + day * DAY, "Page Loaded", None)], CLICKS, day + 1)
        got = writes_of(part.flush()).get("u")
        if got:
            a = got[1]["activity"]
            seen.append((day, a["searches_7d"], a["searches_30d"]))
    assert seen == [(7, 1, 2), (9, 0, 2), (30, 0, 1), (32, 0, 0)]


def test_an_entity_empty_past_its_ttl_is_evicted_with_a_tombstone():
    part = UserPartition()
    part.add_clicks([ev("old", T0, "Page Loaded", None)], CLICKS, 1)
    part.flush()
    part.take_dirty()
    part.add_clicks([ev("clock", T0 + 36 * DAY, "Page Loaded", None)], CLICKS, 2)
    assert "old" not in writes_of(part.flush())
    dirty = dict(part.take_dirty())
    assert dirty[b"u:old"] is None and b"u:clock" in dirty
    assert "old" not in part.entities.state


@pytest.mark.parametrize("refused_at,later,rewritten,why", [
    (T0 + 5, T0 + 5, False, "the watermark has not passed the refused write: wait"),
    (T0 + 5, T0 + 6, True, "past it: recomputed as of the new watermark"),
    (T0 + 50, T0 + 20, False, "Redis holds a write from further ahead: still waiting"),
])
def test_a_refused_write_is_recomputed_once_the_watermark_passes_it(refused_at, later, rewritten, why):
    part = UserPartition()
    part.add_clicks([ev("u", T0)], CLICKS, 1)
    part.flush()
    part.refused("u", refused_at)
    assert part.has_work
    part.add_clicks([ev("clock", later, "Page Loaded", None)], CLICKS, 2)
    got = writes_of(part.flush())
    assert ("u" in got) == rewritten, why
    if rewritten:
        assert got["u"][0] == later and set(got["u"][1]) == {"activity", "recent"}
        assert not part.has_work


def test_offsets_move_only_at_flush_and_per_topic():
    part = UserPartition()
    part.add_clicks([ev("u", T0)], CLICKS, 8)
    part.add_session({"visitor": "u", "start": T0, "end": T0 + 5, "duration_ms": 5}, SESSIONS, 3)
    part.skip(CLICKS, 9)
    assert (part.next_offset(CLICKS), part.next_offset(SESSIONS)) == (9, 3), "records already read"
    assert part.offsets == {}, "nothing in the state yet"
    part.flush()
    assert part.offsets == {CLICKS: 9, SESSIONS: 3}
    meta = dict(part.take_dirty())[b"\x00meta:u"]
    assert orjson.loads(meta) == {"w": T0 + 5, "o": {CLICKS: 9, SESSIONS: 3}}


def test_restore_from_the_changelog_continues_like_the_original():
    rng = random.Random(2)
    events = [ev(f"u{rng.randrange(6)}", T0 + rng.randrange(20 * DAY),
                 rng.choice(["Products Searched", "Product Viewed", "Product Clicked"]),
                 f"i{rng.randrange(4)}", str(n)) for n in range(300)]
    a, changelog = UserPartition(popular_items=10), {}
    for n in range(0, 200, 20):
        a.add_clicks(events[n:n + 20], CLICKS, n + 20)
        a.flush()
        for k, v in a.take_dirty():
            if v is None:
                changelog.pop(k, None)
            else:
                changelog[k] = v
    changelog[b"i:other-owner"] = b"ignored"           # the items' keys share the topic
    b = UserPartition.restore(changelog, popular_items=10)
    assert b.next_offset(CLICKS) == 200 and b.watermark == a.watermark
    outs = []
    for part in (a, b):
        part.add_clicks(events[200:], CLICKS, 300)
        part.add_clicks([ev("clock", T0 + 40 * DAY, "Page Loaded", None)], CLICKS, 301)
        outs.append(sorted((w.entity, w.ts, orjson.dumps(w.groups)) for w in part.flush().writes))
    assert outs[0] == outs[1], "the same writes, expiry included"
    assert a.popular(0) == b.popular(0)


def test_flushing_per_record_or_once_gives_the_same_features():
    rng = random.Random(9)
    events = [ev(f"u{rng.randrange(5)}", T0 + rng.randrange(9 * DAY),
                 rng.choice(["Products Searched", "Product Viewed"]), f"i{rng.randrange(3)}", str(n))
              for n in range(200)]
    last: dict[str, dict] = {}
    many = UserPartition()
    for n, e in enumerate(events):
        many.add_clicks([e], CLICKS, n + 1)
        for w in many.flush().writes:
            last.setdefault(w.entity, {}).update(w.groups)
    once = UserPartition()
    once.add_clicks(events, CLICKS, len(events))
    mark = max(e["timestamp"] for e in events)
    batch = FeatureBatch().add_clicks(events)
    expected = {u: user_features(merged(None, d, mark), mark) for u, d in batch.users.items()}
    assert {w.entity: w.groups for w in once.flush().writes} == expected
    for u, groups in last.items():
        # Written values as of the last write's watermark; a recount as of that watermark agrees.
        assert groups["recent"] == expected[u]["recent"]


@pytest.mark.parametrize("item,partitions", [("i1", 3), ("item-0042", 4), ("é", 7), ("", 2)])
def test_items_are_partitioned_as_kafka_partitions_keys(item, partitions):
    assert item_partition(item, partitions) == partition_of(item, partitions)
    grouped = group_item_deltas({item: Windows()}, partitions)
    assert list(grouped) == [partition_of(item, partitions)]


def test_item_deltas_round_trip():
    w = Windows()
    w.add("views_m", T0)
    w.add("clicks_h", T0 + HOUR, 3)
    w.seen(T0 + HOUR)
    mark, deltas = decode_item_deltas(encode_item_deltas(T0 + 2 * HOUR, {"i1": w}))
    assert mark == T0 + 2 * HOUR and deltas["i1"].to_state() == w.to_state()


@pytest.mark.parametrize("value,reason", [
    (None, "not JSON"),
    (b"\xff", "not JSON"),
    (b"[1]", "not an item-deltas record"),
    (b'{"w": "x", "d": {}}', "not an item-deltas record"),
    (b'{"w": 1, "d": {"i": {"c": 5}}}', "unreadable item delta"),
])
def test_bad_item_records_are_refused(value, reason):
    with pytest.raises(BadRecord, match=reason):
        decode_item_deltas(value)


@pytest.mark.parametrize("session,problem", [
    ({"visitor": "u", "start": 1, "end": 2, "duration_ms": 1}, None),
    ({"visitor": "u", "start": "1", "end": 2, "duration_ms": 1}, "integer"),
    ({"visitor": "u", "start": 1, "end": 2}, "integer"),
    ({"visitor": "u", "start": 1, "end": 2, "duration_ms": True}, "integer"),
    ({"visitor": "u", "start": 5, "end": 2, "duration_ms": 1}, "ends before it starts"),
    ({"visitor": "u", "start": 1, "end": 2, "duration_ms": -1}, "ends before it starts"),
])
def test_session_problems(session, problem):
    got = session_problem(session)
    assert (got is None) == (problem is None) and (problem is None or problem in got)


def test_item_windows_expire_on_the_senders_watermark_alone():
    part = ItemPartition()
    w = Windows()
    w.add("views_m", T0)
    w.add("views_h", T0)
    w.seen(T0)
    part.add_record(encode_item_deltas(T0, {"i1": w}), ITEMS, 1)
    first = writes_of(part.flush(), "item")["i1"][1]["engagement"]
    assert (first["views_1h"], first["views_24h"]) == (1, 1)
    part.add_record(encode_item_deltas(T0 + HOUR + MINUTE, {}), ITEMS, 2)   # a heartbeat
    got = writes_of(part.flush(), "item")["i1"]
    assert got[0] == T0 + HOUR + MINUTE
    assert (got[1]["engagement"]["views_1h"], got[1]["engagement"]["views_24h"]) == (0, 1)
    part.add_record(encode_item_deltas(T0, {}), ITEMS, 3)       # an older sender: no going back
    assert part.flush().watermark == T0 + HOUR + MINUTE
    assert part.offsets == {ITEMS: 3}


def test_the_changelog_holds_only_the_popular_items_a_commit_touched():
    part = UserPartition(popular_items=10)
    part.add_clicks([ev("u", T0, item="a"), ev("u", T0 + 1, item="b")], CLICKS, 1)
    part.flush()
    first = {k for k, _ in part.take_dirty() if k.startswith(b"p:") or k == b"\x00popular"}
    assert first == {b"p:a", b"p:b", b"\x00popular"}, "first dump: every item and the anchor"
    part.add_clicks([ev("v", T0 + 2 * HOUR, item="b")], CLICKS, 2)
    part.flush()
    second = {k for k, _ in part.take_dirty() if k.startswith(b"p:") or k == b"\x00popular"}
    assert second == {b"p:b"}, "then only the items touched, on the same anchor"
    assert [k for k, _ in part.take_dirty() if k.startswith(b"p:")] == [], "nothing touched"


def test_trimmed_popular_items_leave_the_changelog_and_a_restore_equals_the_original():
    part, changelog = UserPartition(popular_items=3), {}
    for n in range(12):
        part.add_clicks([ev("u", T0 + n, item=f"i{n}")] * (n + 1), CLICKS, n + 1)
        part.flush()
        for k, v in part.take_dirty():
            if v is None:
                changelog.pop(k, None)
            else:
                changelog[k] = v
    held = {k[2:].decode() for k in changelog if k.startswith(b"p:")}
    assert held == set(part.popularity.scores) and len(held) <= 6, "trimmed ones are tombstoned"
    back = UserPartition.restore(changelog, popular_items=3)
    assert back.popularity.top(3, T0 + 12) == part.popularity.top(3, T0 + 12)
