"""Experiments in the recommender: which arm a request is served, decided from memory.

Two halves:

* `Allocation` (pure but for its own state: the bandit samplers and the sticky
  map) decides per request, with no I/O: `decide(query, now_ms)` returns an
  `Assignment` (experiment, arm, kind, posterior version, seed, draw index) or
  None outside every experiment. It holds the running experiments of the
  recommender's surface (`settings.recommender_surface`), rebuilt by `update`.
* `ExperimentFeed` (I/O) consumes the compacted `experiments` topic (folded with
  `services.experiments.registry.apply`, exactly as every other reader does) and
  `bandit.posteriors` (the latest snapshot per experiment, highest version), both
  from the beginning, in a background task, and calls `Allocation.update` after
  every batch that changed something. The request path never waits for it.

Rules (README "Experiments in the recommender"):

* Unit: the experiment's `unit` names the query parameter (`user_id` or
  `anonymous_id`); a request without that id is not in the experiment.
* Population: requests carry no attributes, so the empty population `{}`
  (everyone) matches every request and any non-empty population matches none.
* Namespace: a unit outside the experiment's namespace range is not in it
  (allocation.py rule 4), for A/B and bandit experiments alike.
* Several running experiments on the surface (possible only in one namespace,
  on disjoint ranges: the registry's collision rule): the first by id that
  takes the unit wins.
* `ab`: `allocation.Allocator` (FNV-1a buckets): the same arm in every process,
  after every restart; the exposure's posterior_version, seed and draw are null.
* `thompson`: a `bandit.ThompsonSampler` over the latest posterior held, arms
  absent from the snapshot (or no snapshot yet: version 0) at Beta(1, 1). A new
  snapshot builds a new sampler with a fresh seed. The exposure records the
  posterior version, the sampler's seed and the draw index:
  `ThompsonSampler.replay(alpha, beta, seed, draw)` gives the arm again.
* `epsilon_greedy`: `EpsilonSampler` below (same recording, same replay idea),
  epsilon from the record (null: 0.05).
* Bandit arms are sticky per (experiment, unit) for `bandit_sticky_s` (0: no
  stickiness) in a bounded in-process map (`STICKY_CAPACITY` entries, the entry
  expiring soonest is evicted first); a sticky request repeats the first
  decision's whole assignment (version, seed, draw), so it replays too. The map
  is per process: after a restart, or on another replica, a unit may be drawn
  again (A/B is the sticky-everywhere kind).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import orjson

from schemas.experiments import Experiment
from services.experiments import ExperimentError, seeding
from services.experiments.allocation import Allocator, in_range
from services.experiments.bandit import DEFAULT_EPSILON, ThompsonSampler, as_posterior
from services.experiments.registry import Registry, apply
from services.recommender.follower import TopicFollower
from services.recommender.request import Query
from services.settings import Settings
from streams import topics

log = logging.getLogger("clickloop.recommender.experiments")
STICKY_CAPACITY = 100_000
BLOCK = 256
BANDIT_KINDS = frozenset({"thompson", "epsilon_greedy"})
NOT_APPLIED = "experiments not applied: "   # how last_error names them
KEPT = ("experiment", "version", "arms", "alpha", "beta", "exposures", "clicks")  # of a snapshot


@dataclass(frozen=True, slots=True)
class Assignment:
    """The arm a request was served and how it was chosen (what the exposure records)."""

    experiment: str
    arm: str
    kind: str
    posterior_version: int | None   # bandits: the snapshot's version (0: none yet, all Beta(1, 1))
    seed: int | None                # bandits: the sampler's seed
    draw: int | None                # bandits: the decision's index in that sampler


class EpsilonSampler:
    """Epsilon-greedy decisions for one posterior, drawn `block` at a time, replayable:
    per block, `u = rng.random(block)` then `r = rng.integers(n_arms, size=block)`;
    decision i explores (arm r[i]) when u[i] < epsilon, else plays the highest
    posterior mean (ties to the lowest index)."""

    __slots__ = ("alpha", "beta", "epsilon", "seed", "block", "greedy", "_rng", "_arms", "_next",
                 "_drawn")

    def __init__(self, alpha, beta, epsilon: float = DEFAULT_EPSILON, seed: int | None = None,
                 block: int = BLOCK) -> None:
        self.alpha, self.beta = as_posterior(alpha, beta)
        if not 0.0 <= epsilon <= 1.0:
            raise ExperimentError(f"epsilon must be in [0, 1], got {epsilon}")
        self.epsilon = epsilon
        self.seed, self._rng = seeding.resolve(seed)
        self.block = block
        self.greedy = int((self.alpha / (self.alpha + self.beta)).argmax())
        self._arms: list[int] = []
        self._next = 0
        self._drawn = 0

    @staticmethod
    def _draw_block(rng: np.random.Generator, n: int, epsilon: float, greedy: int,
                    block: int) -> np.ndarray:
        u = rng.random(block)
        r = rng.integers(n, size=block)
        return np.where(u < epsilon, r, greedy)

    def choose(self) -> tuple[int, int]:
        if self._next == len(self._arms):
            self._arms = self._draw_block(self._rng, self.alpha.size, self.epsilon, self.greedy,
                                          self.block).tolist()
            self._next = 0
        arm = self._arms[self._next]
        self._next += 1
        self._drawn += 1
        return arm, self._drawn - 1

    @staticmethod
    def replay(alpha, beta, epsilon: float, seed: int, index: int, block: int = BLOCK) -> int:
        a, b = as_posterior(alpha, beta)
        greedy = int((a / (a + b)).argmax())
        rng = np.random.default_rng(seed)
        for _ in range(index // block):
            EpsilonSampler._draw_block(rng, a.size, epsilon, greedy, block)
        return int(EpsilonSampler._draw_block(rng, a.size, epsilon, greedy, block)[index % block])


def posterior_arrays(arms: list[str], snapshot: Mapping | None) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta) in the experiment's arm order: the snapshot's values for the arms it
    holds, Beta(1, 1) for the others (and for all, without a snapshot)."""
    alpha, beta = np.ones(len(arms)), np.ones(len(arms))
    if snapshot is not None:
        index = {name: i for i, name in enumerate(snapshot["arms"])}
        for j, name in enumerate(arms):
            i = index.get(name)
            if i is not None:
                alpha[j], beta[j] = snapshot["alpha"][i], snapshot["beta"][i]
    return alpha, beta


