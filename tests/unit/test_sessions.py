"""Session rules of streams.sessions, as tables of cases (gap 30 min, grace 10 min, max 24 h)."""
from __future__ import annotations

import dataclasses
import random

import fastjsonschema
import orjson
import pytest

from schemas import json_schema
from streams.codec import BadRecord, event_problem
from streams.sessions import PartitionSessions, SessionConfig, session_id, utm_of

MIN = 60_000
CFG = SessionConfig(gap_ms=30 * MIN, grace_ms=10 * MIN, max_ms=24 * 60 * MIN)


def ev(visitor: str, minute: float, mid: str | None = None, kind: str = "track",
       name: str | None = "Product Viewed", path: str | None = None, item: str | None = None,
       referrer: str = "", user: str | None = None, device: str | None = None,
       url: str | None = None, campaign: dict | None = None) -> dict:
    context: dict = {}
    if path or url:
        context["page"] = {k: v for k, v in (("path", path), ("url", url),
                                             ("referrer", referrer)) if v}
    if device:
        context["ua"] = {"browser": "Chrome", "os": "Linux", "device": device, "is_bot": False}
    if campaign:
        context["campaign"] = campaign
    return {
        "message_id": mid or f"{visitor}-{minute}-{name}-{user}", "type": kind,
        "event": name if kind == "track" else None,
        "user_id": user if user is not None else (visitor if visitor.startswith("u") else None),
        "anonymous_id": visitor if visitor.startswith("a") else "anon-x",
        "timestamp": int(minute * MIN), "received_at": int(minute * MIN),
        "context": context, "properties": {"item_id": item} if item else {},
    }


def run(events: list[dict], cfg: SessionConfig = CFG):
    """Feed events one record each; return closed sessions, late events, duplicates, state."""
    part, closed, late, dups = PartitionSessions(cfg), [], [], 0
    for offset, event in enumerate(events):
        out = part.process([event], offset + 1)
        closed += out.closed
        late += [e for e, _ in out.late]
        dups += out.duplicates
    return closed, late, dups, part


def spans(closed):
    return [(s["visitor"], s["start"] / MIN, s["end"] / MIN, s["event_count"]) for s in closed]


# (reason, events as (visitor, minute), closed sessions as (visitor, start, end, count), late minutes)
CASES = [
    ("one event stays open until the watermark passes end + gap + grace",
     [("u1", 0), ("u2", 39)], [], []),
    ("the watermark reaching end + gap + grace closes an idle visitor",
     [("u1", 0), ("u1", 5), ("u2", 45)], [("u1", 0, 5, 2)], []),
    ("a gap one ms short of 30 min keeps the session",
     [("u1", 0), ("u1", 30 - 1 / MIN), ("u2", 200)], [("u1", 0, 30 - 1 / MIN, 2)], []),
    ("a gap of exactly 30 min starts a new session (half-open windows)",
     [("u1", 0), ("u1", 30), ("u2", 200)], [("u1", 0, 0, 1), ("u1", 30, 30, 1)], []),
    ("out of order within the gap joins the open session and moves its start",
     [("u1", 10), ("u1", 2), ("u2", 100)], [("u1", 2, 10, 2)], []),
    ("a late event within grace still joins its open session",
     [("u1", 0), ("u2", 35), ("u1", 3), ("u2", 100)], [("u1", 0, 3, 2), ("u2", 35, 35, 1)], []),
    ("a late event bridging two open sessions merges them",
     [("u1", 0), ("u1", 35), ("u1", 20), ("u2", 200)], [("u1", 0, 35, 3)], []),
    ("an event older than the grace is late, not a new session",
     [("u1", 100), ("u2", 150), ("u1", 105)], [("u1", 100, 100, 1)], [105]),
    ("an event later than the grace for a fresh visitor is late too",
     [("u1", 100), ("u3", 50)], [], [50]),
    ("the boundary: exactly gap + grace behind the watermark is late",
     [("u1", 100), ("u2", 140)], [("u1", 100, 100, 1)], []),
    ("the watermark closes several idle visitors, each once",
     [("u1", 0), ("a2", 3), ("u3", 100)], [("u1", 0, 0, 1), ("a2", 3, 3, 1)], []),
]


