"""`clickloop up`, the README's main command, as a user runs it: one process that
starts every worker and the three services (Kafka and Redis are the session's,
which `up` finds running and leaves alone), `clickloop demo` posting traffic
through the collector, and the loop closing: sessions committed on `sessions`,
Parquet in the archive, the features worker's popular list served by the
recommender, the experiments service answering. Then SIGINT stops it all."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from services.infra import free_port, port_open
from streams import PROCESSORS, topics
from tests.integration.helpers import eventually, read_topic

pytestmark = pytest.mark.integration


async def get_json(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return resp.status, await resp.json()


@pytest.mark.parametrize("workers", [1, 2])
async def test_up_runs_the_whole_loop_and_stops_on_ctrl_c(settings, tmp_path, workers):
    """With one process per service, and with the collector and the recommender as two
    workers each (their supervisors stop them when `up` stops: every port closes)."""
    ports = {name: free_port() for name in ("collector", "recommender", "experiments")}
    settings = dataclasses.replace(settings, collector_port=ports["collector"],
                                   recommender_port=ports["recommender"],
                                   experiments_port=ports["experiments"],
                                   collector_workers=workers, recommender_workers=workers)
    env = {**os.environ, **settings.as_env(), "CLICKLOOP_ARCHIVE_INTERVAL_S": "2",
           "CLICKLOOP_POPULAR_REFRESH_MS": "500", "CLICKLOOP_LOG_LEVEL": "warning"}
    env.pop("CLICKLOOP_WRITE_KEYS", None)   # `up` makes one and `demo` finds it
    cli = [sys.executable, "-m", "services.cli"]
    log = tmp_path / "up.log"
    up = subprocess.Popen([*cli, "up"], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        banner = await eventually(lambda: _text(log), lambda t: "clickloop is up" in t or up.poll() is not None,
                                  timeout_s=60, what="the banner")
        assert up.poll() is None, banner
        assert (banner.count("(2 workers)") == 2) is (workers == 2), banner
        await eventually(_async(lambda: all(port_open("127.0.0.1", p) for p in ports.values())),
                         bool, timeout_s=60, what="the three services listening")

        demo = subprocess.run([*cli, "demo", "--events", "3000", "--rate", "3000"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert demo.returncode == 0, demo.stderr[-2000:]

        sessions = await read_topic(settings.kafka_bootstrap, settings.topic(topics.SESSIONS),
                                    lambda v: len(v) >= 20, timeout_s=90)
        assert all(s["event_count"] >= 1 and s["visitor"] for s in sessions[:20])

        rec = f"http://127.0.0.1:{ports['recommender']}/v1/recommendations?user_id=user-00001&k=5"
        status, body = await eventually(lambda: get_json(rec), lambda r: bool(r[1].get("items")),
                                        timeout_s=60, what="popular items served")
        # No model was trained: the popular list the features worker keeps in Redis.
        assert status == 200 and body["path"] == "fallback" and body["source"] == "popular"
        assert body["reason"] == "no_model" and len(body["items"]) == 5

        status, _ = await get_json(f"http://127.0.0.1:{ports['experiments']}/v1/experiments")
        assert status == 200

        archive = Path(settings.archive_root)
        files = await eventually(_async(lambda: list(archive.rglob("*.parquet"))), bool,
                                 timeout_s=60, what="Parquet files in the archive")
        assert files

        out = _text_now(log)
        for processor in PROCESSORS:
            if processor != "cdc_history":
                assert f"{processor} exited" not in out, out[-3000:]
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert code == 0, _text_now(log)[-3000:]
    assert not any(port_open("127.0.0.1", p) for p in ports.values()), "a service outlived `up`"


def _text_now(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _text(path: Path) -> str:
    return _text_now(path)


def _async(fn):
    async def probe():
        return fn()
    return probe
