"""Archived rows back to records (streams.archive_records): the inverse of archive_table.

The round trips write records through the archive's own Columns (what the worker
does) and read them back; collector events are made by the collector's own
mapping (`to_click`), so the absent-vs-null rule is checked against its output.
"""
from __future__ import annotations

import orjson
import pyarrow as pa
import pytest

from schemas.archive import CLICKS, SESSIONS
from schemas.clicks import visitor_key
from services.collector.ingest import to_click
from streams.archive_layout import Selection
from streams.archive_records import Tally, in_order, rows_json, select, tally, to_records, visitors
from streams.archive_table import Columns

T = 1_795_528_800_000   # 2026-11-24T14:00Z
TRICKY = ['say "hi"', "back\\slash", "tab\there\nnew line\r", "\x00\x01\x1f bell\x07", "\x7f del",
          "é ü 中文", "emoji 😀", "</script>", "\u2028\u2029", "", "json {\"a\": [1]}"]


def raw(kind: str, i: int, **kw) -> dict:
    """A Segment event as a client sends it."""
    event = {"type": kind, "messageId": f"m{i}", "anonymousId": f"anon-{i % 3}",
             "timestamp": "2026-11-24T14:00:00.000Z", "context": {"page": {"path": f"/p/{i}"}},
             "properties": {"price": 9.5, "n": [1, None]}}
    return {**event, **kw}


COLLECTED = [
    to_click(raw("page", 0), T),                                          # "name": null
    to_click(raw("page", 1, name="Home"), T),
    to_click(raw("screen", 2), T),
    to_click(raw("track", 3, event="Product Viewed", userId="dana"), T),   # no "name" key
    to_click(raw("track", 4, event="Clicked", sentAt="2026-11-24T14:00:01Z",
                 originalTimestamp="2026-11-24T13:59:59Z"), T),
    to_click(raw("identify", 5, userId="dana", traits={"plan": "pro", "age": None}), T),
    to_click(raw("alias", 6, userId="dana", previousId="anon-6"), T),
    to_click(raw("group", 7, groupId="acme", traits={"size": 10}), T),
    to_click(raw("track", 8, event="Odd", surprise={"x": 1}, writeKeyless=True), T),  # extra
    *(to_click(raw("track", 20 + i, event=text or "E", userId=text or "u", properties={"q": text}), T)
      for i, text in enumerate(TRICKY)),
]


def archived(spec, records: list[tuple[int, list[dict]]], partition: int = 0) -> pa.Table:
    """The table the archive worker writes for these (offset, rows) records."""
    columns = Columns(spec, partition)
    for offset, rows in records:
        assert columns.add(rows, offset, T + offset) == []
    table, bad = columns.to_table()
    assert bad == []
    return table


def envelope(events: list[dict]) -> bytes:
    return orjson.dumps({"v": 1, "events": events})


def test_collector_envelopes_come_back_byte_for_byte_with_their_keys():
    same_visitor = [to_click(raw("track", 100 + i, event="E", userId="zoe"), T) for i in range(3)]
    records = [(0, COLLECTED[:4]), (1, COLLECTED[4:9]), (5, COLLECTED[9:]), (6, same_visitor)]
    got = to_records(CLICKS, archived(CLICKS, records, partition=2))
    assert got.partition == 2 and got.offsets == [0, 1, 5, 6]
    assert got.values == [envelope(events) for _, events in records]
    assert got.keys == [None, None, None, b"zoe"]
    assert got.events == len(COLLECTED) + 3


@pytest.mark.parametrize("event,keys,why", [
    (COLLECTED[0], {"name": None}, "an unnamed page keeps name: null"),
    (COLLECTED[3], {"event": "Product Viewed"}, "a track event has no name key"),
    (COLLECTED[0], {"sent_at": None, "original_timestamp": T}, "times the collector always writes"),
    (COLLECTED[5], {"traits": {"plan": "pro", "age": None}}, "traits when sent, nulls inside kept"),
    (COLLECTED[6], {"previous_id": "anon-6"}, "alias carries previous_id"),
    (COLLECTED[8], {"extra": {"surprise": {"x": 1}, "writeKeyless": True}}, "unknown fields in extra"),
])
def test_absent_and_null_follow_the_collector(event, keys, why):
    (value,) = to_records(CLICKS, archived(CLICKS, [(0, [event])])).values
    back = orjson.loads(value)["events"][0]
    assert back == event and list(back) == list(event), why
    assert {k: back[k] for k in keys} == keys, why
    absent = {"traits", "extra", "previous_id", "group_id"} - set(event)
    assert not absent & set(back), why


def test_a_null_of_a_key_outside_the_rule_is_left_out():
    """The archive cannot tell `"traits": null` from no traits: it comes back absent."""
    event = dict(COLLECTED[3], traits=None, group_id=None)
    (value,) = to_records(CLICKS, archived(CLICKS, [(0, [event])])).values
    assert orjson.loads(value)["events"][0] == COLLECTED[3]