@pytest.mark.parametrize("reason,events,expected,late_minutes", CASES, ids=[c[0] for c in CASES])
def test_session_rules(reason, events, expected, late_minutes):
    closed, late, _, _ = run([ev(v, m) for v, m in events])
    assert spans(closed) == expected, reason
    assert [e["timestamp"] / MIN for e in late] == late_minutes, reason


def test_late_boundary_exactly_at_gap_plus_grace():
    # Watermark 140: an event at 100 is exactly gap + grace behind it.
    _, late, _, _ = run([ev("u2", 140), ev("u1", 100)])
    assert [e["timestamp"] for e in late] == [100 * MIN]
    _, late, _, _ = run([ev("u2", 140), ev("u1", 100 + 1 / MIN)])
    assert late == []


def test_duplicates_are_counted_once_even_out_of_order():
    closed, _, dups, _ = run([ev("u1", 0, mid="m1"), ev("u1", 5, mid="m2"),
                              ev("u1", 1, mid="m1"), ev("u2", 99)])
    assert (closed[0]["event_count"], dups) == (2, 1)


def test_dedupe_is_per_visitor_another_visitors_event_with_the_same_id_counts():
    """The audit saw bob's event dropped as a duplicate of alice's (ids reused across users:
    counters, ids derived from business keys)."""
    closed, _, dups, _ = run([ev("u1", 0, mid="m1"), ev("u2", 1, mid="m1"), ev("u1", 2, mid="m1"),
                              ev("u3", 99)])
    assert dups == 1 and sorted((s["visitor"], s["event_count"]) for s in closed) == \
        [("u1", 1), ("u2", 1)]


def test_a_day_long_session_keeps_a_bounded_state_and_still_dedupes_retries():
    """A bot sending every 3 s for 21 hours: 25,000 events in one session. Its changelog
    entry once grew past the broker's 1 MB record limit (every message id kept) and the
    worker stopped on it; now the session remembers its latest 1,000-2,000 ids, and a
    retry of a recent event is still a duplicate."""
    part, dups, biggest = PartitionSessions(CFG), 0, 0
    for n in range(25_000):
        out = part.process([ev("u1", n * 0.05, mid=f"bot-message-{n:08d}-with-a-long-suffix")], n + 1)
        dups += out.duplicates
        if n % 1000 == 999:
            biggest = max(biggest, max(len(state) for _, state in part.take_dirty() if state))
    retry = part.process([ev("u1", 1249.0, mid="bot-message-00024990-with-a-long-suffix")])
    old = part.process([ev("u1", 1249.5, mid="bot-message-00000001-with-a-long-suffix")])
    closed = part.process([ev("u2", 5000)]).closed
    assert dups == 0 and retry.duplicates == 1 and old.duplicates == 0
    assert biggest < 150_000, biggest
    assert closed[0]["event_count"] == 25_001


def test_a_crawlers_session_lists_its_first_1000_items_and_100_event_names():
    events = [ev("u1", n * 0.01, item=f"item-{n}") for n in range(1_500)] + \
        [ev("u1", 15 + n * 0.01, name=f"Custom {n}") for n in range(150)] + [ev("u2", 999)]
    closed, _, _, _ = run(events)
    (session,) = [s for s in closed if s["visitor"] == "u1"]
    assert session["items"] == [f"item-{n}" for n in range(1_000)]
    assert len(session["counts"]) == 101 and session["counts"]["(other)"] == 51
    assert sum(session["counts"].values()) == session["event_count"] == 1_650