class Live:
    """One running experiment as a request sees it."""

    __slots__ = ("id", "revision", "kind", "unit", "matches", "arms", "namespace", "allocator",
                 "sampler", "version", "epsilon", "alpha", "beta")

    def __init__(self, exp: Experiment, snapshot: Mapping | None, seed: int | None = None) -> None:
        self.id, self.revision, self.kind, self.unit = exp["id"], exp["revision"], exp["kind"], exp["unit"]
        # Requests carry no attributes: only the empty population (everyone) matches.
        self.matches = not exp["population"]
        self.arms = [arm["name"] for arm in exp["arms"]]
        ns = exp["namespace"]
        self.namespace = (ns["name"], ns["range"][0], ns["range"][1]) if ns is not None else None
        self.allocator: Allocator | None = None
        self.sampler: ThompsonSampler | EpsilonSampler | None = None
        self.version = self.epsilon = None
        self.alpha = self.beta = None
        if self.kind == "ab":
            self.allocator = Allocator(self.id, [arm["weight"] for arm in exp["arms"]], self.namespace)
            return
        self.version = snapshot["version"] if snapshot is not None else 0
        self.alpha, self.beta = posterior_arrays(self.arms, snapshot)
        if self.kind == "thompson":
            self.sampler = ThompsonSampler(self.alpha, self.beta, seed, BLOCK)
        else:
            eps = exp["epsilon"]
            self.epsilon = DEFAULT_EPSILON if eps is None else eps
            self.sampler = EpsilonSampler(self.alpha, self.beta, self.epsilon, seed, BLOCK)

    def describe(self) -> dict:
        return {"id": self.id, "revision": self.revision, "kind": self.kind, "unit": self.unit,
                "arms": self.arms, "population_matches": self.matches,
                "posterior_version": self.version,
                "seed": self.sampler.seed if self.sampler is not None else None,
                "alpha": None if self.alpha is None else self.alpha.tolist(),
                "beta": None if self.beta is None else self.beta.tolist()}


