"""`clickloop cdc snapshot`'s pure part (services/cdc/snapshot.py): dumps become Debezium
`op=r` records that streams.debezium decodes, with positions that order a later
snapshot after an earlier one, so that folding a second, mostly identical snapshot
adds versions only for the rows that changed."""
from __future__ import annotations

import pytest

from services.cdc.snapshot import Source, SnapshotError, events, postgres_script, read_csv, read_jsonl
from streams.debezium import decode
from streams.history import TableHistory, resolve

T = 1_795_000_000_000


def fold(*batches):
    history, rows = TableHistory(), []
    for batch in batches:
        for key, value in batch:
            rows += history.apply(decode(key, value)).versions
    return resolve(rows)


def test_file_rows_become_reads_in_file_order():
    rows = [{"id": "1", "plan": "basic"}, {"id": "2", "plan": None}]
    decoded = [decode(k, v) for k, v in events(rows, Source("crm", "public", "subs", T), ["id"])]
    assert [(e.op, e.key, e.after, e.table, e.ts_ms) for e in decoded] == [
        ("r", {"id": "1"}, rows[0], "public.subs", T), ("r", {"id": "2"}, rows[1], "public.subs", T)]
    assert [e.position for e in decoded] == [(T, 0), (T, 1)], "snapshot time, then file order"


def test_postgres_rows_carry_the_lsn_as_debezium_snapshot_reads_do():
    source = Source("shop", "public", "subscriptions", T, lsn=23_898_144, tx_id=780)
    (event,) = [decode(k, v) for k, v in events([{"id": 1}], source, ["id"])]
    assert event.op == "r" and event.connector == "postgresql"
    assert event.position == (23_898_144, 23_898_144) and event.tx_id == "780"


@pytest.mark.parametrize("rows, key, reason", [
    ([{"id": 1}], [], "names no column"),
    ([{"id": 1}, {"plan": "x"}], ["id"], "row 2 has no key column id"),
])
def test_bad_dumps_are_refused_with_the_reason(rows, key, reason):
    with pytest.raises(SnapshotError, match=reason):
        list(events(rows, Source("s", "p", "t", T), key))


def test_composite_keys_keep_the_given_columns():
    (event,) = [decode(k, v) for k, v in events([{"a": 1, "b": "x", "c": 3}], Source("s", "p", "t", T),
                                               ["b", "a"])]
    assert event.key == {"b": "x", "a": 1} and event.key_id == '{"a":1,"b":"x"}'


def test_a_second_snapshot_adds_versions_only_for_changed_rows():
    first = events([{"id": "1", "s": "a"}, {"id": "2", "s": "a"}], Source("s", "p", "t", T), ["id"])
    later = events([{"id": "1", "s": "a"}, {"id": "2", "s": "b"}], Source("s", "p", "t", T + 1000),
                   ["id"])
    history = fold(list(first), list(later))
    assert [v["row"]["s"] for v in history["1"]] == ["a"]
    assert [(v["row"]["s"], v["valid_from"], v["valid_to"]) for v in history["2"]] == [
        ("a", T, T + 1000), ("b", T + 1000, None)]


def test_csv_with_header_and_null_marker(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('id,name,note\n1,"a, b",\\N\n2,,x\n\n')
    assert list(read_csv(path)) == [{"id": "1", "name": "a, b", "note": None},
                                    {"id": "2", "name": "", "note": "x"}]
    path.write_text("id,name\n1\n")
    with pytest.raises(SnapshotError, match="1 cells for 2 columns"):
        list(read_csv(path))


def test_jsonl_rows_and_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"_id": {"$oid": "65a1"}, "n": 1}\n\n{"_id": 2}\n')
    assert list(read_jsonl(path)) == [{"_id": {"$oid": "65a1"}, "n": 1}, {"_id": 2}]
    path.write_text('{"_id": 1}\n[1]\n')
    with pytest.raises(SnapshotError, match=":2: not a JSON object"):
        list(read_jsonl(path))


def test_postgres_script_takes_position_and_rows_in_one_snapshot_and_quotes_names():
    script = postgres_script("my schema", 'we"ird')
    assert script.startswith("BEGIN ISOLATION LEVEL REPEATABLE READ")
    assert "pg_current_wal_lsn()" in script and script.rstrip().endswith("COMMIT;")
    assert 'FROM "my schema"."we""ird" t' in script