def test_max_duration_starts_a_new_session():
    cfg = SessionConfig(gap_ms=30 * MIN, grace_ms=0, max_ms=60 * MIN)
    events = [ev("u1", m) for m in range(0, 100, 20)] + [ev("u2", 500)]
    closed, _, _, _ = run(events, cfg)
    # 0, 20, 40 fit in an hour; 60 would make it 60 min long: new session 60, 80.
    assert spans(closed) == [("u1", 0, 40, 3), ("u1", 60, 80, 2)]


def test_bridging_merge_that_would_exceed_max_joins_the_earlier_session():
    cfg = SessionConfig(gap_ms=30 * MIN, grace_ms=30 * MIN, max_ms=40 * MIN)
    closed, _, _, _ = run([ev("u1", 0), ev("u1", 45), ev("u1", 25), ev("u2", 500)], cfg)
    assert spans(closed) == [("u1", 0, 25, 2), ("u1", 45, 45, 1)]


def test_identity_change_starts_a_new_session():
    # An anonymous visitor logs in (a user_id appears with the same anonymous id):
    # the visitor key changes, so the logged-in events are a session of their own.
    events = [ev("a1", 0), ev("a1", 1), ev("a1", 2, user="alice"), ev("a1", 3, user="alice"),
              ev("u9", 200)]
    closed, _, _, _ = run(events)
    assert [(s["visitor"], s["user_id"], s["anonymous_id"], s["event_count"]) for s in closed] == \
        [("a1", None, "a1", 2), ("alice", "alice", "a1", 2)]


def test_session_index_and_previous_session_id_chain_per_visitor():
    closed, _, _, _ = run([ev("u1", 0), ev("u1", 60), ev("u1", 120), ev("u2", 300)])
    assert [s["session_index"] for s in closed] == [1, 2, 3]
    assert closed[0]["previous_session_id"] is None
    assert [s["previous_session_id"] for s in closed[1:]] == [s["session_id"] for s in closed[:2]]


def test_summary_fields():
    events = [
        ev("u1", 1, kind="page", name=None, url="https://shop.example/home?utm_source=news&utm_medium=email",
           path="/home", referrer="https://google.com/", device="mobile"),
        ev("u1", 2, name="Products Searched"),
        ev("u1", 3, name="Product Viewed", path="/p/7", item="7", device="desktop"),
        ev("u1", 4, name="Product Viewed", path="/p/8", item="8"),
        ev("u1", 5, name="Product Clicked", path="/p/7?x=1", item="7"),
        ev("u9", 99),
    ]
    (s,), _, _, _ = run(events)
    assert s["counts"] == {"page": 1, "Products Searched": 1, "Product Viewed": 2, "Product Clicked": 1}
    assert (s["page_views"], s["searches"], s["items"]) == (1, 1, ["7", "8"])
    assert (s["landing_page"], s["exit_page"], s["referrer"]) == ("/home", "/p/7", "https://google.com/")
    assert (s["utm"], s["device"]) == ({"source": "news", "medium": "email"}, "mobile")
    assert (s["duration_ms"], s["user_id"], s["session_index"]) == (4 * MIN, "u1", 1)
    assert s["session_id"] == session_id("u1", 1 * MIN, events[0]["message_id"])
    fastjsonschema.compile(json_schema("sessions"))(s)


@pytest.mark.parametrize("context,utm", [
    ({"campaign": {"source": "g", "medium": "cpc", "name": "w"}}, {"source": "g", "medium": "cpc", "campaign": "w"}),
    ({"page": {"url": "https://x/?utm_source=a&utm_campaign=b"}}, {"source": "a", "campaign": "b"}),
    ({"page": {"search": "?utm_term=shoes"}}, {"term": "shoes"}),
    ({"page": {"url": "https://x/?q=1"}}, {}),
    ({}, {}),
])
def test_utm(context, utm):
    assert utm_of(context) == utm


def test_landing_page_is_the_earliest_event_even_when_it_arrives_last():
    events = [ev("u1", 5, path="/later"), ev("u1", 1, path="/first", referrer="r"), ev("u2", 99)]
    (s,), _, _, _ = run(events)
    assert (s["landing_page"], s["exit_page"], s["referrer"]) == ("/first", "/later", "r")


