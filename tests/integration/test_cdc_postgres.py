"""CDC end to end: a real PostgreSQL (wal_level=logical), Kafka Connect standalone with the
Debezium PostgreSQL connector 3.6.1 (pgoutput), the real broker.

PostgreSQL and Connect are started once per test session by services.infra_cdc (reused when
`clickloop cdc up` already runs them). Each test gets its own database in that server and its
own connector, topic prefix and replication slot, all removed afterwards, so tests never see
each other's rows or the developer's `clickloop` database.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import orjson
import pytest

from services import infra_cdc
from services.settings import Settings
from streams.debezium import ChangeEvent, decode
from streams.history import TableHistory, as_of, resolve
from tests.integration.helpers import consume, read_topic

TABLE = "public.subscriptions"
COLUMNS = ("user_id", "plan", "status")
CDC_UP_TIMES: dict[str, float] = {}


@pytest.fixture(scope="session")
def cdc(infra: Settings) -> Settings:
    """PostgreSQL and the Connect worker, once per session (idempotent: reused when up)."""
    t0 = time.monotonic()
    pg = infra_cdc.start_postgres(infra)
    connect = infra_cdc.start_connect(infra)
    CDC_UP_TIMES["postgres+connect"] = time.monotonic() - t0
    print(f"\n[cdc] postgres {'started' if pg else 'reused'}, connect "
          f"{'started' if connect else 'reused'} in {CDC_UP_TIMES['postgres+connect']:.1f} s")
    return infra


@pytest.fixture
def source(cdc: Settings, settings: Settings):
    """This test's own database (demo table + publication) in the shared PostgreSQL; the
    connector registered on it is named after the test's prefix. Both removed afterwards."""
    own = dataclasses.replace(settings, pg_database="it_" + settings.prefix.strip(".-")
                              .replace("-", "_").replace(".", "_"))
    infra_cdc.ensure_database(own)
    yield own
    infra_cdc.delete_connector(own)
    infra_cdc.drop_database(own, own.pg_database)


def sql(settings: Settings, statement: str) -> None:
    infra_cdc.psql(settings, statement)


def between() -> int:
    """A wall-clock instant (epoch ms) strictly between the commits before and after it.
    PostgreSQL's commit time (source.ts_ms) is this machine's clock."""
    time.sleep(0.05)
    mark = int(time.time() * 1000)
    time.sleep(0.05)
    return mark


async def read_records(bootstrap: str, topic: str, until, timeout_s: float = 90) -> list:
    """Raw records (key, value, headers) of `topic` from the start, until `until(records)`."""
    return await consume(bootstrap, topic, until, lambda r: r, timeout_s)


def values(version: dict) -> tuple:
    return (version["op"], version["is_deleted"], *(version["row"][c] for c in COLUMNS))


