"""The dashboard in a real browser: `clickloop serve experiments` as a process, an
experiment created and started through the API, a `bandit.posteriors` snapshot on
the real broker, and Debian's headless Chromium rendering the page. The DOM it
dumps after the scripts ran must hold the plots: an SVG per chart with a data
path per arm, and the sample-ratio-mismatch banner exactly when the split is off."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from services.infra import free_port
from streams import topics
from tests.integration.helpers import eventually

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
ARMS = ("popular", "personalized")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium package is missing: `make setup` installs it (apt-get install chromium)"
    return path


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Dom(HTMLParser):
    """Elements of the rendered DOM as (tag, attributes, enclosing svg's data-plot), and
    the text inside each element that has an id."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict, str | None]] = []
        self.text: dict[str, str] = {}
        self._plot: str | None = None
        self._open: list[tuple[str, str | None]] = []   # (tag, id) of open elements

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self._plot = a.get("data-plot")
        self.elements.append((tag, a, self._plot))
        if a.get("id"):
            self.text.setdefault(a["id"], "")
        if tag not in VOID:
            self._open.append((tag, a.get("id")))

    def handle_startendtag(self, tag, attrs):  # <path .../> inside svg
        a = dict(attrs)
        self.elements.append((tag, a, self._plot))

    def handle_endtag(self, tag):
        if tag == "svg":
            self._plot = None
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for _, element_id in self._open:
            if element_id:
                self.text[element_id] += data


def render(url: str) -> Dom:
    """The DOM after the page's scripts ran (the virtual-time budget lets its fetch finish)."""
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-dev-shm-usage", "--virtual-time-budget=15000", "--dump-dom", url],
                         capture_output=True, timeout=90, check=True)
    dom = Dom()
    dom.feed(out.stdout.decode())
    return dom


def data_paths(dom: Dom, plot: str) -> dict[str, str]:
    """arm -> the `d` of the plot's line for that arm."""
    return {a["data-arm"]: a.get("d", "") for tag, a, p in dom.elements
            if tag == "path" and p == plot and a.get("class") == "series" and a.get("data-arm")}


@pytest.fixture
def service(settings, tmp_path):
    """`clickloop serve experiments` on a free port, as a process (the CLI path users run)."""
    port = free_port()
    s = dataclasses.replace(settings, experiments_port=port)
    with open(tmp_path / "experiments.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "experiments"],
                                env={**os.environ, **s.as_env()}, stdout=log, stderr=subprocess.STDOUT)
    yield s, f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def posterior(exp_id: str, days: dict[str, tuple[int, int, int, int]]) -> dict:
    """A bandit.posteriors record (schemas/posteriors.py) from per-day counts
    (exposures A, clicks A, exposures B, clicks B)."""
    tot = [sum(d[i] for d in days.values()) for i in range(4)]
    n, c = [tot[0], tot[2]], [tot[1], tot[3]]
    return {"v": 1, "experiment": exp_id, "version": 4, "arms": list(ARMS),
            "alpha": [1.0 + k for k in c], "beta": [1.0 + m - k for m, k in zip(n, c)],
            "exposures": n, "clicks": c, "prob_best": [0.01, 0.99], "champion": ARMS[1],
            "value_remaining": 0.03, "stop": False, "draws": 10_000, "seed": 77, "as_of": 0,
            "daily": {day: {ARMS[0]: {"exposures": a, "clicks": b}, ARMS[1]: {"exposures": x, "clicks": y}}
                      for day, (a, b, x, y) in days.items()}}


async def start_experiment(http: aiohttp.ClientSession, base: str, exp_id: str, surface: str) -> None:
    body = {"id": exp_id, "name": f"Dashboard {exp_id}", "owner": "ann", "hypothesis": "h",
            "surface": surface, "arms": [{"name": ARMS[0], "weight": 1}, {"name": ARMS[1], "weight": 1}],
            "planned_end": int(time.time() * 1000) + 7 * DAY_MS}
    async with http.post(f"{base}/v1/experiments", data=orjson.dumps(body)) as resp:
        assert resp.status == 201, await resp.text()
    async with http.post(f"{base}/v1/experiments/{exp_id}/start") as resp:
        assert resp.status == 200, await resp.text()


async def test_dashboard_renders_the_plots_and_the_srm_banner(service):
    settings, base = service
    async with aiohttp.ClientSession() as http:
        async def health():
            try:
                async with http.get(f"{base}/health") as resp:
                    return resp.status
            except aiohttp.ClientError:
                return None
        await eventually(health, lambda s: s == 200, 60, "experiments service up")
        await start_experiment(http, base, "skewed", "home.recommendations")
        await start_experiment(http, base, "balanced", "search.results")
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            # 1,230 vs 915 exposures planned 50:50: a sample ratio mismatch (p ~ 1e-11).
            skewed = posterior("skewed", {"2026-11-23": (400, 20, 300, 24), "2026-11-24": (420, 22, 310, 28),
                                          "2026-11-25": (410, 19, 305, 30)})
            balanced = posterior("balanced", {"2026-11-24": (500, 25, 505, 30), "2026-11-25": (510, 26, 498, 33)})
            for snap in (skewed, balanced):
                await producer.send_and_wait(settings.topic(topics.BANDIT_POSTERIORS), orjson.dumps(snap),
                                             key=snap["experiment"].encode())
        finally:
            await producer.stop()

        async def versions():
            out = []
            for exp in ("skewed", "balanced"):
                async with http.get(f"{base}/v1/experiments/{exp}/results?draws=100") as resp:
                    out.append((await resp.json())["snapshot"]["version"])
            return out
        await eventually(versions, lambda v: v == [4, 4], 30, "snapshots consumed")

    dom = await asyncio.to_thread(render, f"{base}/experiments/skewed")
    assert not dom.text.get("error"), dom.text.get("error")
    plots = {a["data-plot"] for tag, a, _ in dom.elements if tag == "svg"}
    assert plots == {"density", "share", "regret", "pvalue", "interval", "rates"}
    for plot in ("density", "share", "rates"):
        paths = data_paths(dom, plot)
        assert set(paths) == set(ARMS), (plot, paths)
        for arm, d in paths.items():
            points = d.count("L") + 1
            assert d.startswith("M") and points >= (200 if plot == "density" else 3), (plot, arm, d[:80])
    assert set(data_paths(dom, "pvalue")) == {ARMS[1]} and set(data_paths(dom, "interval")) == {ARMS[1]}
    regret = [a["d"] for tag, a, p in dom.elements if tag == "path" and p == "regret" and a.get("class") == "series"]
    assert len(regret) == 1 and regret[0].count("L") == 2
    banner = [a for tag, a, _ in dom.elements if a.get("id") == "srm-banner"]
    assert len(banner) == 1 and banner[0]["data-level"] == "alert"
    assert "Sample ratio mismatch" in dom.text["srm-banner"]
    rows = [a["data-arm"] for tag, a, _ in dom.elements if tag == "tr" and a.get("data-arm")]
    assert rows == list(ARMS)

    calm = await asyncio.to_thread(render, f"{base}/experiments/balanced")
    assert set(data_paths(calm, "density")) == set(ARMS)
    assert not [a for _, a, _ in calm.elements if a.get("id") == "srm-banner"]

    listing = await asyncio.to_thread(render, f"{base}/")
    listed = {a["data-experiment"]: a["data-status"] for tag, a, _ in listing.elements
              if tag == "tr" and a.get("data-experiment")}
    assert listed == {"skewed": "running", "balanced": "running"}