def test_merged_session_equals_the_session_of_the_same_events_in_order():
    bridged, _, _, _ = run([ev("u1", 0, path="/a", item="1"), ev("u1", 35, path="/c", item="3"),
                            ev("u1", 20, path="/b", item="2"), ev("u2", 300)])
    ordered, _, _, _ = run([ev("u1", 0, path="/a", item="1"), ev("u1", 20, path="/b", item="2"),
                            ev("u1", 35, path="/c", item="3"), ev("u2", 300)])
    assert bridged == ordered


def test_session_id_is_deterministic_and_order_independent():
    a, _, _, _ = run([ev("u1", 0), ev("u1", 3), ev("u2", 99)])
    b, _, _, _ = run([ev("u1", 3), ev("u1", 0), ev("u2", 99)])
    c, _, _, _ = run([ev("u1", 1), ev("u1", 3), ev("u2", 99)])
    assert a[0]["session_id"] == b[0]["session_id"] != c[0]["session_id"]


def test_state_round_trip_resumes_identically():
    """What the changelog stores (JSON) is enough to resume after a crash."""
    _, _, _, part = run([ev("u1", 0), ev("u1", 4), ev("a2", 25), ev("u1", 60)])
    restored = PartitionSessions(CFG, **part.meta())
    for visitor, state in part.take_dirty():
        restored.load(visitor.decode(), state)
    tail = [ev("u1", 66), ev("u3", 200)]
    expected = part.process(tail, 10).closed
    assert restored.process(tail, 10).closed == expected
    assert [(s["visitor"], s["session_index"]) for s in expected] == [("a2", 1), ("u1", 2)]
    assert restored.next_offset == 10


# What reaches the core is a record's bytes: envelope problems are the record's,
# field problems the event's.
@pytest.mark.parametrize("record,reason", [
    (b'{"v":1,"events":[{"message_id":"m"', "not JSON"),
    (b'{"v":1,"events":[]} trailing', "not JSON"),
    (b"[1, 2]", "not a ClickBatch"),
    (b'{"v":1}', "not a ClickBatch"),
    (b'{"v":1,"events":{"a":1}}', "not a ClickBatch"),
])
def test_a_record_that_is_not_a_click_batch_is_refused_whole(record, reason):
    part = PartitionSessions(CFG)
    with pytest.raises(BadRecord, match=reason):
        part.process_record(record, 1)
    assert (part.visitors, part.next_offset) == ([], 0)


def test_a_record_cut_short_applies_none_of_its_events():
    whole = orjson.dumps({"v": 1, "events": [ev("u1", 0), ev("u1", 1)]})
    part = PartitionSessions(CFG)
    with pytest.raises(BadRecord):
        part.process_record(whole[:-30], 1)
    assert part.visitors == [] and part.watermark == -1


@pytest.mark.parametrize("event,reason", [
    ([1, 2], "event is not a JSON object"),
    ({**ev("u1", 0), "timestamp": 1.5}, "integer timestamp"),
    ({**ev("u1", 0), "timestamp": True}, "integer timestamp"),
    ({**ev("u1", 0), "message_id": ""}, "message_id"),
    ({**ev("u1", 0), "type": 3}, "a type"),
    ({**ev("a1", 0), "anonymous_id": None}, "user_id/anonymous_id"),
])
def test_a_bad_event_is_handed_back_alone_with_the_reason(event, reason):
    out = PartitionSessions(CFG).process([event, ev("u2", 0)], 1)
    assert out.events == 2 and len(out.bad) == 1
    (bad, why), = out.bad
    # the same reason the features processor's check (streams/codec.py) gives
    assert bad == event and reason in why and why == event_problem(event)


def test_fields_of_an_unexpected_type_read_as_absent():
    odd = ev("u1", 0, path="/p", device="mobile")
    odd["context"]["page"]["referrer"] = 42
    odd["context"]["ua"]["device"] = ["x"]
    odd["properties"] = "not an object"
    (s,), _, _, _ = run([odd, ev("u2", 99)])
    assert (s["referrer"], s["device"], s["landing_page"]) == (None, "other", "/p")


