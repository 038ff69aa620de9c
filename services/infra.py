"""Local infrastructure: a real Apache Kafka broker (KRaft) and a real Redis server.

Used by `clickloop up`, `clickloop infra ...`, the test session and the
benchmarks, so there is one way to start them. Starting is idempotent (a
broker or server already answering is reused), stopping is clean (SIGTERM,
then SIGKILL after a timeout), and every failure names the log file to read.

The broker runs from the jars that deploy/kafka/pom.xml resolves from Maven
Central (`make setup` copies them to deploy/kafka/lib); Redis is Debian's
redis-server.
"""
from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from services.settings import REPO_ROOT, Settings

KAFKA_DIR = REPO_ROOT / "deploy" / "kafka"
REDIS_CONF = REPO_ROOT / "deploy" / "redis" / "redis.conf"


class InfraError(RuntimeError):
    """A local service could not be started or stopped; the message says where to look."""


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    host: str
    port: int
    state_dir: Path

    @property
    def pidfile(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.state_dir / ("server.log" if self.name == "kafka" else f"{self.name}.log")


def kafka_service(settings: Settings) -> Service:
    host, _, port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
    return Service("kafka", host or "127.0.0.1", int(port), settings.state_dir / "kafka")


def redis_service(settings: Settings) -> Service:
    from redis.connection import parse_url

    parsed = parse_url(settings.redis_url)
    return Service("redis", parsed.get("host", "127.0.0.1"), int(parsed.get("port", 6379)),
                   settings.state_dir / "redis")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (for a private server: a test's, a benchmark's)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


async def _kafka_metadata(bootstrap: str) -> int:
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await client.bootstrap()
        return len(client.cluster.brokers())
    finally:
        await client.close()


def kafka_ready(settings: Settings) -> bool:
    """True when the broker answers a metadata request (an open port is not enough)."""
    svc = kafka_service(settings)
    if not port_open(svc.host, svc.port):
        return False
    try:
        return asyncio.run(_kafka_metadata(settings.kafka_bootstrap)) > 0
    except Exception:
        return False


def redis_ready(settings: Settings) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(settings.redis_url, socket_timeout=1).ping())
    except Exception:
        return False


def _pid(svc: Service) -> int | None:
    try:
        pid = int(svc.pidfile.read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def wait_ready(ready, svc: Service, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise InfraError(f"{svc.name} exited with code {proc.returncode} while starting; "
                             f"see {svc.log}")
        time.sleep(0.3)
    raise InfraError(f"{svc.name} did not become ready on {svc.host}:{svc.port} within "
                     f"{timeout_s:.0f} s; see {svc.log}")


def _kafka_classpath() -> str:
    lib = KAFKA_DIR / "lib"
    if not any(lib.glob("kafka_2.13-*.jar")):
        raise InfraError(f"no broker jars in {lib}: run `make setup` (it runs "
                         f"`mvn dependency:copy-dependencies` in {KAFKA_DIR})")
    return f"{lib}/*"


def new_cluster_id(draw=uuid.uuid4) -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64, never starting with "-" (the
    storage tool would read it as an option and fail, once in 64 formats), as Kafka's own
    `Uuid.randomUuid` ensures."""
    while True:
        cid = base64.urlsafe_b64encode(draw().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def start_kafka(settings: Settings, timeout_s: float = 90) -> bool:
    """Start the broker unless one already answers; True when this call started it."""
    if kafka_ready(settings):
        return False
    svc = kafka_service(settings)
    if port_open(svc.host, svc.port):
        raise InfraError(f"{svc.host}:{svc.port} is taken by something that is not answering "
                         f"as a Kafka broker; stop it or set CLICKLOOP_KAFKA")
    if not shutil.which("java"):
        raise InfraError("java is not installed: run `make setup`")
    svc.state_dir.mkdir(parents=True, exist_ok=True)
    config = svc.state_dir / "server.properties"
    config.write_text((KAFKA_DIR / "server.properties").read_text()
                      .replace("${STATE_DIR}", str(settings.state_dir)))
    classpath = _kafka_classpath()
    java = ["java", "-Xms512m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={svc.state_dir}",
            f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.properties'}", "-cp", classpath]
    if not (svc.state_dir / "data" / "meta.properties").exists():
        fmt = subprocess.run([*java, "kafka.tools.StorageTool", "format", "--standalone",
                              "-t", new_cluster_id(), "-c", str(config)],
                             capture_output=True, text=True)
        if fmt.returncode != 0:
            (svc.state_dir / "format.log").write_text(fmt.stdout + fmt.stderr)
            raise InfraError(f"formatting the KRaft storage failed; see {svc.state_dir / 'format.log'}")
    out = open(svc.state_dir / "stdout.log", "ab")
    proc = subprocess.Popen([*java, "kafka.Kafka", str(config)], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    svc.pidfile.write_text(str(proc.pid))
    wait_ready(lambda: kafka_ready(settings), svc, proc, timeout_s)
    return True


def start_redis(settings: Settings, timeout_s: float = 20) -> bool:
    """Start redis-server unless one already answers; True when this call started it."""
    if redis_ready(settings):
        return False
    svc = redis_service(settings)
    binary = shutil.which("redis-server")
    if not binary:
        raise InfraError("redis-server is not installed: run `make setup` "
                         "(it installs Debian's redis-server package)")
    svc.state_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, str(REDIS_CONF), "--port", str(svc.port), "--bind", svc.host,
         "--dir", str(svc.state_dir), "--logfile", str(svc.log), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=open(svc.state_dir / "stderr.log", "ab"),
        start_new_session=True)
    svc.pidfile.write_text(str(proc.pid))
    wait_ready(lambda: redis_ready(settings), svc, proc, timeout_s)
    return True


def stop(svc: Service, timeout_s: float = 30) -> bool:
    """Stop a service this project started (found by its pidfile); True when one was running."""
    pid = _pid(svc)
    if pid is None:
        svc.pidfile.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:  # reap it when it is our own child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    svc.pidfile.unlink(missing_ok=True)
    return True


def start_all(settings: Settings) -> list[Service]:
    """Start Kafka and Redis as needed; returns the services this call started."""
    started = []
    if start_redis(settings):
        started.append(redis_service(settings))
    if start_kafka(settings):
        started.append(kafka_service(settings))
    return started


def stop_all(settings: Settings) -> None:
    stop(kafka_service(settings))
    stop(redis_service(settings))


def status(settings: Settings) -> dict[str, str]:
    return {
        "kafka": f"{'up' if kafka_ready(settings) else 'down'} at {settings.kafka_bootstrap} "
                 f"(log {kafka_service(settings).log})",
        "redis": f"{'up' if redis_ready(settings) else 'down'} at {settings.redis_url} "
                 f"(log {redis_service(settings).log})",
    }
