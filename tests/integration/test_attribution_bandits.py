"""Attribution and bandits workers on the real broker: `exposures` + `clicks` → `rewards`
→ `bandit.posteriors`, compared with an offline recomputation by the pure cores."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import time

import orjson
import pytest

from bench._common import produce
from services.demo import partition_of
from services.settings import Settings
from streams import attribution, topics
from streams.attribution_core import PartitionAttribution, decode_exposure
from streams.bandits_core import fold, snapshot_seed
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration

MIN = 60_000
ARMS = {"exp-a": {"popular": 0.2, "personal": 0.35}, "exp-b": {"x": 0.1, "y": 0.1, "z": 0.3}}


@dataclasses.dataclass
class Traffic:
    exposures: list[tuple[int, bytes, bytes]]           # (partition, key, value)
    clicks: list[tuple[int, bytes | None, bytes]]


def traffic(exposures: int, partitions: int, seed: int, window_ms: int, per_record: int = 40) -> Traffic:
    """Exposures over two hours of event time (some outside experiments), the visitors'
    clicks on shown items (some after the window) and other events; each topic in event
    time order per partition, ending with a tick per partition that closes every window."""
    rng = random.Random(seed)
    # Far enough back that the closing ticks (~3 h 15 min on) are in the past: the
    # processors refuse events stamped after their record (CLICKLOOP_MAX_CLOCK_AHEAD_S).
    start = int(time.time() * 1000) - 5 * 3_600_000
    visitors = [f"v{n}" for n in range(max(50, exposures // 10))]
    xs, events = [], []
    for n in range(exposures):
        ts = start + rng.randrange(2 * 3_600_000)
        visitor = rng.choice(visitors)
        experiment = rng.choice([*ARMS, None])
        arm = rng.choice(list(ARMS[experiment])) if experiment else None
        items = [f"i{k}" for k in rng.sample(range(40), 5)]
        xs.append((ts, visitor, {
            "v": 1, "request_id": f"req-{seed}-{n}", "ts": ts, "visitor": visitor, "user_id": visitor,
            "anonymous_id": None, "k": 5, "model": None, "model_version": None, "path": "model",
            "items": [{"item_id": i, "position": p, "score": 1.0 - p / 10} for p, i in enumerate(items)],
            "reason": None, "source": "online", "experiment": experiment, "arm": arm}))
        if rng.random() < 0.03:  # served again under the same request id (a client's retry)
            again = ts + rng.randrange(1, 5000)
            xs.append((again, visitor, {**xs[-1][2], "ts": again}))
        ctr = ARMS[experiment][arm] if experiment else 0.2
        if rng.random() < ctr * 1.3:  # about a quarter of these land after the window
            events.append(click_event(visitor, ts + rng.randrange(int(window_ms * 1.3)),
                                      rng.choice(items), "Product Clicked", n))
        events.append(click_event(visitor, ts + rng.randrange(window_ms), rng.choice(items),
                                  "Product Viewed", n))
    xs.sort(key=lambda x: x[0])
    events.sort(key=lambda e: e["timestamp"])
    end = max(e["timestamp"] for e in events) + window_ms + 5 * MIN
    ticks, k = {}, 0
    while len(ticks) < partitions:
        k += 1
        ticks.setdefault(partition_of(f"tick{k}", partitions), f"tick{k}")
    events += [click_event(v, end, None, "Page Viewed", p) for p, v in ticks.items()]
    buffers: dict[int, list] = {}
    clicks = []
    for event in events:
        p = partition_of(event["user_id"], partitions)
        buffers.setdefault(p, []).append(event)
        if len(buffers[p]) >= per_record:
            clicks.append((p, None, orjson.dumps({"v": 1, "events": buffers.pop(p)})))
    clicks += [(p, None, orjson.dumps({"v": 1, "events": b})) for p, b in buffers.items()]
    return Traffic([(partition_of(v, partitions), v.encode(), orjson.dumps(x)) for _, v, x in xs],
                   clicks)


def click_event(visitor: str, ts: int, item: str | None, name: str, n: int) -> dict:
    return {"message_id": f"m-{visitor}-{ts}-{name}-{n}", "type": "track", "event": name,
            "user_id": visitor, "anonymous_id": f"anon-{visitor}", "timestamp": ts,
            "received_at": ts, "context": {}, "properties": {"item_id": item} if item else {}}


def offline_rewards(data: Traffic, settings: Settings) -> list[dict]:
    """What one uninterrupted run rewards: the pure core per partition, all exposures
    first, then all clicks (the core's result does not depend on the interleaving)."""
    cfg = attribution.config(settings)
    rewards = []
    for p in range(settings.partitions):
        part = PartitionAttribution(cfg)
        for partition, _, value in data.exposures:
            if partition == p:
                rewards += part.process_exposure(decode_exposure(value))[0].rewards
        for partition, _, value in data.clicks:
            if partition == p:
                rewards += part.process_clicks_record(value).rewards
    return rewards


def by_request(rewards: list[dict]) -> list[dict]:
    return sorted(rewards, key=lambda r: r["request_id"])


async def latest_posteriors(settings: Settings, wanted: dict[str, int], timeout_s: float = 60) -> dict:
    """Every committed snapshot, until each experiment's latest has `wanted` exposures."""
    def latest(values):
        out = {}
        for snap in values:
            out[snap["experiment"]] = snap
        return out

    def done(values):
        got = latest(values)
        # `>=`: a double count must fail the comparison below, not time out here.
        return all(e in got and sum(got[e]["exposures"]) >= n for e, n in wanted.items())

    values = await read_topic(settings.kafka_bootstrap, settings.topic(topics.BANDIT_POSTERIORS),
                              done, timeout_s)
    return {"all": values, "latest": latest(values)}


def check_posteriors(snapshots: dict, expected_rewards: list[dict]) -> None:
    expected = fold(expected_rewards)
    latest = snapshots["latest"]
    assert set(latest) == set(expected)
    for experiment, post in expected.items():
        names, alpha, beta = post.posterior()
        snap = latest[experiment]
        assert (snap["arms"], snap["alpha"], snap["beta"]) == (names, alpha, beta), experiment
        assert snap["exposures"] == [post.arms[a][0] for a in names]
        assert snap["clicks"] == [post.arms[a][1] for a in names]
        assert {d: {a: [c["exposures"], c["clicks"]] for a, c in arms.items()}
                for d, arms in snap["daily"].items()} == post.daily
    versions: dict[str, list[int]] = {}
    for snap in snapshots["all"]:
        versions.setdefault(snap["experiment"], []).append(snap["version"])
        assert snap["seed"] == snapshot_seed(snap["experiment"], snap["version"])
    for experiment, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"{experiment}: versions {seen}"


async def test_rewards_and_posteriors_equal_the_offline_recomputation(settings, workers):
    settings = dataclasses.replace(settings, partitions=2)
    workers.settings = settings
    await topics.ensure_topics(settings)
    data = traffic(4000, settings.partitions, seed=7, window_ms=settings.attribution_window_s * 1000)
    expected = offline_rewards(data, settings)
    assert 0.1 < sum(r["reward"] for r in expected) / len(expected) < 0.5
    served = [orjson.loads(v) for _, _, v in data.exposures]
    once = {(x["visitor"], x["request_id"]) for x in served if x["experiment"]}
    assert sum(x["experiment"] is not None for x in served) > len(once) == len(expected), \
        "retried exposures are in the traffic, and each exposure is rewarded once"
    bad_exposure = (0, b"v1", b'{"not": "an exposure"}')
    await produce(settings, settings.topic(topics.EXPOSURES), data.exposures[:10] + [bad_exposure]
                  + data.exposures[10:])
    await produce(settings, settings.topic(topics.CLICKS), data.clicks)
    await produce(settings, settings.topic(topics.REWARDS), [(0, b"exp-a", b'{"experiment": "exp-a"}')])
    workers.start("attribution")
    workers.start("bandits")

    got = await read_topic(settings.kafka_bootstrap, settings.topic(topics.REWARDS),
                           lambda v: len(v) >= len(expected) + 1, timeout_s=90)
    # The bad record produced straight to `rewards` above is the first value read.
    rewards = [r for r in got if isinstance(r, dict) and "request_id" in r]
    assert by_request(rewards) == by_request(expected), "rewards differ from the offline run"

    wanted = {e: sum(1 for r in expected if r["experiment"] == e) for e in ARMS}
    check_posteriors(await latest_posteriors(settings, wanted), expected)

    dlq = await read_topic(settings.kafka_bootstrap, settings.topic(topics.EXPOSURES_DLQ),
                           lambda v: len(v) >= 1)
    offset = sum(1 for partition, _, _ in data.exposures[:10] if partition == 0)
    assert dlq[0]["position"] == f"{settings.topic(topics.EXPOSURES)}[0]@{offset}"
    assert "not an Exposure" in dlq[0]["error"]
    rdlq = await read_topic(settings.kafka_bootstrap, settings.topic(topics.REWARDS_DLQ),
                            lambda v: len(v) >= 1)
    assert rdlq[0]["position"] == f"{settings.topic(topics.REWARDS)}[0]@0"
    assert "not a Reward" in rdlq[0]["error"]

    # A burst of clicked exposures: how long from Kafka to a committed snapshot.
    # (after the closing ticks: an exposure whose window the click watermark has passed
    # is decided at once, before its click could arrive)
    last = max(e["timestamp"] for _, _, v in data.clicks for e in orjson.loads(v)["events"])
    burst = [{**orjson.loads(data.exposures[0][2]), "request_id": f"burst-{n}", "ts": last + MIN,
              "visitor": f"b{n}", "user_id": f"b{n}", "experiment": "exp-a", "arm": "popular"}
             for n in range(50)]
    clicks = [click_event(x["visitor"], last + MIN + 1000, x["items"][0]["item_id"], "Product Clicked", 0)
              for x in burst]
    before = sum(1 for r in expected if r["experiment"] == "exp-a")
    t0 = time.monotonic()
    await produce(settings, settings.topic(topics.EXPOSURES),
                  [(partition_of(x["visitor"], 2), x["visitor"].encode(), orjson.dumps(x)) for x in burst])
    await produce(settings, settings.topic(topics.CLICKS),
                  [(partition_of(c["user_id"], 2), c["user_id"].encode(),
                    orjson.dumps({"v": 1, "events": [c]})) for c in clicks])
    snaps = await latest_posteriors(settings, {"exp-a": before + 50}, timeout_s=30)
    elapsed = time.monotonic() - t0
    snap = snaps["latest"]["exp-a"]
    assert sum(snap["exposures"]) == before + 50
    assert snap["clicks"][snap["arms"].index("popular")] == \
        sum(r["reward"] for r in expected if r["arm"] == "popular") + 50
    print(f"burst_to_posterior_s={elapsed:.2f}")
    # posterior_publish_ms (1 s) + two commits (250 ms each) + a reading consumer's poll.
    assert elapsed < 3.0, f"a reward burst took {elapsed:.2f} s to reach bandit.posteriors"



async def test_rewards_folded_but_not_yet_published_are_published_after_a_crash(settings, workers):
    """Rewards folded between two snapshots are committed with the state; a worker killed
    then publishes them on restart without waiting for another reward."""
    settings = dataclasses.replace(settings, posterior_publish_ms=600_000)
    workers.settings = settings
    await topics.ensure_topics(settings)
    ts = int(time.time() * 1000)
    rewards = [{"v": 1, "request_id": f"r{n}", "experiment": "exp-a",
                "arm": "popular" if n % 2 else "personal", "visitor": "v", "reward": int(n % 3 == 0), "exposure_ts": ts, "reward_ts": ts + n,
                "item": None, "position": None} for n in range(11)]
    record = lambda r: (0, b"exp-a", orjson.dumps(r))  # noqa: E731
    proc = workers.start("bandits")
    await produce(settings, settings.topic(topics.REWARDS), [record(rewards[0])])
    first = await latest_posteriors(settings, {"exp-a": 1}, timeout_s=30)
    assert [s["version"] for s in first["all"]] == [1], "the first reward publishes at once"
    await produce(settings, settings.topic(topics.REWARDS), [record(r) for r in rewards[1:]])
    # The folded counts reach the changelog (unpublished: the next snapshot is 10 min away).
    changelog = await read_topic(settings.kafka_bootstrap, settings.topic(topics.BANDITS_STATE),
                                 lambda v: any(e.get("arms", {}).get("popular", [0])[0] == 5
                                               for e in v if isinstance(e, dict)), timeout_s=30)
    assert any(e.get("unpublished") for e in changelog if isinstance(e, dict))
    await asyncio.sleep(3)  # Faust commits the input offsets: a restart has no record to read
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    workers.start("bandits")
    snaps = await latest_posteriors(settings, {"exp-a": 11}, timeout_s=30)
    check_posteriors(snaps, rewards)