@pytest.mark.parametrize("item,expected", [
    ("7", ["7"]), (7, ["7"]), (7.5, ["7.5"]), (0, []), ("", []),
])
def test_item_ids_read_as_python_str_of_the_value(item, expected):
    event = ev("u1", 0)
    event["properties"] = {"item_id": item}
    (s,), _, _, _ = run([event, ev("u2", 99)])
    assert s["items"] == expected


def test_a_late_or_bad_event_comes_back_exactly_as_sent():
    sent = {**ev("u1", 0), "extra": {"nested": [1, "é", None]}, "context": {"weird": "\u2028"}}
    part = PartitionSessions(CFG)
    part.process([ev("u2", 500)], 1)
    (late, reason), = part.process([sent], 2).late
    assert late == sent and "watermark" in reason


@pytest.mark.parametrize("context,utm", [
    ({"page": {"url": "https://x/?utm_source=a%2Bb+c&utm_medium=%E2%82%AC"}}, {"source": "a+b c", "medium": "€"}),
    ({"page": {"url": "https://x/?utm_source=a&utm_source=b#utm_term=no"}}, {"source": "b"}),
    ({"page": {"url": "https://x/?utm_source=a&utm_source=&utm_medium"}}, {"source": "a"}),
    ({"campaign": {"source": 5, "medium": True, "name": "", "campaign": "c"}},
     {"source": "5", "medium": "True", "campaign": "c"}),
    ({"campaign": {"other": 1}, "page": {"url": "https://x/?utm_source=a"}}, {}),
])
def test_utm_edge_cases_follow_parse_qsl(context, utm):
    assert utm_of(context) == utm


# Retention: a visitor with no open session whose last session ended `retention`
# or more before the watermark is forgotten (100 min here, so cases stay short).
RET = SessionConfig(gap_ms=30 * MIN, grace_ms=10 * MIN, max_ms=24 * 60 * MIN, retention_ms=100 * MIN)


def at(visitor: str, ms: int) -> dict:
    """An event of `visitor` at `ms` (exact milliseconds, no float minutes)."""
    return {**ev(visitor, 0, mid=f"{visitor}@{ms}"), "timestamp": ms, "received_at": ms}


def indices(closed):
    """Closed sessions by start, then visitor (one pass closes sessions in expiry order)."""
    return sorted(((s["visitor"], s["start"], s["session_index"], s["previous_session_id"] is not None)
                   for s in closed), key=lambda c: (c[1], c[0]))


