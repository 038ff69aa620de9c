"""CDC sources: a real PostgreSQL (Debian's package, `wal_level=logical`) and Kafka Connect
standalone running the Debezium PostgreSQL connector (plugin `pgoutput`).

Used by `clickloop cdc up|down|status`, by `clickloop up` when CLICKLOOP_CDC_ENABLED=true, and
by the CDC integration tests, so there is one way to start them. Like services/infra.py (whose
helpers this module reuses), starting is idempotent: a PostgreSQL or Connect worker already
answering is reused, and registering the connector is a PUT of its whole config.

- PostgreSQL: its own data folder under `<state_dir>/postgres`, loopback only, port
  CLICKLOOP_PG_PORT. PostgreSQL refuses to run as root, so as root it runs as the OS user
  `postgres` (Debian's package creates it; else a system user `clickloop-pg` is created).
  `cdc up` creates the role CLICKLOOP_PG_USER (LOGIN REPLICATION CREATEDB), the database
  CLICKLOOP_PG_DATABASE and in it the demo table `subscriptions` with the publication
  `clickloop_cdc` (deploy/postgres/init.sql). When CLICKLOOP_PG_HOST:CLICKLOOP_PG_PORT already
  answers (your own server), nothing is started or created there: the connector just reads it.
- Kafka Connect: the jars deploy/connect/pom.xml resolves (connect-runtime at the broker's
  version), the connector from deploy/connect/debezium/pom.xml as a plugin; source offsets in
  `<state_dir>/connect/offsets.dat`. The connector (deploy/connect/postgres-connector.json) is
  registered through Connect's REST API on every `cdc up`, and `cdc up` returns once it and its
  task are RUNNING. Its topics are `[CLICKLOOP_PREFIX]cdc.<CLICKLOOP_CDC_SERVER>.<schema>.<table>`;
  the initial snapshot writes the rows already there as `op=r`, once per connector name.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import pwd
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from glob import glob
from pathlib import Path
from typing import NamedTuple

from services.infra import InfraError, Service, port_open, stop, wait_ready
from services.settings import REPO_ROOT, Settings

PG_DEPLOY = REPO_ROOT / "deploy" / "postgres"
CONNECT_DIR = REPO_ROOT / "deploy" / "connect"
PLUGIN_DIR = CONNECT_DIR / "plugins"
PUBLICATION = "clickloop_cdc"
PG_OS_USER = "postgres"           # Debian's package creates it
FALLBACK_OS_USER = "clickloop-pg"
CONNECT_JAVA_OPTS = ["-Xms64m", "-Xmx384m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                     "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]


# --- names ------------------------------------------------------------------------------------

def topic_prefix(settings: Settings) -> str:
    """The connector's topic.prefix: topics are `<this>.<schema>.<table>`."""
    return settings.topic(f"cdc.{settings.cdc_server}")


def table_topic(settings: Settings, table: str) -> str:
    """The topic of `<schema>.<table>`, e.g. `cdc.clickloop.public.subscriptions`."""
    return f"{topic_prefix(settings)}.{table}"


def notifications_topic(settings: Settings) -> str:
    """Debezium's notifications (snapshot started, completed, …), outside `cdc.`: not a table."""
    return settings.topic(f"debezium.{settings.cdc_server}.notifications")


def connector_name(settings: Settings) -> str:
    return settings.topic(f"clickloop-cdc-{settings.cdc_server}")


def slot_name(settings: Settings) -> str:
    """A replication slot per connector (names are [a-z0-9_], at most 63 characters)."""
    raw = re.sub(r"[^a-z0-9_]", "_", f"clickloop_{settings.prefix}{settings.cdc_server}".lower())
    if len(raw) > 63:
        raw = raw[:52] + "_" + hashlib.sha1(raw.encode()).hexdigest()[:10]
    return raw


# --- PostgreSQL ---------------------------------------------------------------------------------

