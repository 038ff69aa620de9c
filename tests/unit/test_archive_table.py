"""Records to Arrow tables: the archive schemas, bad rows, hour splits."""
from __future__ import annotations

import typing

import orjson
import pyarrow as pa
import pytest

from schemas.archive import CLICKS, SESSIONS, TIMESTAMP
from schemas.clicks import ClickEvent
from schemas.sessions import Session
from streams.archive_table import Columns, check_time_field, split_by_hour

H = 3_600_000
T = 1_795_528_800_000   # 2026-11-24T14:00Z


@pytest.mark.parametrize("spec,record", [(CLICKS, ClickEvent), (SESSIONS, Session)])
def test_archive_schema_names_the_record_fields(spec, record):
    assert set(spec.fields) == set(typing.get_type_hints(record))
    assert spec.schema.field(spec.event_time).type == TIMESTAMP


def click(i: int, **kw) -> dict:
    return {"message_id": f"m{i}", "type": "track", "event": "Viewed", "user_id": "u",
            "anonymous_id": None, "timestamp": T + i * 20 * 60_000, "received_at": T,
            "context": {"page": {"path": "/"}}, "properties": {"price": 1.5, "n": [1, {"a": None}]},
            **kw}


def test_rows_become_typed_columns_with_their_position():
    cols = Columns(CLICKS, partition=3)
    assert cols.add([click(0), click(1)], offset=7, record_ms=T + 5) == []
    assert cols.add([click(2)], offset=9, record_ms=T + 6) == []
    table, bad = cols.to_table()
    assert bad == [] and table.schema == CLICKS.schema
    rows = table.to_pylist()
    assert [(r["_partition"], r["_offset"], r["_index"]) for r in rows] == [(3, 7, 0), (3, 7, 1), (3, 9, 0)]
    assert table["timestamp"].cast(pa.int64()).to_pylist() == [T, T + 20 * 60_000, T + 40 * 60_000]
    assert orjson.loads(rows[0]["properties"]) == click(0)["properties"]
    assert rows[0]["traits"] is None and rows[0]["name"] is None


@pytest.mark.parametrize("row,reason", [
    ("not an object", "not a JSON object"),
    (click(1, surprise=1), "field(s) not in the archive schema: surprise"),
])
def test_rows_of_the_wrong_shape_are_left_out_at_once(row, reason):
    cols = Columns(CLICKS, partition=0)
    bad = cols.add([click(0), row, click(2)], offset=4, record_ms=T)
    assert [(o, i, r) for o, i, r, _ in bad] == [(4, 1, reason)]
    assert orjson.loads(bad[0][3]) == row
    table, later = cols.to_table()
    assert later == [] and table["_index"].to_pylist() == [0, 2]


@pytest.mark.parametrize("field,value", [("user_id", 42), ("timestamp", "yesterday"),
                                         ("timestamp", True), ("type", {"a": 1})])
def test_values_of_the_wrong_type_are_left_out_at_flush(field, value):
    cols = Columns(CLICKS, partition=0)
    cols.add([click(0), click(1, **{field: value}), click(2)], offset=0, record_ms=T)
    table, bad = cols.to_table()
    assert [(o, i) for o, i, _, _ in bad] == [(0, 1)] and f"field {field!r}" in bad[0][2]
    assert orjson.loads(bad[0][3])[field] == value
    assert table["message_id"].to_pylist() == ["m0", "m2"]


def test_sessions_maps_and_lists_are_typed():
    s = {"v": 1, "session_id": "s", "visitor": "u", "user_id": "u", "anonymous_id": None,
         "start": T, "end": T + 1, "duration_ms": 1, "event_count": 2, "counts": {"page": 2},
         "page_views": 2, "searches": 0, "landing_page": "/", "exit_page": "/", "referrer": None,
         "utm": {}, "device": "desktop", "items": ["i1", "i2"], "session_index": 1,
         "previous_session_id": None}
    cols = Columns(SESSIONS, partition=1)
    cols.add([s], offset=5, record_ms=T)
    table, bad = cols.to_table()
    (row,) = table.to_pylist()
    assert bad == [] and "_index" not in table.column_names
    assert (row["counts"], row["utm"], row["items"], row["_offset"]) == ([("page", 2)], [], ["i1", "i2"], 5)


@pytest.mark.parametrize("times,expected,why", [
    ([T, T + 1, T + H - 1], [(0, 3)], "one hour: one file"),
    ([T, T + H, T + 1], [(0, 2), (1, 1)], "rows keep their order within an hour"),
    ([T + 2 * H, None, T], [(0, 2), (2, 1)], "no event time: the record time (T) places it"),
])
def test_split_by_hour(times, expected, why):
    cols = Columns(CLICKS, partition=0)
    cols.add([click(i, timestamp=t) for i, t in enumerate(times)], offset=0, record_ms=T)
    table, _ = cols.to_table()
    got = [(h - T // H, part.num_rows) for h, part in split_by_hour(table, "timestamp")]
    assert got == expected, why


def test_split_by_record_time():
    cols = Columns(CLICKS, partition=0)
    cols.add([click(0, timestamp=T + 5 * H)], offset=0, record_ms=T)
    table, _ = cols.to_table()
    assert [h for h, _ in split_by_hour(table, "_timestamp")] == [T // H]


@pytest.mark.parametrize("field,ok", [("timestamp", True), ("_timestamp", True), ("received_at", True),
                                      ("user_id", False), ("nope", False)])
def test_time_field_must_be_a_time_column(field, ok):
    if ok:
        check_time_field(CLICKS, field)
    else:
        with pytest.raises(ValueError, match="is not a time column"):
            check_time_field(CLICKS, field)
