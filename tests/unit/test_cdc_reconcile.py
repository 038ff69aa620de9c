"""The deletes a new snapshot cannot show (services/cdc/reconcile.py): which keys were
current, and the delete records written for those the snapshot did not read."""
from __future__ import annotations

import orjson

from services.cdc.reconcile import MARK, Current, Cut, gap_deletes
from streams.debezium import decode
from streams.history import TableHistory, resolve

SOURCE = {"version": "3.6.1.Final", "connector": "postgresql", "name": "app", "db": "app",
          "schema": "public", "table": "subscriptions"}


def record(key: int, op: str | None, lsn: int, commit: int | None = None, ts: int = 1_000,
           plan: str = "basic") -> tuple[bytes, bytes | None]:
    """A Debezium PostgreSQL record (key, value); op None: a tombstone."""
    raw_key = orjson.dumps({"id": key})
    if op is None:
        return raw_key, None
    row = {"id": key, "plan": plan}
    source = {**SOURCE, "ts_ms": ts, "lsn": lsn, "snapshot": "true" if op == "r" else "false",
              "sequence": orjson.dumps([None if commit is None else str(commit), str(lsn)]).decode()}
    return raw_key, orjson.dumps({"before": row if op == "d" else None,
                                  "after": None if op == "d" else row,
                                  "source": source, "op": op, "ts_ms": ts})


def events(*records: tuple[bytes, bytes | None]):
    return [(k, decode(k, v)) for k, v in records]


def current(pairs) -> dict:
    """The keys `Current` holds after (Kafka key, event) pairs, fed in order."""
    fold = Current()
    for raw_key, event in pairs:
        fold.add(raw_key, event)
    return fold.held()


def test_current_is_each_keys_last_event_by_position_unless_a_delete():
    held = current(events(
        record(1, "r", 100), record(2, "r", 100), record(3, "r", 100),
        record(1, "u", 200, commit=210, plan="pro"),
        record(2, "d", 220, commit=230), record(2, None, 0),   # delete, then its tombstone
        record(3, "u", 150, commit=160, plan="pro"),          # arrives after, orders before…
        record(3, "u", 300, commit=310, plan="gold"),
        record(3, "u", 150, commit=160, plan="pro"),          # …and a duplicate
    ))
    assert sorted(held) == ["1", "3"]
    assert held["1"][1].after["plan"] == "pro" and held["1"][0] == b'{"id":1}'
    assert held["3"][1].after["plan"] == "gold"


def test_a_truncate_ends_every_key_before_it_but_not_after():
    truncate = {"before": None, "after": None, "op": "t", "ts_ms": 5,
                "source": {**SOURCE, "ts_ms": 5, "lsn": 400,
                           "sequence": orjson.dumps(["400", "400"]).decode()}}
    held = current([*events(record(1, "r", 100), record(2, "r", 100)),
                    (b"", decode(None, orjson.dumps(truncate))),
                    *events(record(2, "c", 500, commit=510))])
    assert sorted(held) == ["2"]


def test_gap_deletes_for_the_keys_current_before_and_not_read():
    before = current(events(record(1, "r", 100), record(2, "u", 200, commit=210, plan="pro"),
                            record(3, "r", 100), record(4, "d", 220, commit=230)))
    cut = Cut(lsn=1_000, ts_ms=9_000)
    out = gap_deletes(before, {"3"}, cut, orjson.loads(record(1, "r", 1)[1])["source"])
    # Keys 1 and 2 were current and not read: a delete and a tombstone each, in key order;
    # 3 was read; 4 was already deleted.
    assert [(k, v is None) for k, v in out] == [(b'{"id":1}', False), (b'{"id":1}', True),
                                                (b'{"id":2}', False), (b'{"id":2}', True)]
    delete = decode(*out[2])
    assert (delete.op, delete.key_id, delete.before, delete.after) == \
        ("d", "2", {"id": 2, "plan": "pro"}, None)
    assert delete.position == (1_000, 1_000) and delete.ts_ms == 9_000
    assert delete.table == "public.subscriptions" and delete.connector == "postgresql"
    assert orjson.loads(out[2][1])["source"]["clickloop"] == MARK
    assert decode(*out[3]) is None
    assert gap_deletes(before, {"1", "2", "3"}, cut, SOURCE) == []


def test_the_history_fold_ends_the_row_at_the_cut_whatever_the_arrival_order():
    """The delete sits between what the old slot delivered and what the new one streams:
    a re-insert after the snapshot opens a new version after it, even if it arrives first."""
    old = [record(1, "r", 100), record(1, "u", 200, commit=210, plan="pro")]
    before = current(events(*old))
    deletes = gap_deletes(before, set(), Cut(lsn=1_000, ts_ms=9_000), SOURCE)
    later = record(1, "c", 1_100, commit=1_200, ts=9_500, plan="gold")
    fold = TableHistory()
    rows = []
    for key, value in [*old, later, *deletes]:
        event = decode(key, value)
        if event is not None:
            rows.extend(fold.apply(event).versions)
    versions = resolve(rows)["1"]
    assert [(v["op"], v["is_deleted"], v["row"]["plan"], v["valid_from"]) for v in versions] == [
        ("r", False, "basic", 1_000), ("u", False, "pro", 1_000), ("d", True, "pro", 9_000),
        ("c", False, "gold", 9_500)]
    assert versions[-1]["is_current"]