@pytest.mark.parametrize("text", TRICKY)
def test_strings_are_escaped_as_orjson_escapes_them(text):
    event = dict(COLLECTED[3], message_id=text, user_id=text, event=text)
    (value,) = to_records(CLICKS, archived(CLICKS, [(0, [event])])).values
    assert value == envelope([event])


def session(i: int, **kw) -> dict:
    return {"v": 1, "session_id": f"s{i}", "visitor": f"u{i}", "user_id": None,
            "anonymous_id": f"u{i}", "start": T, "end": T + 60_000, "duration_ms": 60_000,
            "event_count": 3, "counts": {"page": 2, "Product Viewed": 1}, "page_views": 2,
            "searches": 0, "landing_page": "/", "exit_page": None, "referrer": None,
            "utm": {}, "device": "mobile", "items": ["item-1", "item-\"2\""],
            "session_index": i, "previous_session_id": None, **kw}


def test_sessions_come_back_one_record_per_row_keyed_by_visitor():
    rows = [session(1), session(2, utm={"source": "news"}, items=[], referrer="https://x/")]
    got = to_records(SESSIONS, archived(SESSIONS, [(3, rows[:1]), (4, rows[1:])], partition=1))
    assert [orjson.loads(v) for v in got.values] == rows     # every key, nulls included
    assert got.keys == [b"u1", b"u2"] and got.offsets == [3, 4] and got.events == 2


def test_visitors_are_the_visitor_key_of_each_event():
    table = archived(CLICKS, [(0, COLLECTED)])
    assert visitors(table).to_pylist() == [visitor_key(e) for e in COLLECTED]


def click(i: int, ts: int) -> dict:
    return dict(COLLECTED[3], message_id=f"c{i}", timestamp=ts, original_timestamp=ts)


def test_an_envelope_split_over_hour_files_is_merged_in_event_order():
    events = [click(0, T - 1), click(1, T), click(2, T - 2), click(3, T + 5)]
    table = archived(CLICKS, [(7, events), (8, [click(4, T - 3)])])
    hour = pa.compute.greater_equal(table["timestamp"].cast(pa.int64()), T)
    files = [table.filter(hour), table.filter(pa.compute.invert(hour))]   # later hour first
    got = to_records(CLICKS, in_order(CLICKS, files))
    assert got.values == [envelope(events), envelope([click(4, T - 3)])]


@pytest.mark.parametrize("selection,expected,why", [
    (Selection("timestamp"), [(5, 0), (5, 1), (6, 0), (9, 0)], "everything"),
    (Selection("timestamp", from_offset=6, to_offset=9), [(6, 0)], "offsets are half-open"),
    (Selection("timestamp", from_ms=T, to_ms=T + 10), [(5, 1), (6, 0)], "event time, half-open"),
    (Selection("_timestamp", from_ms=T + 6), [(6, 0), (9, 0)], "record time"),
    (Selection("original_timestamp", to_ms=T + 6), [(5, 0), (5, 1)],
     "a null time falls back to the record time, as the hour folders do"),
    (Selection("timestamp", partitions=frozenset({1})), [], "another partition"),
])
def test_select_rows(selection, expected, why):
    events = [dict(click(0, T - 1), original_timestamp=None), dict(click(1, T), original_timestamp=None),
              click(2, T + 9), click(3, T + 10)]
    table = archived(CLICKS, [(5, events[:2]), (6, events[2:3]), (9, events[3:])])
    got = select(table, selection)
    assert list(zip(got["_offset"].to_pylist(), got["_index"].to_pylist())) == expected, why


def test_an_envelope_cut_by_a_time_range_keeps_its_selected_events_and_gets_the_key_rule():
    events = [dict(click(0, T), user_id="ann"), dict(click(1, T + 1), user_id="bob")]
    table = select(archived(CLICKS, [(0, events)]), Selection("timestamp", from_ms=T + 1))
    got = to_records(CLICKS, table)
    assert got.values == [envelope(events[1:])] and got.keys == [b"bob"]


def test_tally_and_an_empty_selection():
    table = archived(CLICKS, [(5, [click(0, T), click(1, T)]), (9, [click(2, T)])])
    assert tally(table) == Tally(2, 3, 5, 9)
    assert tally(table) + Tally(0, 0, -1, -1) == Tally(2, 3, 5, 9)
    assert Tally(1, 4, 20, 20) + tally(table) == Tally(3, 7, 5, 20)
    empty = select(table, Selection("timestamp", from_offset=100))
    assert tally(empty) == Tally(0, 0, -1, -1) and len(to_records(CLICKS, empty)) == 0


def test_rows_json_needs_an_always_written_first_field():
    spec = CLICKS.__class__(**{**CLICKS.__dict__, "null_keys": frozenset()})
    with pytest.raises(ValueError, match="must always be written"):
        rows_json(spec, archived(CLICKS, [(0, [click(0, T)])]))
