"""Micro-batching (services.collector.packer): when records close and what they hold."""
from __future__ import annotations

import orjson
import pytest

from services.collector.packer import OVERHEAD, Packer


def ev(i: int) -> bytes:
    return orjson.dumps({"i": i})


def values(records) -> list[list[int]]:
    return [[e["i"] for e in orjson.loads(r.value)["events"]] for r in records]


def test_a_record_closes_at_max_events_in_order():
    p = Packer(linger_ms=5, max_events=3, max_bytes=10_000)
    closed = [r for i in range(7) for r in p.add(0, "u", ev(i), now_ms=0)[1]]
    assert values(closed) == [[0, 1, 2], [3, 4, 5]]
    assert values(p.drain()) == [[6]]


def test_a_record_closes_after_linger_ms_from_its_first_event():
    p = Packer(linger_ms=5, max_events=100, max_bytes=10_000)
    p.add(0, "u", ev(0), now_ms=100)
    p.add(1, "v", ev(1), now_ms=103)
    assert p.next_due_ms() == 105
    assert p.due(104) == []
    assert [(r.partition, r.opened_ms) for r in p.due(105)] == [(0, 100)]
    assert p.next_due_ms() == 108
    assert [r.partition for r in p.due(108)] == [1] and p.next_due_ms() is None


@pytest.mark.parametrize("reason,sizes,max_bytes,expected", [
    ("fits exactly", [20, 20], OVERHEAD + 41, [[0, 1]]),
    ("one byte over: the second event opens a new record", [20, 20], OVERHEAD + 40, [[0], [1]]),
    ("an event alone over the cap still gets a record", [50], OVERHEAD + 20, [[0]]),
])
def test_byte_cap(reason, sizes, max_bytes, expected):
    p = Packer(linger_ms=5, max_events=100, max_bytes=max_bytes)
    closed = []
    for i, size in enumerate(sizes):
        event = orjson.dumps({"i": i, "p": "x" * (size - len(orjson.dumps({"i": i, "p": ""})))})
        assert len(event) == size
        closed += p.add(0, "u", event, now_ms=0)[1]
    closed += p.drain()
    assert values(closed) == expected, reason
    assert all(len(r.value) <= max(max_bytes, OVERHEAD + max(sizes)) for r in closed)


def test_records_are_per_partition_and_keyed_only_by_a_single_visitor():
    p = Packer(linger_ms=5, max_events=100, max_bytes=10_000)
    ids = [p.add(part, vis, ev(i), 0)[0] for i, (part, vis) in
           enumerate([(0, "a"), (1, "b"), (0, "a"), (1, "c")])]
    assert ids[0] == ids[2] and ids[1] == ids[3] and ids[0] != ids[1]
    records = {r.partition: r for r in p.drain()}
    assert (records[0].key, records[0].events) == ("a", 2)
    assert (records[1].key, records[1].events) == (None, 2)


def test_value_is_a_click_batch_and_events_are_not_reencoded():
    p = Packer(linger_ms=5, max_events=2, max_bytes=10_000)
    p.add(0, "u", b'{"a": 1}', 0)
    _, (record,) = p.add(0, "u", b'{"b":2}', 0)
    assert record.value == b'{"v":1,"events":[{"a": 1},{"b":2}]}'


def test_pending_events_and_new_ids_after_close():
    p = Packer(linger_ms=5, max_events=2, max_bytes=10_000)
    first, _ = p.add(0, "u", ev(0), 0)
    p.add(0, "u", ev(1), 0)
    second, _ = p.add(0, "u", ev(2), 0)
    assert second != first and p.pending_events == 1


def test_a_record_must_hold_one_event():
    with pytest.raises(ValueError):
        Packer(linger_ms=5, max_events=0, max_bytes=10_000)
