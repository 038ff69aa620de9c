"""`clickloop serve collector` with two workers against the real broker: both take
connections on the one port, every acknowledged event reaches `clicks`, /metrics from
either worker counts them all, SIGTERM stops both."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid

import orjson
import pytest

from services.infra import free_port
from tests.integration.helpers import eventually
from tests.integration.test_collector import read_records, track
from tests.integration.test_recommender_workers import afetch

pytestmark = pytest.mark.integration
KEY = "workers-write-key"


def post(port: int, body: bytes) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/batch", data=body, method="POST",
        headers={"Content-Type": "application/json",
                 "Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()})
    with urllib.request.urlopen(req, timeout=10) as resp:  # a connection of its own
        return resp.status


async def pids_seen(port: int, tries: int = 30) -> set[int]:
    seen = set()
    for _ in range(tries):
        try:
            seen.add(orjson.loads(await afetch(port, "/health"))["worker"]["pid"])
        except OSError:  # 503 until its producer is connected, or not listening yet
            continue
    return seen


async def test_two_collector_workers_one_port_every_event_counted(settings, tmp_path):
    port = free_port()
    s = dataclasses.replace(settings, write_keys=(KEY,), collector_workers=2, collector_port=port)
    log = open(tmp_path / "collector.log", "wb")
    sup = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "collector"],
                           env={**os.environ, **s.as_env()}, stdout=log, stderr=subprocess.STDOUT)
    try:
        pids = await eventually(lambda: pids_seen(port), lambda seen: len(seen) == 2, 60,
                                "both collector workers connected")
        statuses = await asyncio.gather(*(
            asyncio.to_thread(post, port, orjson.dumps({"batch": [
                track(f"u{b}", f"m-{b}-{i}-{uuid.uuid4().hex[:6]}") for i in range(10)]}))
            for b in range(30)))
        assert statuses == [200] * 30
        got = await read_records(s.kafka_bootstrap, s.topic("clicks"), 300)
        assert sum(len(v["events"]) for _, _, v in got) == 300
        for _ in range(6):  # whichever worker answers
            metrics = await afetch(port, "/metrics")
            accepted = re.search(rb"^clickloop_collector_events_accepted_total (\S+)$", metrics, re.M)
            assert accepted and float(accepted.group(1)) == 300
            assert set(int(p) for p in re.findall(
                rb'^clickloop_collector_kafka_ready\{pid="(\d+)"\} 1.0$', metrics, re.M)) == pids
    finally:
        sup.send_signal(signal.SIGTERM)
        code = sup.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "collector.log").read_text()[-3000:]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