def test_subscriptions_history_end_to_end(source: Settings, workers):
    s = source
    # Rows already there before the connector: the initial snapshot reads them (op=r).
    sql(s, "INSERT INTO subscriptions (id, user_id, plan, status) VALUES "
           "(1, 'u1', 'basic', 'active'), (2, 'u2', 'pro', 'active')")
    t0 = time.monotonic()
    infra_cdc.register_connector(s)
    register_s = time.monotonic() - t0
    topic = infra_cdc.table_topic(s, TABLE)
    assert topic == f"{s.prefix}cdc.{s.cdc_server}.public.subscriptions"
    asyncio.run(read_records(s.kafka_bootstrap, topic, lambda rs: len(rs) >= 2))
    at = {"snapshot": between()}
    sql(s, "UPDATE subscriptions SET plan = 'pro', updated_at = now() WHERE id = 1")
    at["u1 pro"] = between()
    sql(s, "INSERT INTO subscriptions (id, user_id, plan, status) VALUES (3, 'u3', 'basic', 'trial')")
    at["u3 created"] = between()
    sql(s, "UPDATE subscriptions SET status = 'cancelled', cancelled_at = now() WHERE id = 2")
    at["u2 cancelled"] = between()
    sql(s, "DELETE FROM subscriptions WHERE id = 1")
    at["u1 deleted"] = between()
    # Two rows in one transaction: one commit, one commit time.
    sql(s, "BEGIN; UPDATE subscriptions SET status = 'active' WHERE id = 3; "
           "UPDATE subscriptions SET status = 'active', cancelled_at = NULL WHERE id = 2; COMMIT")
    at["resubscribed"] = between()

    records = asyncio.run(read_records(s.kafka_bootstrap, topic, lambda rs: len(rs) >= 9))
    assert len(records) == 9, [(r.key, r.value) for r in records]
    events: list[ChangeEvent | None] = [decode(r.key, r.value, r.headers or ()) for r in records]
    ops = [(e.key_id, e.op) if e else (orjson.loads(r.key)["id"], None)
           for e, r in zip(events, records)]
    # Snapshot first (in any order), then the stream in commit order; a tombstone (same key,
    # null value) right after the delete.
    assert sorted(ops[:2]) == [("1", "r"), ("2", "r")]
    assert ops[2:] == [("1", "u"), ("3", "c"), ("2", "u"), ("1", "d"), (1, None), ("3", "u"), ("2", "u")]
    assert records[6].value is None and orjson.loads(records[6].key) == {"id": 1}
    assert all(e.table == TABLE and e.connector == "postgresql" for e in events if e)
    # Debezium's positions: increasing along the stream (commit LSN, LSN); one transaction id
    # for the last two events.
    stream = [e for e in events[2:] if e]
    assert [e.position for e in stream] == sorted(e.position for e in stream)
    assert stream[-1].tx_id is not None and stream[-1].tx_id == stream[-2].tx_id

    # The pure fold (streams/history.py) gives the history the test made.
    fold = TableHistory()
    rows = []
    for event in events:
        rows.extend(fold.apply(event).versions)
    history = resolve(rows)
    assert sorted(history) == ["1", "2", "3"]
    assert [values(v) for v in history["1"]] == [
        ("r", False, "u1", "basic", "active"), ("u", False, "u1", "pro", "active"),
        ("d", True, "u1", "pro", "active")]
    assert [values(v) for v in history["2"]] == [
        ("r", False, "u2", "pro", "active"), ("u", False, "u2", "pro", "cancelled"),
        ("u", False, "u2", "pro", "active")]
    assert [values(v) for v in history["3"]] == [
        ("c", False, "u3", "basic", "trial"), ("u", False, "u3", "basic", "active")]
    for versions in history.values():
        assert [v["valid_from"] for v in versions] == sorted(v["valid_from"] for v in versions)
        assert [v["valid_to"] for v in versions[:-1]] == [v["valid_from"] for v in versions[1:]]
        assert versions[-1]["valid_to"] is None and versions[-1]["is_current"]
        assert not any(v["is_current"] for v in versions[:-1])
    assert history["2"][1]["row"]["cancelled_at"] is not None
    assert history["2"][2]["row"]["cancelled_at"] is None
    assert history["2"][2]["valid_from"] == history["3"][1]["valid_from"]  # one commit

    # As-of answers at instants between the commits.
    def state(when: int) -> dict[str, tuple]:
        return {k: (v["row"]["plan"], v["row"]["status"]) for k, v in as_of(rows, when).items()}

    assert state(at["snapshot"]) == {"1": ("basic", "active"), "2": ("pro", "active")}
    assert state(at["u1 pro"]) == {"1": ("pro", "active"), "2": ("pro", "active")}
    assert state(at["u3 created"]) == {"1": ("pro", "active"), "2": ("pro", "active"),
                                       "3": ("basic", "trial")}
    assert state(at["u2 cancelled"])["2"] == ("pro", "cancelled")
    assert state(at["u1 deleted"]) == {"2": ("pro", "cancelled"), "3": ("basic", "trial")}
    assert as_of(rows, at["u1 deleted"], include_deleted=True)["1"]["is_deleted"]
    assert state(at["resubscribed"]) == {"2": ("pro", "active"), "3": ("basic", "active")}

    # The cdc_history worker reads the same topic and writes history.subscriptions: resolved,
    # it equals the offline fold.
    workers.start("cdc_history")
    history_topic = s.topic("history.subscriptions")

    def settled(got: list[dict]) -> bool:
        return _comparable(resolve(got)) == _comparable(history)

    try:
        got = asyncio.run(read_topic(s.kafka_bootstrap, history_topic, settled, timeout_s=90))
    except Exception as exc:  # the worker's log says why
        pytest.fail(f"{history_topic} never matched the offline fold: {exc!r}\n{workers.logs()}")
    assert _comparable(resolve(got)) == _comparable(history)
    print(f"\n[cdc] connector registered and RUNNING in {register_s:.1f} s")