# (reason, events as (visitor, ms), closed as (visitor, start, index, has previous id), held at the end)
RETENTION_CASES = [
    ("the watermark at last end + retention forgets the visitor",
     [("u1", 0), ("u2", 100 * MIN)], [("u1", 0, 1, False)], {"u2"}),
    ("one ms before, it is kept",
     [("u1", 0), ("u2", 100 * MIN - 1)], [("u1", 0, 1, False)], {"u1", "u2"}),
    ("forgotten, it comes back as a new visitor: index 1, no previous id",
     [("u1", 0), ("u2", 100 * MIN), ("u1", 120 * MIN), ("u3", 300 * MIN)],
     [("u1", 0, 1, False), ("u2", 100 * MIN, 1, False), ("u1", 120 * MIN, 1, False)], {"u3"}),
    ("back within retention, its index continues",
     [("u1", 0), ("u2", 99 * MIN), ("u1", 99 * MIN), ("u3", 140 * MIN)],
     [("u1", 0, 1, False), ("u1", 99 * MIN, 2, True), ("u2", 99 * MIN, 1, False)], {"u1", "u2", "u3"}),
    ("an open session keeps a visitor whose previous session ended long ago",
     [("u1", 0), ("u1", 60 * MIN), ("u1", 85 * MIN), ("u1", 110 * MIN), ("u1", 135 * MIN)],
     [("u1", 0, 1, False)], {"u1"}),
    ("the clock restarts at the end of the last session, not the first",
     [("u1", 0), ("u1", 50 * MIN), ("u2", 100 * MIN), ("u3", 150 * MIN - 1)],
     [("u1", 0, 1, False), ("u1", 50 * MIN, 2, True), ("u2", 100 * MIN, 1, False)],
     {"u1", "u2", "u3"}),
    ("... and it is forgotten exactly then",
     [("u1", 0), ("u1", 50 * MIN), ("u2", 100 * MIN), ("u3", 150 * MIN)],
     [("u1", 0, 1, False), ("u1", 50 * MIN, 2, True), ("u2", 100 * MIN, 1, False)], {"u2", "u3"}),
    ("open when its time came (100): kept, then forgotten at its new end (90) + retention ...",
     [("u1", 0), ("u2", 60 * MIN), ("u1", 90 * MIN), ("u3", 100 * MIN), ("u4", 130 * MIN),
      ("u5", 190 * MIN - 1)],
     [("u1", 0, 1, False), ("u2", 60 * MIN, 1, False), ("u1", 90 * MIN, 2, True),
      ("u3", 100 * MIN, 1, False), ("u4", 130 * MIN, 1, False)], {"u1", "u3", "u4", "u5"}),
    ("... exactly then (u2, idle since 60, went at 160)",
     [("u1", 0), ("u2", 60 * MIN), ("u1", 90 * MIN), ("u3", 100 * MIN), ("u4", 130 * MIN),
      ("u5", 190 * MIN - 1), ("u6", 190 * MIN)],
     [("u1", 0, 1, False), ("u2", 60 * MIN, 1, False), ("u1", 90 * MIN, 2, True),
      ("u3", 100 * MIN, 1, False), ("u4", 130 * MIN, 1, False)], {"u3", "u4", "u5", "u6"}),
]


@pytest.mark.parametrize("reason,events,expected,held", RETENTION_CASES,
                         ids=[c[0] for c in RETENTION_CASES])
def test_retention_rules(reason, events, expected, held):
    closed, _, _, part = run([at(v, ms) for v, ms in events], RET)
    assert indices(closed) == expected, reason
    assert set(part.visitors) == held and part.visitor_count == len(held), reason


def test_retention_forgets_at_the_exact_watermark_step_by_step():
    part = PartitionSessions(RET)
    part.process([at("u1", 0)], 1)
    for ms, held in [(40 * MIN, True), (100 * MIN - 1, True), (100 * MIN, False)]:
        part.process([at("u2", ms)], 2)
        assert ("u1" in part.visitors) is held, ms


def test_retention_zero_never_forgets():
    cfg = SessionConfig(gap_ms=30 * MIN, grace_ms=10 * MIN, max_ms=24 * 60 * MIN, retention_ms=0)
    year = 365 * 24 * 60 * MIN
    closed, _, _, part = run([at("u1", 0), at("u2", year), at("u1", 2 * year), at("u3", 3 * year)], cfg)
    assert [(s["visitor"], s["session_index"]) for s in closed] == [("u1", 1), ("u2", 1), ("u1", 2)]
    assert set(part.visitors) == {"u1", "u2", "u3"}


def test_the_default_retention_is_thirty_days():
    day = 24 * 60 * MIN
    closed, _, _, part = run([at("u1", 0), at("u2", 30 * day - 1), at("u1", 30 * day),
                              at("u3", 31 * day)], CFG)
    assert CFG.retention_ms == 30 * day
    assert [(s["visitor"], s["session_index"]) for s in closed] == [("u1", 1), ("u2", 1), ("u1", 2)]
    closed, _, _, _ = run([at("u1", 0), at("u2", 30 * day), at("u1", 30 * day + 1),
                           at("u3", 31 * day)], CFG)
    assert [(s["visitor"], s["session_index"]) for s in closed] == [("u1", 1), ("u2", 1), ("u1", 1)]