class Allocation:
    """The per-request decision over the surface's running experiments."""

    def __init__(self, surface: str, sticky_ms: int, capacity: int = STICKY_CAPACITY) -> None:
        self.surface = surface
        self.sticky_ms = sticky_ms
        self.capacity = capacity
        self.live: tuple[Live, ...] = ()
        # Running experiments on the surface that the last update could not apply, with why
        # (each is left out on its own; the others are allocated as usual).
        self.not_applied: dict[str, str] = {}
        # (experiment, unit) -> (until, assignment); insertion order = expiry order. An
        # OrderedDict: evicting the oldest of a plain dict (next(iter(d))) walks the
        # deleted slots at its front, 12 µs per request once full instead of 2.
        self.sticky: OrderedDict[tuple[str, str], tuple[int, Assignment]] = OrderedDict()

    def update(self, running: Iterable[Experiment], posteriors: Mapping[str, Mapping]) -> None:
        """Rebuild from the registry's running experiments (any surface; the others are
        ignored) and the latest snapshots. An experiment whose revision and posterior
        version did not change keeps its sampler (its seed, its draw count)."""
        old = {e.id: e for e in self.live}
        live = []
        not_applied = {}
        for exp in running:
            if exp["surface"] != self.surface or exp["status"] != "running":
                continue
            snap = posteriors.get(exp["id"])
            have = old.get(exp["id"])
            version = (snap["version"] if snap is not None else 0) if exp["kind"] in BANDIT_KINDS else None
            if have is not None and have.revision == exp["revision"] and have.version == version:
                live.append(have)
                continue
            try:
                live.append(Live(exp, snap))
            except Exception as exc:  # noqa: BLE001  one bad record loses only itself
                # e.g. a snapshot with a non-positive parameter; anything unexpected too: an
                # exception here would fail the whole feed and stop every experiment.
                not_applied[exp["id"]] = f"{type(exc).__name__}: {exc}"
                log.error("experiment %s not applied: %r", exp["id"], exc)
        self.live = tuple(sorted(live, key=lambda e: e.id))
        self.not_applied = not_applied
        gone = old.keys() - {e.id for e in self.live}
        if gone and self.sticky:
            self.sticky = OrderedDict((k, v) for k, v in self.sticky.items() if k[0] not in gone)

    def decide(self, query: Query, now_ms: int) -> Assignment | None:
        """The request's assignment, or None when no running experiment takes it."""
        for e in self.live:
            if not e.matches:
                continue
            unit = query.user_id if e.unit == "user_id" else query.anonymous_id
            if unit is None:
                continue
            if e.allocator is not None:
                arm = e.allocator(unit)
                if arm is None:
                    continue
                return Assignment(e.id, e.arms[arm], "ab", None, None, None)
            if e.namespace is not None and not in_range(unit, *e.namespace):
                continue
            key = (e.id, unit)
            held = self.sticky.get(key)
            if held is not None:
                if held[0] > now_ms:
                    return held[1]
                del self.sticky[key]
            sampler = e.sampler
            arm, draw = sampler.choose()  # type: ignore[union-attr]  # a bandit has one
            out = Assignment(e.id, e.arms[arm], e.kind, e.version,
                             sampler.seed, draw)  # type: ignore[union-attr]
            if self.sticky_ms > 0:
                if len(self.sticky) >= self.capacity:
                    self.sticky.popitem(last=False)
                self.sticky[key] = (now_ms + self.sticky_ms, out)
            return out
        return None


def valid_snapshot(value: object) -> dict:
    """A `bandit.posteriors` record the allocation can use, or ExperimentError."""
    if not isinstance(value, dict) or not isinstance(value.get("experiment"), str) \
            or type(value.get("version")) is not int or not isinstance(value.get("arms"), list):
        raise ExperimentError("not a posterior snapshot: needs experiment, integer version, arms")
    arms = value["arms"]
    if not all(isinstance(a, str) for a in arms):
        raise ExperimentError(f"arms must be a list of names, got {arms!r}")
    if not (isinstance(value.get("alpha"), list) and isinstance(value.get("beta"), list)
            and len(value["alpha"]) == len(value["beta"]) == len(arms)):
        raise ExperimentError("alpha and beta must be lists as long as arms")
    if arms:
        as_posterior(value["alpha"], value["beta"])
    return value