def postgres_service(settings: Settings) -> Service:
    return Service("postgres", settings.pg_host, settings.pg_port, settings.state_dir / "postgres")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: Debian keeps them in /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(re.search(r"/(\d+)/bin/", p).group(1)))
    return found[-1] if found else shutil.which(name)


def pg_ready(settings: Settings) -> bool:
    """True when PostgreSQL accepts connections at CLICKLOOP_PG_HOST:CLICKLOOP_PG_PORT."""
    if not port_open(settings.pg_host, settings.pg_port):
        return False
    isready = pg_bin("pg_isready")
    if isready is None:
        return True
    return subprocess.run([isready, "-q", "-h", settings.pg_host, "-p", str(settings.pg_port),
                           "-t", "3"], capture_output=True).returncode == 0


def psql(settings: Settings, sql: str, database: str | None = None) -> str:
    """Run SQL over TCP as CLICKLOOP_PG_USER; the unaligned, tuples-only output.

    psql (Debian's postgresql-client, a dependency of postgresql) keeps the project free of a
    Python PostgreSQL driver."""
    binary = pg_bin("psql")
    if binary is None:
        raise InfraError("psql is not installed: run `make setup` (it installs Debian's postgresql)")
    env = {**os.environ, "PGPASSWORD": settings.pg_password, "PGCONNECT_TIMEOUT": "5"}
    run = subprocess.run([binary, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                          "-h", settings.pg_host, "-p", str(settings.pg_port),
                          "-U", settings.pg_user, "-d", database or settings.pg_database,
                          "-c", sql], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise InfraError(f"psql on {settings.pg_host}:{settings.pg_port}/"
                         f"{database or settings.pg_database} failed: {run.stderr.strip()}")
    return run.stdout


def _os_user() -> str | None:
    """The OS user PostgreSQL runs as: None (this one) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in (PG_OS_USER, FALLBACK_OS_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    FALLBACK_OS_USER], check=True, capture_output=True)
    return FALLBACK_OS_USER


def _as(user: str | None, cmd: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _chown(path: Path, user: str | None) -> None:
    if user:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _pg_home(settings: Settings, user: str | None) -> Path:
    """`<state_dir>/postgres`, owned by the server's OS user.

    When that user cannot reach the state folder (a clone under /root, mode 0700), the folder
    lives in /var/tmp instead and `<state_dir>/postgres` is a symbolic link to it."""
    home = postgres_service(settings).state_dir
    if home.is_symlink() or home.is_dir():
        return home.resolve()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    if user and subprocess.run(_as(user, ["test", "-x", str(settings.state_dir)]),
                               capture_output=True).returncode != 0:
        digest = hashlib.sha1(str(settings.state_dir.resolve()).encode()).hexdigest()[:12]
        real = Path("/var/tmp") / f"clickloop-postgres-{digest}"
        real.mkdir(mode=0o700, exist_ok=True)
        _chown(real, user)
        home.symlink_to(real)
        return real
    home.mkdir(mode=0o700)
    _chown(home, user)
    return home


def _pg_ctl(user: str | None, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_as(user, [pg_bin("pg_ctl"), "-D", str(home / "data"), *args]),
                          capture_output=True, text=True, cwd=home)


def _superuser_sql(settings: Settings, user: str | None, home: Path, sql: str,
                   database: str = "postgres") -> str:
    """SQL as the server's superuser, over the local socket (peer authentication)."""
    superuser = user or pwd.getpwuid(os.geteuid()).pw_name
    run = subprocess.run(_as(user, [pg_bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                                    "-h", str(home), "-p", str(settings.pg_port), "-U", superuser,
                                    "-d", database, "-c", sql]),
                         capture_output=True, text=True, cwd=home)
    if run.returncode != 0:
        raise InfraError(f"bootstrapping PostgreSQL failed: {run.stderr.strip()}")
    return run.stdout


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def start_postgres(settings: Settings, timeout_s: float = 60) -> bool:
    """Start the local PostgreSQL unless one already answers; True when this call started it."""
    if pg_ready(settings):
        return False
    svc = postgres_service(settings)
    if not _is_loopback(settings.pg_host):
        raise InfraError(f"PostgreSQL at {settings.pg_host}:{settings.pg_port} does not answer; "
                         "clickloop starts its own only on loopback (CLICKLOOP_PG_HOST=127.0.0.1)")
    if port_open(settings.pg_host, settings.pg_port):
        raise InfraError(f"{settings.pg_host}:{settings.pg_port} is taken by something that is not "
                         "answering as PostgreSQL; stop it or set CLICKLOOP_PG_PORT")
    if pg_bin("pg_ctl") is None or pg_bin("initdb") is None:
        raise InfraError("the PostgreSQL server is not installed: run `make setup` "
                         "(it installs Debian's postgresql package)")
    user = _os_user()
    home = _pg_home(settings, user)
    data, log = home / "data", home / "postgres.log"
    superuser = user or pwd.getpwuid(os.geteuid()).pw_name
    if not (data / "PG_VERSION").exists():
        init = subprocess.run(_as(user, [pg_bin("initdb"), "-D", str(data), "-U", superuser,
                                         "-E", "UTF8", "--locale=C", "--no-instructions",
                                         "--auth-local=peer", "--auth-host=scram-sha-256"]),
                              capture_output=True, text=True, cwd=home)
        if init.returncode != 0:
            (home / "initdb.log").write_text(init.stdout + init.stderr)
            raise InfraError(f"initdb failed; see {home / 'initdb.log'}")
    # Our configuration wins at every start (the files are copied, the port is an argument).
    for name, text in [("postgresql.conf", (PG_DEPLOY / "postgresql.conf").read_text()
                        .replace("${RUN_DIR}", str(home))),
                       ("pg_hba.conf", (PG_DEPLOY / "pg_hba.conf").read_text())]:
        (data / name).write_text(text)
        _chown(data / name, user)
    started = _pg_ctl(user, home, "start", "-w", "-t", str(int(timeout_s)), "-l", str(log),
                      "-o", f"-p {settings.pg_port} -c listen_addresses={settings.pg_host}")
    if started.returncode != 0:
        raise InfraError(f"PostgreSQL did not start on {settings.pg_host}:{settings.pg_port}: "
                         f"{(started.stdout + started.stderr).strip()}; see {log}")
    role, pw = _ident(settings.pg_user), _literal(settings.pg_password)
    _superuser_sql(settings, user, home, f"""DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {_literal(settings.pg_user)}) THEN
            CREATE ROLE {role} LOGIN REPLICATION CREATEDB PASSWORD {pw};
        ELSE
            ALTER ROLE {role} LOGIN REPLICATION CREATEDB PASSWORD {pw};
        END IF; END $$;""")
    return True


def managed_postgres(settings: Settings) -> bool:
    """Is CLICKLOOP_PG_HOST:PORT the server clickloop runs from its state folder?"""
    data = postgres_service(settings).state_dir / "data"
    if not _is_loopback(settings.pg_host) or not (data / "postmaster.pid").exists():
        return False
    try:  # postmaster.pid: pid, data dir, start time, port, ...
        return int(data.joinpath("postmaster.pid").read_text().splitlines()[3]) == settings.pg_port
    except (OSError, IndexError, ValueError):
        return False


def ensure_database(settings: Settings, database: str | None = None) -> None:
    """Create the database (owned by CLICKLOOP_PG_USER) unless it exists, and in it the demo
    `subscriptions` table and the publication (deploy/postgres/init.sql); idempotent."""
    database = database or settings.pg_database
    exists = psql(settings, f"SELECT 1 FROM pg_database WHERE datname = {_literal(database)}",
                  database="postgres").strip()
    if not exists:
        psql(settings, f"CREATE DATABASE {_ident(database)}", database="postgres")
    psql(settings, (PG_DEPLOY / "init.sql").read_text(), database=database)


def drop_database(settings: Settings, database: str) -> None:
    """Drop a database and the replication slots in it (tests clean up after themselves)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            psql(settings, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                           f"WHERE database = {_literal(database)}", database="postgres")
            break
        except InfraError:  # a slot still held by a stopping task
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    psql(settings, f"DROP DATABASE IF EXISTS {_ident(database)} WITH (FORCE)", database="postgres")


def stop_postgres(settings: Settings, timeout_s: float = 60) -> bool:
    """Stop the local PostgreSQL (fast shutdown: Debezium's replication connection would hold
    a smart one forever); True when one was running."""
    home = postgres_service(settings).state_dir
    if not (home / "data" / "postmaster.pid").exists() or pg_bin("pg_ctl") is None:
        return False
    user = _os_user()
    done = _pg_ctl(user, home.resolve(), "stop", "-m", "fast", "-w", "-t", str(int(timeout_s)))
    if done.returncode != 0 and (home / "data" / "postmaster.pid").exists():
        raise InfraError(f"PostgreSQL did not stop: {(done.stdout + done.stderr).strip()}")
    return True


# --- Kafka Connect -------------------------------------------------------------------------------

def connect_service(settings: Settings) -> Service:
    return Service("connect", "127.0.0.1", settings.connect_port, settings.state_dir / "connect")


def connect_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.connect_port}"


def _rest(settings: Settings, method: str, path: str, body: dict | None = None,
          timeout_s: float = 10) -> tuple[int, object]:
    request = urllib.request.Request(
        connect_url(settings) + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, raw.decode(errors="replace")


def connect_ready(settings: Settings) -> bool:
    """True when the Connect worker's REST API answers (and has finished starting)."""
    if not port_open("127.0.0.1", settings.connect_port):
        return False
    try:
        code, body = _rest(settings, "GET", "/", timeout_s=3)
        return code == 200 and isinstance(body, dict) and "version" in body
    except (OSError, ValueError):
        return False


def _connect_classpath() -> str:
    lib = CONNECT_DIR / "lib"
    plugin = PLUGIN_DIR / "debezium-connector-postgres"
    if not any(lib.glob("connect-runtime-*.jar")) or not any(plugin.glob("debezium-connector-postgres-*.jar")):
        raise InfraError(f"no Kafka Connect or Debezium jars in {lib} / {plugin}: run `make setup` "
                         f"(it runs `mvn dependency:copy-dependencies` in {CONNECT_DIR})")
    return f"{lib}/*"


def start_connect(settings: Settings, timeout_s: float = 120) -> bool:
    """Start the Connect worker (standalone) unless one already answers; True when this call started it."""
    if connect_ready(settings):
        return False
    svc = connect_service(settings)
    if port_open(svc.host, svc.port):
        raise InfraError(f"{svc.host}:{svc.port} is taken by something that is not answering as "
                         "Kafka Connect; stop it or set CLICKLOOP_CONNECT_PORT")
    if not shutil.which("java"):
        raise InfraError("java is not installed: run `make setup`")
    classpath = _connect_classpath()
    svc.state_dir.mkdir(parents=True, exist_ok=True)
    config = svc.state_dir / "worker.properties"
    config.write_text((CONNECT_DIR / "worker.properties").read_text()
                      .replace("${KAFKA}", settings.kafka_bootstrap)
                      .replace("${CONNECT_PORT}", str(settings.connect_port))
                      .replace("${STATE_DIR}", str(settings.state_dir))
                      .replace("${PLUGIN_PATH}", str(PLUGIN_DIR)))
    out = open(svc.state_dir / "stdout.log", "ab")
    proc = subprocess.Popen(
        ["java", *CONNECT_JAVA_OPTS, f"-Dconnect.logs.dir={svc.state_dir}",
         f"-Dlog4j2.configurationFile={CONNECT_DIR / 'log4j2.properties'}", "-cp", classpath,
         "org.apache.kafka.connect.cli.ConnectStandalone", str(config)],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    svc.pidfile.write_text(str(proc.pid))
    wait_ready(lambda: connect_ready(settings), svc, proc, timeout_s)
    return True


def connector_config(settings: Settings, database: str | None = None) -> dict[str, str]:
    """deploy/connect/postgres-connector.json with this deployment's values."""
    values = {
        "PG_HOST": settings.pg_host, "PG_PORT": str(settings.pg_port),
        "PG_USER": settings.pg_user, "PG_PASSWORD": settings.pg_password,
        "PG_DATABASE": database or settings.pg_database,
        "TOPIC_PREFIX": topic_prefix(settings), "TABLES": ",".join(settings.cdc_tables),
        "SLOT": slot_name(settings), "PUBLICATION": PUBLICATION,
        "PARTITIONS": str(settings.partitions), "NOTIFICATIONS": notifications_topic(settings),
    }
    config = json.loads((CONNECT_DIR / "postgres-connector.json").read_text())
    for name, value in config.items():
        config[name] = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value)
    return config


def connector_state(settings: Settings) -> dict | None:
    """Connect's status of our connector ({"connector": {"state"}, "tasks": [...]}), None if absent."""
    code, body = _rest(settings, "GET", f"/connectors/{connector_name(settings)}/status")
    return body if code == 200 and isinstance(body, dict) else None


def _running(status: dict | None) -> bool:
    return (status is not None and status["connector"]["state"] == "RUNNING"
            and bool(status["tasks"]) and all(t["state"] == "RUNNING" for t in status["tasks"]))


def register_connector(settings: Settings, database: str | None = None,
                       timeout_s: float = 120) -> dict:
    """Create or update the Debezium connector (PUT of its whole config) and wait until it and
    its task are RUNNING; returns its status."""
    name = connector_name(settings)
    code, body = _rest(settings, "PUT", f"/connectors/{name}/config",
                       connector_config(settings, database), timeout_s=60)
    if code not in (200, 201):
        raise InfraError(f"Kafka Connect refused the connector {name}: {code} {body}")
    return _wait_connector(settings, "RUNNING", timeout_s)


def delete_connector(settings: Settings) -> bool:
    """Remove the connector from the worker (its slot stays: drop_database drops it)."""
    code, _ = _rest(settings, "DELETE", f"/connectors/{connector_name(settings)}", timeout_s=60)
    return code in (200, 204)


def _failed_trace(status: dict | None) -> str | None:
    """The trace of the connector's or its first failed task's failure; None if none failed."""
    for part in [status["connector"], *status["tasks"]] if status else []:
        if part.get("state") == "FAILED":
            return part.get("trace") or ""
    return None


def _wait_connector(settings: Settings, want: str, timeout_s: float) -> dict:
    """Wait until the connector is RUNNING (with every task) or STOPPED; a task that
    fails on the way to RUNNING raises at once with the first lines of its trace."""
    name = connector_name(settings)
    log = connect_service(settings).state_dir / "connect.log"
    deadline = time.monotonic() + timeout_s
    while True:
        status = connector_state(settings)
        if _running(status) if want == "RUNNING" else \
                (status is not None and status["connector"]["state"] == want):
            return status  # type: ignore[return-value]
        trace = _failed_trace(status)
        if trace is not None and want == "RUNNING":
            raise InfraError(f"connector {name} failed: {' | '.join(trace.splitlines()[:3])}; "
                             f"see {log}")
        if time.monotonic() > deadline:
            raise InfraError(f"connector {name} not {want} within {timeout_s:.0f} s: {status}; "
                             f"see {log}")
        time.sleep(0.3)


RESNAPSHOT_TIMEOUT_S = 300.0   # `cdc resnapshot`'s wait for the new snapshot (--timeout)


def resnapshot(settings: Settings, timeout_s: float = RESNAPSHOT_TIMEOUT_S) -> dict[str, int]:
    """`clickloop cdc resnapshot`: start the connector over with a new initial snapshot.

    For when its position is gone from the server: a replication slot invalidated past
    `max_slot_wal_keep_size` (`wal_status` lost) or dropped. Debezium then refuses to
    start ("no longer available on the server"; `snapshot.mode=initial` never re-reads
    silently, so the gap is never hidden). This stops the connector, deletes its source
    offsets (Connect's REST API, KIP-875), drops its replication slot and resumes it: it
    reads every captured row again (`op=r`) and streams from the new slot. The history
    fold adds a version only for rows that differ from what it knew (`streams.history`),
    so the gap's changes arrive collapsed into each row's state at the snapshot. Rows
    deleted in the gap are not read: once Debezium reports the snapshot COMPLETED (its
    notifications topic), a delete is written for every key that was current before
    and was not read (services/cdc/reconcile.py), at the snapshot's position and time.
    Returns how many keys each table topic lost to the gap's deletes."""
    import asyncio

    from aiokafka.errors import KafkaError

    from services.cdc import resnapshot as io
    from services.cdc.reconcile import Cut

    name = connector_name(settings)
    if connector_state(settings) is None:
        raise InfraError(f"connector {name} is not registered: `clickloop cdc up` first")
    tables = {table_topic(settings, t): t for t in settings.cdc_tables}
    notes = notifications_topic(settings)
    # This deployment's config (notifications on), as `cdc up` writes it; applied on resume.
    code, body = _rest(settings, "PUT", f"/connectors/{name}/config", connector_config(settings),
                       timeout_s=60)
    if code not in (200, 201):
        raise InfraError(f"Kafka Connect refused the connector {name}: {code} {body}")
    stop_connector(settings, timeout_s)
    marks = asyncio.run(io.ends(settings.kafka_bootstrap, [*tables, notes]))
    code, body = _rest(settings, "DELETE", f"/connectors/{name}/offsets", timeout_s=60)
    if code != 200:
        raise InfraError(f"Kafka Connect would not reset {name}'s offsets: {code} {body}")
    psql(settings, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                   f"WHERE slot_name = {_literal(slot_name(settings))} AND NOT active")
    resume_connector(settings, timeout_s)

    def failed() -> str | None:
        trace = _failed_trace(connector_state(settings))
        return None if trace is None else \
            f"connector {name} failed during the snapshot: {(trace.splitlines() or ['?'])[0]}"

    def slot_cut() -> Cut:
        lsn, ts_ms = psql(settings, "SELECT confirmed_flush_lsn - '0/0', "
                                    "(extract(epoch FROM now()) * 1000)::bigint FROM "
                                    f"pg_replication_slots WHERE slot_name = "
                                    f"{_literal(slot_name(settings))}").strip().split("|")
        return Cut(int(lsn.split(".")[0]), int(ts_ms))

    def has_rows(topic: str) -> bool:
        relation = ".".join(_ident(part) for part in tables[topic].split(".", 1))
        return psql(settings, f"SELECT EXISTS (SELECT 1 FROM {relation})").strip() == "t"

    try:
        asyncio.run(io.snapshot_done(settings.kafka_bootstrap, notes, marks, timeout_s, failed))
        return asyncio.run(io.reconcile(settings.kafka_bootstrap, list(tables), marks, slot_cut,
                                        has_rows))
    except (RuntimeError, KafkaError) as exc:
        raise InfraError(f"{exc}; the gap's deletes were not written: run `clickloop cdc "
                         "resnapshot` again once the connector runs") from exc


def stop_connector(settings: Settings, timeout_s: float = 120) -> None:
    """Stop the connector and its task (Connect commits the task's offsets), registration kept."""
    name = connector_name(settings)
    code, body = _rest(settings, "PUT", f"/connectors/{name}/stop", timeout_s=60)
    if code not in (200, 202, 204):
        raise InfraError(f"Kafka Connect would not stop {name}: {code} {body}")
    _wait_connector(settings, "STOPPED", timeout_s)


def resume_connector(settings: Settings, timeout_s: float = 120) -> dict:
    """Resume a stopped connector; its status once RUNNING (raises when its task fails)."""
    name = connector_name(settings)
    code, body = _rest(settings, "PUT", f"/connectors/{name}/resume", timeout_s=60)
    if code not in (200, 202, 204):
        raise InfraError(f"Kafka Connect would not resume {name}: {code} {body}")
    return _wait_connector(settings, "RUNNING", timeout_s)


# --- together ----------------------------------------------------------------------------------

def up(settings: Settings) -> list[Service]:
    """`clickloop cdc up`: PostgreSQL (unless one answers), its demo database when it is ours,
    Connect, and the connector, RUNNING. Returns the services this call started."""
    started = []
    if start_postgres(settings):
        started.append(postgres_service(settings))
    if managed_postgres(settings):
        ensure_database(settings)
    if start_connect(settings):
        started.append(connect_service(settings))
    register_connector(settings)
    return started


def down(settings: Settings) -> None:
    """Stop Connect, then PostgreSQL. Offsets and the replication slot stay, so the next `up`
    resumes where this one stopped (no second snapshot)."""
    stop(connect_service(settings))
    stop_postgres(settings)


def stop_service(settings: Settings, svc: Service) -> bool:
    """Stop one service `up` returned (`clickloop up` stops what it started)."""
    return stop_postgres(settings) if svc.name == "postgres" else stop(svc)


class Slot(NamedTuple):
    """A replication slot as PostgreSQL sees it."""

    active: bool          # a connector reads it
    wal_status: str       # reserved, extended, unreserved, or lost: invalidated past
                          # max_slot_wal_keep_size, the changes since are gone and the
                          # connector needs a new snapshot
    retained_bytes: int   # WAL it holds back


def slot_status(settings: Settings) -> Slot | None:
    """The connector's replication slot, None when there is none."""
    row = psql(settings, "SELECT active, coalesce(wal_status, ''), "
                         "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint "
                         "FROM pg_replication_slots "
                         f"WHERE slot_name = {_literal(slot_name(settings))}").strip()
    if not row:
        return None
    active, wal_status, retained = row.split("|")
    return Slot(active == "t", wal_status, int(retained))


def slot_line(slot: Slot | None, name: str) -> str:
    """`cdc status`'s line for the slot (pure)."""
    if slot is None:
        return f"{name}: none (the connector creates it)"
    line = (f"{name}: {'active' if slot.active else 'inactive'}, WAL {slot.wal_status or '?'}, "
            f"retains {slot.retained_bytes / 2 ** 20:.1f} MiB")
    if slot.wal_status == "lost":
        line += (" — invalidated: the changes since are gone from the WAL; "
                 "`clickloop cdc resnapshot` starts the connector over with a new snapshot")
    elif not slot.active:
        line += " — nothing reads it: it holds WAL back until a connector resumes or it is dropped"
    return line


def status(settings: Settings) -> dict[str, str]:
    pg = postgres_service(settings)
    up = pg_ready(settings)
    pg_line = (f"{'up' if up else 'down'} at {settings.pg_host}:{settings.pg_port} "
               f"database {settings.pg_database}"
               + (f" (log {pg.state_dir / 'postgres.log'})" if managed_postgres(settings) else ""))
    out = {"postgres": pg_line}
    if up:
        try:
            out["slot"] = slot_line(slot_status(settings), slot_name(settings))
        except InfraError as exc:  # no right to read pg_replication_slots, psql missing
            out["slot"] = f"{slot_name(settings)}: unknown ({exc})"
    if connect_ready(settings):
        state = connector_state(settings)
        conn = ("not registered" if state is None else
                f"{state['connector']['state']}, tasks "
                f"{','.join(t['state'] for t in state['tasks']) or 'none'}")
        if "no longer available on the server" in (_failed_trace(state) or ""):
            conn += (" — its position is gone from the server (a lost or dropped slot): "
                     "`clickloop cdc resnapshot` starts it over with a new snapshot")
        out["connect"] = (f"up at {connect_url(settings)} (log "
                          f"{connect_service(settings).state_dir / 'connect.log'})")
        out["connector"] = f"{connector_name(settings)}: {conn}; topics {topic_prefix(settings)}.<schema>.<table>"
    else:
        out["connect"] = f"down at {connect_url(settings)}"
    return out