def test_a_forgotten_visitor_is_a_tombstone_in_take_dirty():
    part = PartitionSessions(RET)
    part.process([at("u1", 0), at("u2", 50 * MIN)], 1)
    assert {v for v, _ in part.take_dirty()} == {b"u1", b"u2"}      # u1 closed, u2 open
    part.process([at("u2", 100 * MIN)], 2)                           # u1 due, u2's first closes
    entries = part.take_dirty()
    assert sorted(v for v, _ in entries) == [b"u1", b"u2"]
    assert dict(entries)[b"u1"] is None and orjson.loads(dict(entries)[b"u2"])["closed_count"] == 1
    assert part.take_dirty() == []


def test_forgotten_and_back_before_the_checkpoint_is_written_once_with_its_new_state():
    part = PartitionSessions(RET)
    part.process([at("u1", 0)], 1)
    part.take_dirty()
    part.process([at("u2", 100 * MIN)], 2)          # u1 forgotten
    part.process([at("u1", 110 * MIN)], 3)          # and back
    entries = [(v, s) for v, s in part.take_dirty() if v == b"u1"]
    assert len(entries) == 1
    state = orjson.loads(entries[0][1])
    assert (state["closed_count"], state["last_session_id"], len(state["open"])) == (0, None, 1)


def by_session_id(session: dict) -> str:
    return session["session_id"]


def changelog_of(part: PartitionSessions, log: dict | None = None) -> dict:
    """What a compacted changelog holds after `take_dirty`: tombstones delete."""
    log = {} if log is None else log
    for visitor, state in part.take_dirty():
        if state is None:
            log.pop(visitor, None)
        else:
            log[visitor] = state
    return log


def restored(cfg: SessionConfig, part: PartitionSessions, log: dict) -> PartitionSessions:
    back = PartitionSessions(cfg, **part.meta())
    for visitor, state in log.items():
        back.load(visitor.decode(), state)
    return back


def test_a_state_written_before_retention_existed_is_not_forgotten_at_once():
    """The old changelog lacks `last_end`: the watermark at load stands for it."""
    never = dataclasses.replace(RET, retention_ms=0)            # as the old code kept everyone
    part = PartitionSessions(never)
    part.process([at("u1", 0), at("u2", 1000 * MIN)], 1)       # u1 closed long ago, u2 open
    log = changelog_of(part)
    old = orjson.loads(log[b"u1"])
    assert old.pop("last_end") == 0
    log[b"u1"] = orjson.dumps(old)
    back = restored(RET, part, log)
    back.process([at("u3", 1100 * MIN - 1)], 2)
    assert "u1" in back.visitors                                # not at once, nor before load + retention
    upgraded = changelog_of(back)
    assert orjson.loads(upgraded[b"u1"])["last_end"] == 1000 * MIN    # written back once
    back.process([at("u3", 1100 * MIN)], 3)
    assert "u1" not in back.visitors
    assert (b"u1", None) in back.take_dirty()


def test_with_retention_0_an_old_state_is_not_rewritten():
    never = dataclasses.replace(RET, retention_ms=0)
    part = PartitionSessions(never)
    part.process([at("u1", 0), at("u2", 1000 * MIN)], 1)
    log = changelog_of(part)
    log[b"u1"] = orjson.dumps({k: v for k, v in orjson.loads(log[b"u1"]).items() if k != "last_end"})
    assert restored(never, part, log).take_dirty() == []
    assert [v for v, _ in restored(RET, part, log).take_dirty()] == [b"u1"]


def test_a_restored_visitor_is_forgotten_when_its_own_time_comes():
    part = PartitionSessions(RET)
    part.process([at("u1", 0), at("u2", 60 * MIN)], 1)
    back = restored(RET, part, changelog_of(part))
    for p in (part, back):
        p.process([at("u3", 100 * MIN - 1)], 2)
        assert "u1" in p.visitors
        p.process([at("u3", 100 * MIN)], 3)
        assert "u1" not in p.visitors


