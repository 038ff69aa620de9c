"""Session rules of streams.sessions, as tables of cases."""
from __future__ import annotations

import fastjsonschema
import orjson
import pytest

from schemas import json_schema
from streams.sessions import OpenSession, PartitionSessions

MIN = 60_000
GAP = 30 * MIN


def ev(visitor: str, minute: float, mid: str | None = None, kind: str = "track",
       name: str | None = "Product Viewed", path: str | None = None, item: str | None = None,
       referrer: str = "") -> dict:
    page = {"path": path, "referrer": referrer} if path else {}
    return {
        "message_id": mid or f"{visitor}-{minute}-{name}", "type": kind,
        "event": name if kind == "track" else None,
        "user_id": visitor if visitor.startswith("u") else None,
        "anonymous_id": visitor if visitor.startswith("a") else "anon-x",
        "timestamp": int(minute * MIN), "received_at": int(minute * MIN),
        "context": {"page": page} if page else {},
        "properties": {"item_id": item} if item else {},
    }


def run(events: list[dict]) -> tuple[list[dict], list[dict], PartitionSessions]:
    """Feed events one record each; return closed sessions, late events and the state."""
    part, closed, late = PartitionSessions(GAP), [], []
    for event in events:
        out = part.process([event])
        closed += out.closed
        late += out.late
    return closed, late, part


# (reason, events as (visitor, minute), expected closed sessions as (visitor, start, end, count))
CASES = [
    ("one event stays open until the watermark passes end + gap",
     [("u1", 0)], []),
    ("another visitor's later event closes an idle visitor's session",
     [("u1", 0), ("u1", 5), ("u2", 35)], [("u1", 0, 5, 2)]),
    ("a gap one ms short of 30 min keeps the session",
     [("u1", 0), ("u1", 30 - 1 / MIN), ("u2", 200)], [("u1", 0, 30 - 1 / MIN, 2)]),
    ("a gap of exactly 30 min starts a new session (half-open windows)",
     [("u1", 0), ("u1", 30)], [("u1", 0, 0, 1)]),
    ("out of order within the gap joins the open session and moves its start",
     [("u1", 10), ("u1", 2), ("u2", 100)], [("u1", 2, 10, 2)]),
    ("the watermark closes several idle visitors at once, in expiry order",
     [("u1", 0), ("a2", 3), ("u3", 60)], [("u1", 0, 0, 1), ("a2", 3, 3, 1)]),
    ("watermark exactly at end + gap closes",
     [("u1", 0), ("u2", 30)], [("u1", 0, 0, 1)]),
]


@pytest.mark.parametrize("reason,events,expected", CASES, ids=[c[0] for c in CASES])
def test_session_rules(reason, events, expected):
    closed, late, _ = run([ev(v, m) for v, m in events])
    assert [(s["visitor"], s["start"], s["end"], s["event_count"]) for s in closed] == \
        [(v, int(a * MIN), int(b * MIN), n) for v, a, b, n in expected], reason
    assert late == []


def test_duplicate_message_id_is_counted_once():
    closed, _, _ = run([ev("u1", 0, mid="m1"), ev("u1", 1, mid="m1"), ev("u2", 99)])
    assert closed[0]["event_count"] == 1


def test_event_older_than_a_closed_session_is_late_not_reopened():
    closed, late, part = run([ev("u1", 0), ev("u2", 100), ev("u1", 10)])
    assert [s["visitor"] for s in closed] == ["u1"]
    assert [e["timestamp"] for e in late] == [10 * MIN]
    assert "u1" not in part.open


def test_summary_fields():
    events = [
        ev("u1", 1, kind="page", name=None, path="/home", referrer="https://google.com/"),
        ev("u1", 2, name="Products Searched"),
        ev("u1", 3, name="Product Viewed", path="/p/7", item="7"),
        ev("u1", 4, name="Product Viewed", path="/p/8", item="8"),
        ev("u1", 5, name="Product Clicked", path="/p/7", item="7"),
        ev("u9", 99),
    ]
    (s,), _, _ = run(events)
    assert s["counts"] == {"page": 1, "Products Searched": 1, "Product Viewed": 2, "Product Clicked": 1}
    assert (s["page_views"], s["searches"], s["items"]) == (1, 1, ["7", "8"])
    assert (s["landing_page"], s["exit_page"], s["referrer"]) == ("/home", "/p/7", "https://google.com/")
    assert (s["duration_ms"], s["user_id"]) == (4 * MIN, "u1")
    fastjsonschema.compile(json_schema("sessions"))(s)


def test_landing_page_is_the_earliest_event_even_when_it_arrives_last():
    events = [ev("u1", 5, path="/later"), ev("u1", 1, path="/first", referrer="r"), ev("u2", 99)]
    (s,), _, _ = run(events)
    assert (s["landing_page"], s["exit_page"], s["referrer"]) == ("/first", "/later", "r")


def test_session_id_is_deterministic_and_order_independent():
    a, _, _ = run([ev("u1", 0), ev("u1", 3), ev("u2", 99)])
    b, _, _ = run([ev("u1", 3), ev("u1", 0), ev("u2", 99)])
    assert a[0]["session_id"] == b[0]["session_id"]
    c, _, _ = run([ev("u1", 1), ev("u1", 3), ev("u2", 99)])
    assert c[0]["session_id"] != a[0]["session_id"]


def test_state_round_trip_resumes_identically():
    """What the Faust table stores is enough to resume after a restart."""
    first, _, part = run([ev("u1", 0), ev("u1", 4), ev("a2", 2)])
    restored = PartitionSessions(GAP, {v: OpenSession.from_state(orjson.loads(orjson.dumps(s.to_state())))
                                       for v, s in part.open.items()}, part.watermark)
    tail = [ev("u1", 6), ev("u3", 80)]
    expected = part.process(tail).closed
    assert restored.process(tail).closed == expected
    assert {s["visitor"] for s in expected} == {"u1", "a2"}