class ExperimentFeed:
    """Follows `experiments` and `bandit.posteriors` into an `Allocation`."""

    def __init__(self, settings: Settings, allocation: Allocation) -> None:
        self.settings = settings
        self.allocation = allocation
        self.registry = Registry()
        self.posteriors: dict[str, dict] = {}
        self.refused = 0           # registry records refused (the reason is logged)
        self.bad = 0               # unreadable records
        self.record_error: str | None = None   # the last record not folded, or NOT_APPLIED
        self.updates = 0
        self.unapplied = 0         # running experiments that an update could not apply
        # The broker answers a fetch as soon as records arrive; the wait only bounds idle
        # polls (50 ms made 20 fetches a second to decode on the serving loop, ~1 % of
        # its CPU at saturation; bench/bandit.py propagation stays ~1 s either way).
        self._follower = TopicFollower(settings, (topics.EXPERIMENTS, topics.BANDIT_POSTERIORS),
                                       self.fold, self._apply, "experiments feed",
                                       fetch_max_wait_ms=500)
        self.caught_up = self._follower.caught_up
        self.topics = self._follower.topics      # (experiments, bandit.posteriors), prefixed

    @property
    def last_error(self) -> str | None:
        """The feed being down (until it is back), and the last record error."""
        return " | ".join(e for e in (self._follower.error, self.record_error) if e) or None

    def fold(self, records) -> bool:
        """Fold a batch of records; True when the registry or a posterior changed."""
        changed = False
        for r in records:
            try:
                changed |= self._fold_one(r)
            except Exception as exc:  # noqa: BLE001  a record the rules did not foresee: it
                # alone is lost. Raised, it would fail the feed, which would reopen, read it
                # again and fail again, and no experiment on the surface would be allocated.
                self.bad += 1
                self.record_error = f"{r.topic}[{r.partition}]@{r.offset}: {exc!r}"
                log.exception("%s[%d]@%d: not folded", r.topic, r.partition, r.offset)
        return changed

    def _fold_one(self, r) -> bool:
        key = r.key.decode(errors="replace") if r.key is not None else None
        try:
            value = orjson.loads(r.value) if r.value is not None else None
        except orjson.JSONDecodeError:
            self.bad += 1
            log.error("%s[%d]@%d: not JSON", r.topic, r.partition, r.offset)
            return False
        if r.topic == self.topics[0]:
            state, refused = apply(self.registry, key, value)
            if refused:
                self.refused += 1
                log.warning("experiments record %s refused: %s", key, refused)
                return False
            changed = state is not self.registry
            self.registry = state
            return changed
        if value is None:       # a tombstone of a snapshot: back to the prior
            return key is not None and self.posteriors.pop(key, None) is not None
        try:
            snap = valid_snapshot(value)
        except ExperimentError as exc:
            self.bad += 1
            log.error("%s[%d]@%d: %s", r.topic, r.partition, r.offset, exc)
            return False
        have = self.posteriors.get(snap["experiment"])
        if have is None or snap["version"] > have["version"]:
            # what allocation and /v1/experiments use (not `daily`, which only grows)
            self.posteriors[snap["experiment"]] = {k: snap.get(k) for k in KEPT}
            return True
        return False

    def _apply(self) -> None:
        self.allocation.update(self.registry.running(self.allocation.surface), self.posteriors)
        self.updates += 1
        failed = self.allocation.not_applied
        self.unapplied += len(failed)
        if failed:
            self.record_error = NOT_APPLIED + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
        elif self.record_error is not None and self.record_error.startswith(NOT_APPLIED):
            self.record_error = None  # stopped or fixed since: the error no longer holds

    async def start(self, wait_s: float) -> None:
        if not await self._follower.start(wait_s):
            log.warning("experiments not caught up within %.0f s; serving without them until "
                        "they are", wait_s)

    async def stop(self) -> None:
        await self._follower.stop()

    def describe(self) -> dict:
        a = self.allocation
        return {"surface": a.surface, "caught_up": self.caught_up.is_set(),
                "sticky_s": a.sticky_ms // 1000, "sticky_units": len(a.sticky),
                "refused": self.refused, "bad_records": self.bad, "updates": self.updates,
                "error": self.last_error, "not_applied": dict(sorted(a.not_applied.items())),
                "not_applied_total": self.unapplied,
                "running": [e.describe() for e in a.live],
                "posteriors": {k: {"version": v["version"], "arms": v["arms"],
                                   "exposures": v.get("exposures"), "clicks": v.get("clicks")}
                               for k, v in sorted(self.posteriors.items())}}