def traffic(seed: int, n: int = 3000) -> list[dict]:
    """Visitors coming back after short and long absences, a little out of order."""
    rng = random.Random(seed)
    events, clock = [], 0
    for i in range(n):
        clock += rng.choice([0, 1, 2, 5, 30]) * MIN // 4
        ts = max(0, clock - rng.randrange(0, 5 * MIN))
        events.append({**at(f"u{rng.randrange(40)}", ts), "message_id": f"m{i}"})
    return events


def comebacks(closed: list[dict]) -> int:
    """Sessions that start a visitor's count again (index 1 after an earlier session)."""
    seen: set[str] = set()
    count = 0
    for s in sorted(closed, key=lambda s: s["start"]):
        count += s["visitor"] in seen and s["session_index"] == 1
        seen.add(s["visitor"])
    return count


def test_replay_forgets_the_same_visitors_and_yields_the_same_sessions():
    events = traffic(7)
    first, _, _, a = run(events, RET)
    again, _, _, b = run(events, RET)
    assert first == again and sorted(a.visitors) == sorted(b.visitors)
    assert comebacks(first) > 0, "some visitor came back forgotten"
    assert len(a.visitors) < 40, "idle visitors were forgotten"


def test_restoring_midway_from_the_changelog_changes_nothing():
    events = traffic(8)
    whole, _, _, _ = run(events, RET)
    part, closed = PartitionSessions(RET), []
    log: dict = {}
    for offset, event in enumerate(events):
        closed += part.process([event], offset + 1).closed
        if offset % 500 == 499:        # a checkpoint, then a crash and a restore
            part = restored(RET, part, changelog_of(part, log))
    # the same sessions; within one pass their order follows the expiry heap's history
    assert sorted(closed, key=by_session_id) == sorted(whole, key=by_session_id)
    assert comebacks(whole) > 0


def packed(events: list[dict], cfg: SessionConfig, per_record: int) -> list[dict]:
    """Closed sessions of `events` fed `per_record` to a record, by session id (one
    pass closes sessions in expiry order, so the order follows the packing)."""
    part, closed = PartitionSessions(cfg), []
    for i in range(0, len(events), per_record):
        closed += part.process(events[i:i + per_record], i + 1).closed
    return sorted(closed, key=by_session_id)


def disordered(seed: int, n: int = 2000) -> list[dict]:
    """Traffic up to 35 minutes out of order (within gap + grace, so rarely late): events
    that arrive after their session is due to close, before the pass that closes it."""
    rng = random.Random(seed)
    events, clock = [], 0
    for i in range(n):
        clock += rng.choice([0, 1, 2, 5, 30, 60]) * MIN // 4
        ts = max(0, clock - rng.randrange(0, 35 * MIN))
        events.append({**at(f"u{rng.randrange(30)}", ts), "message_id": f"m{i}"})
    return events


@pytest.mark.parametrize("per_record", [2, 7, 100])
@pytest.mark.parametrize("seed", range(4))
def test_sessions_do_not_depend_on_how_events_are_packed_into_records(per_record, seed):
    """A session the watermark has passed by gap + grace is closed when an event of its
    visitor comes, whether or not a pass ran since (one runs after each record): the same
    sessions for any packing, as a replay that packs events differently must get. (Before,
    such an event joined the due session when both were in one record.)"""
    events = disordered(seed)
    assert packed(events, CFG, per_record) == packed(events, CFG, 1)


@pytest.mark.parametrize("per_record", [2, 7, 100])
def test_forgetting_does_not_depend_on_how_events_are_packed_into_records(per_record):
    """A visitor due to be forgotten at the watermark before its event starts afresh
    whether the pass came between two records or not: a record spanning more than the
    retention (100 events here, ~3 h) forgets as records of one event do."""
    for events in (traffic(9), disordered(9)):
        assert packed(events, RET, per_record) == packed(events, RET, 1)
