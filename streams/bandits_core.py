"""Bandits: rewards folded into Beta posteriors per (experiment, arm). Pure.

Per experiment: per arm the exposures rewarded and the clicks (rewards of 1),
so alpha = 1 + clicks and beta = 1 + exposures - clicks (prior Beta(1, 1)),
and a daily history (UTC day of the exposure -> arm -> exposures, clicks).

Snapshots (schemas/posteriors.py) are published at most every `publish_ms`
per experiment, and at once when the stop rule's verdict changes (checked at
most every `check_ms`): `services.experiments.bandit.assess` gives P(best),
value remaining and the stop flag from a Monte Carlo whose seed is derived
from (experiment, version), so a replay of the same rewards publishes the same
numbers. `now_ms` is a monotonic clock passed in by the worker; it only paces
publishing, never enters a snapshot.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import orjson

from schemas.posteriors import SCHEMA_VERSION, Posterior
from schemas.rewards import Reward
from services.experiments import bandit
from services.experiments.seeding import MAX_SEED
from streams.codec import BadRecord

DAY_MS = 86_400_000
# Arms are known from their rewards only (an arm without rewards is absent, at its
# prior): with one arm seen, assess() has nothing left to learn and would say stop.
MIN_ARMS_TO_STOP = 2


@dataclass(frozen=True, slots=True)
class BanditsConfig:
    publish_ms: int = 1000
    check_ms: int = 100
    draws: int = bandit.DEFAULT_DRAWS


def snapshot_seed(experiment: str, version: int) -> int:
    digest = hashlib.blake2b(f"{experiment}:{version}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & MAX_SEED


def utc_day(ts_ms: int) -> str:
    return _day(ts_ms // DAY_MS)


@lru_cache(maxsize=64)
def _day(days: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=days)).isoformat()


def decode_reward(value: bytes | None) -> Reward:
    try:
        reward = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON: {exc}") from None
    if not isinstance(reward, dict) or not isinstance(reward.get("experiment"), str) \
            or not isinstance(reward.get("arm"), str) or reward.get("reward") not in (0, 1) \
            or type(reward.get("reward")) is not int or type(reward.get("exposure_ts")) is not int \
            or type(reward.get("reward_ts")) is not int:
        raise BadRecord("not a Reward: needs experiment, arm, reward 0 or 1, integer exposure_ts "
                        "and reward_ts")
    return reward  # type: ignore[return-value]


@dataclass(slots=True)
class ExperimentPosterior:
    """The folded rewards of one experiment and what was last published of it."""

    arms: dict[str, list[int]] = field(default_factory=dict)              # arm -> [exposures, clicks]
    daily: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # day -> arm -> [n, clicks]
    as_of: int = 0
    version: int = 0                # of the last published snapshot
    stop: bool = False              # its stop flag
    unpublished: bool = False       # folded rewards not in a published snapshot yet

    def add(self, reward: Reward) -> None:
        clicked = reward["reward"]
        counts = self.arms.setdefault(reward["arm"], [0, 0])
        counts[0] += 1
        counts[1] += clicked
        day = self.daily.setdefault(utc_day(reward["exposure_ts"]), {}).setdefault(reward["arm"], [0, 0])
        day[0] += 1
        day[1] += clicked
        if reward["reward_ts"] > self.as_of:
            self.as_of = reward["reward_ts"]
        self.unpublished = True

    def posterior(self) -> tuple[list[str], list[float], list[float]]:
        names = sorted(self.arms)
        return (names, [1.0 + self.arms[a][1] for a in names],
                [1.0 + self.arms[a][0] - self.arms[a][1] for a in names])

    def to_json(self) -> bytes:
        return orjson.dumps({"arms": self.arms, "daily": self.daily, "as_of": self.as_of,
                             "version": self.version, "stop": self.stop,
                             "unpublished": self.unpublished})

    @classmethod
    def from_json(cls, data: bytes) -> "ExperimentPosterior":
        return cls(**orjson.loads(data))


def snapshot(experiment: str, post: ExperimentPosterior, version: int, draws: int) -> Posterior:
    names, alpha, beta = post.posterior()
    seed = snapshot_seed(experiment, version)
    state = bandit.assess(alpha, beta, draws=draws, seed=seed)
    return {"v": SCHEMA_VERSION, "experiment": experiment, "version": version, "arms": names,
            "alpha": alpha, "beta": beta, "exposures": [post.arms[a][0] for a in names],
            "clicks": [post.arms[a][1] for a in names], "prob_best": list(state.prob_best),
            "champion": names[state.champion], "value_remaining": state.value_remaining,
            "stop": state.stop and len(names) >= MIN_ARMS_TO_STOP, "draws": state.draws,
            "seed": seed, "as_of": post.as_of,
            "daily": {day: {arm: {"exposures": n, "clicks": c} for arm, (n, c) in sorted(arms.items())}
                      for day, arms in sorted(post.daily.items())}}


class PartitionBandits:
    """The experiments of one `rewards` partition and the next input offset to apply."""

    def __init__(self, config: BanditsConfig, next_offset: int = 0) -> None:
        self.config = config
        self.next_offset = next_offset
        self.experiments: dict[str, ExperimentPosterior] = {}
        self._last_publish: dict[str, int] = {}     # experiment -> now_ms of its last snapshot
        self._last_check: dict[str, int] = {}
        self._dirty: set[str] = set()

    def add(self, reward: Reward) -> None:
        experiment = reward["experiment"]
        post = self.experiments.get(experiment)
        if post is None:
            post = self.experiments[experiment] = ExperimentPosterior()
        post.add(reward)
        self._dirty.add(experiment)

    def due(self, now_ms: int) -> list[Posterior]:
        """Snapshots to publish now: experiments with unpublished rewards whose last snapshot
        is `publish_ms` old, or whose stop verdict changed (checked every `check_ms`)."""
        cfg = self.config
        out = []
        for experiment, post in self.experiments.items():
            if not post.unpublished:
                continue
            last = self._last_publish.get(experiment)
            if last is None or now_ms - last >= cfg.publish_ms:
                out.append(self._publish(experiment, post, None, now_ms))
                continue
            checked = self._last_check.get(experiment, last)
            if now_ms - checked < cfg.check_ms:
                continue
            self._last_check[experiment] = now_ms
            # The check uses the next snapshot's seed: if it fires, it is that snapshot.
            candidate = snapshot(experiment, post, post.version + 1, cfg.draws)
            if candidate["stop"] != post.stop:
                out.append(self._publish(experiment, post, candidate, now_ms))
        return out

    def _publish(self, experiment: str, post: ExperimentPosterior, snap: Posterior | None,
                 now_ms: int) -> Posterior:
        if snap is None:
            snap = snapshot(experiment, post, post.version + 1, self.config.draws)
        post.version, post.stop, post.unpublished = snap["version"], snap["stop"], False
        self._last_publish[experiment] = self._last_check[experiment] = now_ms
        self._dirty.add(experiment)
        return snap

    def take_dirty(self) -> list[tuple[bytes, bytes | None]]:
        entries = [(e.encode(), self.experiments[e].to_json()) for e in self._dirty]
        self._dirty.clear()
        return entries

    def load(self, experiment: str, state: bytes) -> None:
        self.experiments[experiment] = ExperimentPosterior.from_json(state)

    def meta(self) -> dict:
        return {"next_offset": self.next_offset}


def fold(rewards) -> dict[str, ExperimentPosterior]:
    """The offline recomputation: every reward folded in, nothing published."""
    part = PartitionBandits(BanditsConfig())
    for reward in rewards:
        part.add(reward)
    return part.experiments
