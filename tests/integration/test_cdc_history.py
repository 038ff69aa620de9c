"""The cdc_history worker, the history query routes and `clickloop cdc snapshot` on the
real broker: what lands on `history.<table>` resolves to the pure fold's history of
the same records (streams.history, run offline), whatever was delivered twice, late,
wrapped or not; the routes answer from those topics; bad and late records are in the
DLQ with their position."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer

from bench.cdc_history import change_records
from services.history.app import make_app
from services.infra import free_port
from streams import topics
from streams.cdc_history import offline_history
from streams.history import HistoryConfig, resolve, version_at
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parents[1] / "unit" / "fixtures" / "debezium"
REPO = Path(__file__).parents[2]


def fixture(name: str) -> list[tuple[bytes | None, bytes | None, list]]:
    out = []
    for line in (FIXTURES / name).read_text().splitlines():
        doc = json.loads(line)
        out.append((None if doc["key"] is None else doc["key"].encode(),
                    None if doc["value"] is None else doc["value"].encode(),
                    [(h, None if v is None else v.encode()) for h, v in doc["headers"]]))
    return out


async def send(settings, topic: str, records) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send(settings.topic(topic), key=key, value=value, headers=headers,
                                partition=0)
        await producer.flush()
    finally:
        await producer.stop()


async def resolved_history(settings, table: str, expected: dict, timeout_s: float = 90) -> list[dict]:
    """The committed rows of `history.<table>` once they resolve to `expected`."""
    return await read_topic(settings.kafka_bootstrap, settings.topic(f"history.{table}"),
                            lambda rows: resolve(rows) == expected, timeout_s)


def ensure(settings, *cdc_names: str):
    names = [n for c in cdc_names for n in (c, topics.history_topic(c), topics.dlq_topic(c))]
    return topics.ensure_topics(settings, tuple(names))


@pytest.fixture
def cdc_settings(settings):
    # Few events held per key, so that a late event older than all of them is handed back.
    return dataclasses.replace(settings, checkpoint_ms=100, history_max_versions=3)


async def test_worker_history_equals_the_offline_fold_and_routes_answer(cdc_settings, workers):
    settings = cdc_settings
    workers.settings = settings
    wrapped, plain, mysql, gen = ("cdc.shop.public.subscriptions", "cdc.plain.public.plans",
                                  "cdc.legacy.shop.accounts", "cdc.gen.public.orders")
    await ensure(settings, wrapped, plain, mysql, gen)
    pg = fixture("pg_subscriptions.schemas.jsonl")
    # Re-delivered duplicates and two updates swapped (out of order), as Debezium
    # delivers after a connector restart.
    pg_sent = pg[:5] + pg[2:4] + [pg[6], pg[5]] + pg[7:] + pg[:2]
    plain_sent = fixture("pg_subscriptions.jsonl")
    # Generated traffic (snapshot, c/u/d + tombstones, duplicates, swaps), then one of
    # its early updates again: with max_versions=3 it is older than every event held
    # for its key, so it cannot be placed and must go to the DLQ.
    gen_sent = change_records(400, keys=5, seed=3, table="orders")
    gen_sent.append(next(r for r in gen_sent[5:] if r[1] is not None and b'"op":"u"' in r[1]))
    bad = [(b'{"id":1}', b"not json", []),
           (b'{"id":1}', b'{"status":"BEGIN","id":"571","event_count":null}', []),
           (b'{"id":1}', b'{"ts_ms":1795000000000}', [])]
    mysql_sent = fixture("mysql_subscriptions.jsonl") + bad
    for topic, records in ((wrapped, pg_sent), (plain, plain_sent), (mysql, mysql_sent),
                           (gen, gen_sent)):
        await send(settings, topic, records)
    cfg = HistoryConfig(max_versions=settings.history_max_versions)
    expected = {t: resolve(offline_history(r, cfg)[0])
                for t, r in (("subscriptions", pg_sent), ("plans", plain_sent),
                             ("accounts", mysql_sent), ("orders", gen_sent))}
    assert offline_history(gen_sent, cfg)[1], "the test's late event was placed: it must be older"
    assert expected["subscriptions"] == resolve(offline_history(pg, cfg)[0]) == \
        expected["plans"], "duplicates, swaps or the wrapper changed the offline history"

    workers.start("cdc_history")
    rows = {t: await resolved_history(settings, t, e) for t, e in expected.items()}
    assert any(r["is_deleted"] for r in rows["subscriptions"]), "a delete makes a deleted marker"
    assert any(r["moved_to"] for r in rows["subscriptions"]), "a primary-key change is marked"

    dlq = await read_topic(settings.kafka_bootstrap, settings.topic(mysql + ".dlq"),
                           lambda v: len(v) >= len(bad), 60)
    base = len(fixture("mysql_subscriptions.jsonl"))
    assert [d["position"] for d in dlq] == [f"{settings.topic(mysql)}[0]@{base + i}" for i in range(3)]
    assert "not JSON" in dlq[0]["error"] and "transaction metadata" in dlq[1]["error"] \
        and "heartbeat" in dlq[2]["error"]
    # Re-deliveries from far back in the generated stream are late too: as many as
    # the offline fold handed back, the one appended last among them.
    late = offline_history(gen_sent, cfg)[1]
    late_dlq = await read_topic(settings.kafka_bootstrap, settings.topic(gen + ".dlq"),
                                lambda v: len(v) >= len(late), 60)
    assert len(late_dlq) == len(late)
    assert all(d["error"].startswith("late event:") for d in late_dlq)
    assert late_dlq[-1]["position"] == f"{settings.topic(gen)}[0]@{len(gen_sent) - 1}"

    # A table whose topic appears while the worker runs is picked up.
    fresh = "cdc.shop.public.invoices"
    await ensure(settings, fresh)
    fresh_sent = change_records(50, keys=10, seed=5, table="invoices")
    await send(settings, fresh, fresh_sent)
    await resolved_history(settings, "invoices", resolve(offline_history(fresh_sent, cfg)[0]), 90)

    # The query routes, in this process, from the same topics.
    runner = web.AppRunner(make_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/history"
    try:
        async with aiohttp.ClientSession() as http:
            want = sum(len(r) for r in rows.values())
            deadline = time.monotonic() + 60
            while True:
                async with http.get(url) as resp:
                    status = await resp.json()
                if status["rows"] >= want and status["caught_up"]:
                    break
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.3)
            for table, keys in expected.items():
                for kid, versions in keys.items():
                    async with http.get(f"{url}/{table}/{kid}") as resp:
                        assert resp.status == 200
                        assert (await resp.json())["versions"] == versions
                    for v in versions:
                        at = version_at(versions, v["valid_from"])
                        async with http.get(f"{url}/{table}/{kid}", params={"as_of": v["valid_from"]}) as resp:
                            body = await resp.json()
                            if at is None:
                                assert resp.status == 404
                            elif at["is_deleted"]:
                                assert resp.status == 404 and "deleted" in body["error"]
                            else:
                                assert resp.status == 200 and body["version"] == at
                    async with http.get(f"{url}/{table}/{kid}",
                                        params={"as_of": str(versions[0]["valid_from"] - 1)}) as resp:
                        assert resp.status == 404 and "did not exist yet" in (await resp.json())["error"]
            first = expected["subscriptions"]["1"][0]
            iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(first["valid_from"] / 1000 + 1)) + "Z"
            async with http.get(f"{url}/subscriptions/1", params={"as_of": iso}) as resp:
                assert resp.status == 200
                assert (await resp.json())["version"] == version_at(expected["subscriptions"]["1"],
                                                                     first["valid_from"] + 1000)
            async with http.get(f"{url}/subscriptions/1", params={"as_of": "yesterday"}) as resp:
                assert resp.status == 400 and "ISO-8601" in (await resp.json())["error"]
            async with http.get(f"{url}/subscriptions/no-such-key") as resp:
                assert resp.status == 404
            async with http.get(f"{url}/nosuchtable/1") as resp:
                assert resp.status == 404 and "no history table" in (await resp.json())["error"]
    finally:
        await runner.cleanup()


def snapshot_cli(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "cdc", "snapshot", *args],
                          env={**os.environ, **settings.as_env()}, capture_output=True, text=True,
                          timeout=60, cwd=REPO)


async def test_snapshot_files_seed_history_and_a_second_snapshot_adds_only_changes(
        cdc_settings, workers, tmp_path):
    settings = cdc_settings
    workers.settings = settings
    csv_file, jsonl_file = tmp_path / "subs.csv", tmp_path / "accounts.jsonl"
    csv_file.write_text("id,user_id,plan,status\n1,u1,basic,active\n2,u2,pro,\\N\n3,u3,team,active\n")
    jsonl_file.write_text('{"_id":{"$oid":"65a1"},"name":"a","seats":3}\n'
                          '{"_id":{"$oid":"65a2"},"name":"b","seats":null}\n')
    await ensure(settings, "cdc.crm.public.subs", "cdc.mongo.app.accounts")
    done = snapshot_cli(settings, "--table", "subs", "--server", "crm", "--schema", "public",
                        "--csv", str(csv_file), "--key", "id")
    assert done.returncode == 0, done.stderr
    assert "3 rows" in done.stdout
    done = snapshot_cli(settings, "--table", "accounts", "--server", "mongo", "--schema", "app",
                        "--jsonl", str(jsonl_file), "--key", "_id")
    assert done.returncode == 0, done.stderr
    workers.start("cdc_history")
    rows = await read_topic(settings.kafka_bootstrap, settings.topic("history.subs"),
                            lambda v: len(resolve(v)) == 3, 90)
    history = resolve(rows)
    assert {k: [(v["op"], v["row"], v["is_current"]) for v in vs] for k, vs in history.items()} == {
        "1": [("r", {"id": "1", "user_id": "u1", "plan": "basic", "status": "active"}, True)],
        "2": [("r", {"id": "2", "user_id": "u2", "plan": "pro", "status": None}, True)],
        "3": [("r", {"id": "3", "user_id": "u3", "plan": "team", "status": "active"}, True)]}
    accounts = resolve(await read_topic(settings.kafka_bootstrap, settings.topic("history.accounts"),
                                        lambda v: len(resolve(v)) == 2, 60))
    assert sorted(accounts) == ['{"$oid":"65a1"}', '{"$oid":"65a2"}']

    # Snapshot again later: row 2 changed, row 3 gone from the export (a snapshot cannot
    # say deleted), the rest identical: one new version, for key 2 only.
    csv_file.write_text("id,user_id,plan,status\n1,u1,basic,active\n2,u2,pro,cancelled\n")
    done = snapshot_cli(settings, "--table", "subs", "--server", "crm", "--schema", "public",
                        "--csv", str(csv_file), "--key", "id")
    assert done.returncode == 0, done.stderr
    await read_topic(settings.kafka_bootstrap, settings.topic("history.subs"),
                     lambda v: len(resolve(v).get("2", ())) == 2, 60)
    await asyncio.sleep(2.0)   # a fake change for key 1 or 3 would be committed by now
    history = resolve(await read_topic(settings.kafka_bootstrap, settings.topic("history.subs"),
                                       lambda v: len(resolve(v).get("2", ())) == 2, 30))
    assert [v["row"]["status"] for v in history["2"]] == [None, "cancelled"]
    assert len(history["1"]) == 1 and len(history["3"]) == 1

    bad = snapshot_cli(settings, "--table", "subs", "--server", "crm", "--schema", "public",
                       "--csv", str(csv_file), "--key", "nope")
    assert bad.returncode == 2 and "no key column nope" in bad.stderr


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert found, "PostgreSQL server binaries not found (Debian's postgresql package)"
    return found[-1].parent


async def test_snapshot_from_a_real_postgresql_table(cdc_settings, workers):
    """A throwaway PostgreSQL server (Debian's binaries, this test's own data directory
    and port): `COPY` through psql, positions from pg_current_wal_lsn()."""
    settings = cdc_settings
    workers.settings = settings
    pg, port = _pg_bin(), free_port()
    home = Path(tempfile.mkdtemp(prefix="clickloop-pg-"))
    data = home / "data"
    # initdb refuses to run as root: the server runs as nobody in a directory of its own.
    run_as = [] if os.geteuid() != 0 else ["setpriv", "--reuid=nobody", "--regid=nogroup",
                                           "--clear-groups"]
    if run_as:
        shutil.chown(home, "nobody", "nogroup")
    subprocess.run([*run_as, str(pg / "initdb"), "-D", str(data), "-U", "clickloop", "-A", "trust"],
                   check=True, capture_output=True, cwd="/tmp")
    subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-w", "-l", str(home / "pg.log"),
                    "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, cwd="/tmp")
    dsn = f"host=127.0.0.1 port={port} user=clickloop dbname=postgres"
    try:
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c",
                        "CREATE TABLE subscriptions (id int PRIMARY KEY, user_id text, plan text, "
                        "seats int, note text); INSERT INTO subscriptions VALUES "
                        "(1, 'u1', 'basic', 1, 'back\\slash \"q\"'), (2, 'u2', 'pro', 5, NULL);"],
                       check=True, capture_output=True)
        await ensure(settings, "cdc.shop.public.subscriptions")
        done = snapshot_cli(settings, "--table", "subscriptions", "--server", "shop", "--schema",
                            "public", "--postgres", dsn, "--key", "id")
        assert done.returncode == 0, done.stderr
        assert "2 rows" in done.stdout and "at LSN" in done.stdout
        workers.start("cdc_history")
        rows = await read_topic(settings.kafka_bootstrap, settings.topic("history.subscriptions"),
                                lambda v: len(resolve(v)) == 2, 90)
        history = resolve(rows)
        assert history["1"][0]["row"] == {"id": 1, "user_id": "u1", "plan": "basic", "seats": 1,
                                          "note": 'back\\slash "q"'}
        assert history["2"][0]["row"]["note"] is None
        assert history["1"][0]["op"] == "r" and history["1"][0]["source_position"].startswith("lsn ")
    finally:
        subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, cwd="/tmp")
        shutil.rmtree(home, ignore_errors=True)