def test_a_lost_slot_stops_the_connector_loudly_and_resnapshot_recovers(source: Settings):
    """The replication slot gone (invalidated past max_slot_wal_keep_size, or dropped) while
    the connector was stopped: Debezium refuses to resume instead of skipping the gap, the
    status says so, and `clickloop cdc resnapshot` starts it over with a new snapshot whose
    reads bring the gap's changes into the history without inventing any, and writes the
    delete of the row that went in the gap, which no snapshot can show."""
    s = source
    sql(s, "INSERT INTO subscriptions (id, user_id, plan, status) VALUES "
           "(1, 'u1', 'basic', 'active'), (2, 'u2', 'pro', 'active')")
    infra_cdc.register_connector(s)
    topic = infra_cdc.table_topic(s, TABLE)
    asyncio.run(read_records(s.kafka_bootstrap, topic, lambda rs: len(rs) >= 2))
    sql(s, "UPDATE subscriptions SET plan = 'pro', updated_at = now() WHERE id = 1")
    asyncio.run(read_records(s.kafka_bootstrap, topic, lambda rs: len(rs) >= 3))

    infra_cdc.stop_connector(s)  # its task commits its offsets
    slot = infra_cdc.slot_name(s)
    sql(s, f"SELECT pg_drop_replication_slot('{slot}')")
    # The gap: changes nobody captures.
    sql(s, "UPDATE subscriptions SET status = 'cancelled', cancelled_at = now() WHERE id = 2")
    sql(s, "INSERT INTO subscriptions (id, user_id, plan, status) VALUES (3, 'u3', 'basic', 'trial')")
    sql(s, "DELETE FROM subscriptions WHERE id = 1")

    with pytest.raises(infra_cdc.InfraError, match="no longer available on the server"):
        infra_cdc.resume_connector(s, timeout_s=60)
    line = infra_cdc.status(s)["connector"]
    assert "tasks FAILED" in line and "`clickloop cdc resnapshot`" in line, line

    again = subprocess.run([sys.executable, "-m", "services.cli", "cdc", "resnapshot"],
                           env={**os.environ, **s.as_env()}, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"rows deleted in the gap, written as deletes: {topic} 1" in again.stdout, again.stdout
    assert "RUNNING, tasks RUNNING" in again.stdout
    sql(s, "UPDATE subscriptions SET status = 'active' WHERE id = 3")  # streaming again

    records = asyncio.run(read_records(s.kafka_bootstrap, topic, lambda rs: len(rs) >= 8))
    events = [(orjson.loads(r.key)["id"], decode(r.key, r.value, r.headers or ())) for r in records]
    by_key: dict[int, list] = {}
    for key, e in events:
        by_key.setdefault(key, []).append(e.op if e else None)
    # The second snapshot reads rows 2 and 3 as they are now; row 1, not read, gets the delete
    # (and tombstone) the snapshot could not show; then the stream.
    assert by_key == {1: ["r", "u", "d", None], 2: ["r", "r"], 3: ["r", "u"]}, by_key
    fold = TableHistory()
    rows = [v for _, e in events for v in fold.apply(e).versions]
    history = resolve(rows)
    assert [values(v) for v in history["2"]] == [
        ("r", False, "u2", "pro", "active"), ("r", False, "u2", "pro", "cancelled")]
    assert [values(v) for v in history["3"]] == [
        ("r", False, "u3", "basic", "trial"), ("u", False, "u3", "basic", "active")]
    assert [values(v) for v in history["1"]] == [
        ("r", False, "u1", "basic", "active"), ("u", False, "u1", "pro", "active"),
        ("d", True, "u1", "pro", "active")]
    # Deleted no later than the new snapshot, and from that snapshot's position.
    (delete,) = [e for _, e in events if e and e.op == "d"]
    (read3,) = [e for k, e in events if k == 3 and e and e.op == "r"]
    assert delete.position == read3.position and delete.ts_ms == read3.ts_ms
    assert infra_cdc.slot_status(s).active


def _comparable(history: dict[str, list[dict]]) -> dict[str, list[tuple]]:
    return {k: [(tuple(v["position"]), v["op"], v["valid_from"], v["valid_to"], v["is_current"],
                 v["is_deleted"], orjson.dumps(v["row"], option=orjson.OPT_SORT_KEYS))
                for v in versions] for k, versions in history.items()}


def test_cdc_cli_up_is_idempotent_and_reports_status(source: Settings):
    """`clickloop cdc up` against running services starts nothing, creates the database and
    the connector, and returns once it is RUNNING; a second `up` changes nothing."""
    env = {**os.environ, **source.as_env()}
    cli = [sys.executable, "-m", "services.cli", "cdc"]
    first = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    assert "started" not in first.stdout          # the session's PostgreSQL and Connect are reused
    name = infra_cdc.connector_name(source)
    assert f"connector: {name}: RUNNING, tasks RUNNING" in first.stdout
    assert infra_cdc.psql(source, "SELECT pubname FROM pg_publication").split() == ["clickloop_cdc"]
    slot = infra_cdc.psql(source, "SELECT plugin || ' ' || database FROM pg_replication_slots "
                                  f"WHERE slot_name = '{infra_cdc.slot_name(source)}'").strip()
    assert slot == f"pgoutput {source.pg_database}"
    again = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and "started" not in again.stdout
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0
    assert f"postgres: up at {source.pg_host}:{source.pg_port} database {source.pg_database}" in status.stdout
    assert f"connector: {name}: RUNNING" in status.stdout
    assert f"slot: {infra_cdc.slot_name(source)}: active, WAL reserved, retains " in status.stdout
    held = infra_cdc.slot_status(source)
    assert held is not None and held.active and held.wal_status == "reserved" \
        and held.retained_bytes >= 0
    wal = infra_cdc.psql(source, "SHOW wal_level").strip()
    assert wal == "logical"
