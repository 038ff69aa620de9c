"""The recommender's request flow: features, model, budget, breakers, fallback, logs.

For one request (`recommend`):
1. features: the hot-key cache, else ONE Redis round trip (a pipeline: the
   user hash and the precomputed top-k) under the Redis budget and the Redis
   breaker; a timeout or an error counts as a failure for the breaker;
2. the model reference, taken once (a hot swap never splits a request);
3. past the total budget already, or no model: the fallback;
4. an answer that needs no scoring, at once: the precomputed top-k when it is
   by the served version and still holds k unseen items, or the ranking
   memoized on the cached profile (`known`; no model call, so the model
   breaker neither gates nor counts it);
5. the model breaker open: the fallback; else scoring, local inference
   (`ranking.rank`) on the user's row, their fold-in vector, or popularity
   alone (`cold_start`); the requests that reach this point in one turn of
   the event loop score back to back on the next (`turn_batch.TurnBatch`:
   the item matrix stays in cache);
6. the fallback ranks the live popular list (in memory, `PopularList`), or the
   model's training popularity when that list is empty: never an error.
The exposure is queued (not awaited) and the shadow model, for sampled
requests, scores on a later turn of the event loop, after the answer left.

Before all of that, from memory only, the request's experiment arm
(`experiments.Allocation.decide`: the running experiment on the surface, A/B
by hash, bandits on the latest posterior held). Arm `popular` is served the
popular list (path `fallback`, reason null, source `popular`, or `prior`
when that list is empty); any other arm the normal flow above. A request in
an arm whose flow fails is still logged in that arm (with the fallback's
reason): assignment, not treatment received, is what the exposure records.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis

from services.recommender import records
from services.recommender.breaker import BreakerConfig, CircuitBreaker
from services.recommender.cache import TTLCache
from services.recommender.experiments import Allocation, Assignment, ExperimentFeed
from services.recommender.feature_client import FeatureClient, RespError
from services.recommender.metrics import Metrics
from services.recommender.models import ModelWatcher, ServedModel
from services.recommender.popular import PopularList
from services.recommender.profile import Profile, profile_of
from services.recommender.ranking import Ranking, fallback, rank
from services.recommender.request import Query, in_shadow
from services.recommender.topic_log import TopicLog
from services.recommender.turn_batch import TurnBatch
from services.settings import Settings
from streams import topics

log = logging.getLogger("clickloop.recommender")
MEMO_PER_PROFILE = 8   # rankings memoized on a cached profile (model version, k, exclude_seen)
POPULAR_ARM = "popular"   # the arm served the popular list; every other arm the model
EXPERIMENTS_WAIT_S = 10.0


def _mono_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class Answer:
    """What a request gets, and what its exposure records."""

    ranking: Ranking
    source: str                  # online | precomputed | popular | prior
    reason: str | None           # why a fallback
    model: ServedModel | None
    profile: Profile | None
    assignment: Assignment | None = None   # the experiment arm, None outside experiments


def breaker_config(settings: Settings) -> BreakerConfig:
    return BreakerConfig(window_ms=settings.breaker_window_ms,
                         buckets=10 if settings.breaker_window_ms % 10 == 0 else 1,
                         min_requests=settings.breaker_min_requests,
                         error_threshold=settings.breaker_error_pct / 100,
                         sleep_ms=settings.breaker_sleep_ms)


def _memo_key(model: ServedModel, query: Query) -> tuple:
    return model.version, model.content_sha256, query.k, query.exclude_seen


def known(model: ServedModel, query: Query, profile: Profile) -> tuple[Ranking, str] | None:
    """The model's top k for a visitor when no scoring is needed (pure): the precomputed
    list by this model version, or the ranking memoized on the cached profile; else None."""
    topk = profile.topk
    # The precomputed list left out the user's training history: it answers only a request
    # that excludes seen items (with exclude_seen=false, online scoring keeps them).
    if query.exclude_seen and topk is not None and topk.version == model.version \
            and topk.name == model.name:
        seen = profile.seen
        kept = [(i, s) for i, s in topk.items if i not in seen][:query.k]
        if len(kept) >= query.k:
            return Ranking([i for i, _ in kept], [s for _, s in kept], "model"), "precomputed"
    return profile.rankings.get(_memo_key(model, query)) if profile.rankings else None


def score(model: ServedModel, query: Query, profile: Profile) -> tuple[Ranking, str]:
    """The model's top k for a visitor (pure but for the ranking memo on the profile)."""
    done = known(model, query, profile)
    if done is not None:
        return done
    seen = profile.seen if query.exclude_seen else frozenset()
    memo = _memo_key(model, query)
    vector = model.vector(query.visitor, profile.recent)
    ranking = rank(model.catalogue, vector, query.k, seen, n_interactions=len(profile.recent))
    out = ranking, "online" if vector is not None else "prior"
    if len(profile.rankings) < MEMO_PER_PROFILE:
        profile.rankings[memo] = out
    return out


class Recommender:
    """Everything a request needs, with its lifecycle (`start` / `stop`)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        config = breaker_config(settings)
        self.redis_breaker = CircuitBreaker(config)
        self.model_breaker = CircuitBreaker(config)
        self.cache: TTLCache[str, Profile] = TTLCache(settings.feature_cache_ms,
                                                      settings.feature_cache_size)
        self.redis_budget_s = settings.redis_budget_ms / 1000
        self.budget_ms = settings.budget_ms
        self.redis: aioredis.Redis | None = None
        self.features: FeatureClient | None = None
        self.popular: PopularList | None = None
        self.watcher = ModelWatcher(settings, (settings.model_name, settings.shadow_model),
                                    self._model_event)
        self.exposures = TopicLog(settings, settings.topic(topics.EXPOSURES))
        self.shadow_log = TopicLog(settings, settings.topic(topics.SHADOW))
        self.user_prefix = settings.redis_key("user", "")
        self.allocation = Allocation(settings.recommender_surface, settings.bandit_sticky_s * 1000)
        self.experiments = ExperimentFeed(settings, self.allocation)
        self.topk_prefix = settings.redis_key("topk", "")
        self.scoring: TurnBatch[tuple[tuple[Ranking, str], bool]] = TurnBatch()

    def _model_event(self, name: str, outcome: str) -> None:
        (self.metrics.model_loaded if outcome == "loaded" else self.metrics.model_failed).inc()

    # -- lifecycle ------------------------------------------------------------
    async def start(self, model_wait_s: float = 15.0) -> None:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        s = self.settings
        # The request path: `redis_pool` multiplexed connections (feature_client.py).
        self.features = FeatureClient(s.redis_url, s.redis_pool)
        # The popular list's background refresh: redis-py, a small pool that waits
        # for a free connection instead of raising, and no retries (the next
        # refresh is the retry).
        pool = aioredis.BlockingConnectionPool.from_url(
            s.redis_url, max_connections=2, timeout=1.0, retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=1.0)
        self.redis = aioredis.Redis(connection_pool=pool)
        self.popular = PopularList(s, self.redis)
        try:
            await asyncio.wait_for(topics.ensure_topics(s, (topics.EXPOSURES, topics.SHADOW)), 15)
        except Exception as exc:  # the logs buffer until Kafka is back
            log.warning("could not create exposures/shadow topics: %r", exc)
        self.exposures.start()
        if s.shadow_fraction > 0:
            self.shadow_log.start()
        await self.popular.start()
        await asyncio.gather(self.watcher.start(model_wait_s),
                             self.experiments.start(min(model_wait_s, EXPERIMENTS_WAIT_S)))

    async def stop(self) -> None:
        await self.experiments.stop()
        await self.watcher.stop()
        if self.popular is not None:
            await self.popular.stop()
        await self.exposures.stop()
        if self.settings.shadow_fraction > 0:
            await self.shadow_log.stop()
        if self.redis is not None:
            await self.redis.aclose()
        if self.features is not None:
            await self.features.close()

    # -- a request ------------------------------------------------------------
    async def _fetch(self, visitor: str, start_ms: int) -> tuple[Profile | None, str | None]:
        """The visitor's profile from the cache or Redis, or None and the reason."""
        cached = self.cache.get(visitor, start_ms)
        if cached is not None:
            self.metrics.cache_hit.inc()
            return cached, None
        self.metrics.cache_miss.inc()
        breaker = self.redis_breaker
        if not breaker.allow(start_ms):
            return None, "redis_open"
        try:
            async with asyncio.timeout(self.redis_budget_s):
                user_hash, topk_raw = await self.features.read(  # type: ignore[union-attr]
                    self.user_prefix + visitor, self.topk_prefix + visitor)
        except TimeoutError:
            breaker.record(False, _mono_ms())
            return None, "redis_timeout"
        except (OSError, RespError) as exc:  # ConnectionError is an OSError
            breaker.record(False, _mono_ms())
            log.debug("redis read failed: %r", exc)
            return None, "redis_error"
        now = _mono_ms()
        breaker.record(True, now)
        profile = profile_of(user_hash, topk_raw, int(time.time() * 1000))
        for group, status in profile.status.items():
            self.metrics.features[(group, status)].inc()
        self.cache.put(visitor, profile, now)
        return profile, None

    def _fallback(self, query: Query, reason: str, model: ServedModel | None,
                  profile: Profile | None) -> Answer:
        seen = profile.seen if profile is not None and query.exclude_seen else frozenset()
        popular = self.popular.items if self.popular is not None else []
        if popular or model is None:
            return Answer(fallback(popular, query.k, seen), "popular", reason, model, profile)
        prior = rank(model.catalogue, None, query.k, seen)
        return Answer(Ranking(prior.items, prior.scores, "fallback"), "prior", reason, model, profile)

    async def recommend(self, query: Query) -> Answer:
        start = _mono_ms()
        assignment = self.allocation.decide(query, start) if self.allocation.live else None
        if assignment is None:
            return await self._serve(query, start)
        if assignment.arm == POPULAR_ARM:
            profile, reason = await self._fetch(query.visitor, start)
            answer = self._fallback(query, reason, self.watcher.current.get(self.settings.model_name),
                                    profile)  # type: ignore[arg-type]
        else:
            answer = await self._serve(query, start)
        answer.assignment = assignment
        return answer

    async def _serve(self, query: Query, start: int) -> Answer:
        profile, reason = await self._fetch(query.visitor, start)
        model = self.watcher.current.get(self.settings.model_name)
        if profile is None:
            return self._fallback(query, reason, model, None)  # type: ignore[arg-type]
        if model is None:
            return self._fallback(query, "no_model", None, profile)
        now = _mono_ms()
        if now - start >= self.budget_ms:
            return self._fallback(query, "budget", model, profile)
        # An answer that needs no scoring (precomputed, or memoized on the cached profile)
        # is served at once: no model call, so no turn of the loop and no breaker.
        done = known(model, query, profile)
        if done is not None:
            return Answer(done[0], done[1], None, model, profile)
        breaker = self.model_breaker
        if not breaker.allow(now):
            return self._fallback(query, "model_open", model, profile)
        left_ns = (self.budget_ms - (now - start)) * 1_000_000

        def scored() -> tuple[tuple[Ranking, str], bool]:
            # The model fails the breaker when scoring itself costs more than the budget
            # left when it started (after Redis): CPU time of this thread, not wall time,
            # so waiting for the GIL or a core (a model loading in a thread, another
            # process) never opens it. The thread's CPU clock is a system call (~1.5 % of
            # the CPU per read here), so it is read again only when the wall time, never
            # below it, is over the budget. Measured inside the batch: the scorings
            # before this one in its batch are not this one's cost.
            t0, cpu0 = time.perf_counter_ns(), time.thread_time_ns()
            out = score(model, query, profile)
            return out, (time.perf_counter_ns() - t0 < left_ns
                         or time.thread_time_ns() - cpu0 < left_ns)

        try:
            (ranking, source), ok = await self.scoring.submit(scored)
        except Exception:  # a broken model must not become a 5xx
            breaker.record(False, _mono_ms())
            log.exception("scoring with %s %s failed", model.name, model.version)
            return self._fallback(query, "model_error", model, profile)
        breaker.record(ok, _mono_ms())
        return Answer(ranking, source, None, model, profile)

    # -- after the answer -----------------------------------------------------
    def log_exposure(self, request_id: str, ts: int, query: Query, answer: Answer) -> None:
        m, a = answer.model, answer.assignment
        record = records.exposure(request_id, ts, query, answer.ranking.items, answer.ranking.scores,
                                  answer.ranking.path, answer.reason, answer.source,
                                  m.name if m else None, m.version if m else None,
                                  *((a.experiment, a.arm, a.posterior_version, a.seed, a.draw)
                                    if a is not None else ()))
        self.exposures.log(query.visitor.encode(), orjson.dumps(record))

    def maybe_shadow(self, request_id: str, ts: int, query: Query, answer: Answer) -> None:
        """For sampled requests, score the shadow model on a later loop turn and log both."""
        if self.settings.shadow_fraction <= 0 or not in_shadow(request_id, self.settings.shadow_fraction):
            return
        asyncio.get_running_loop().call_soon(self._shadow, request_id, ts, query, answer)

    def _shadow(self, request_id: str, ts: int, query: Query, answer: Answer) -> None:
        shadow_model = self.watcher.current.get(self.settings.shadow_model)
        if shadow_model is None or answer.profile is None:
            self.metrics.shadow_skipped.inc()
            return
        t0 = time.perf_counter_ns()
        try:
            ranking, _ = score(shadow_model, query, answer.profile)
        except Exception:
            log.exception("shadow scoring with %s failed", shadow_model.version)
            self.metrics.shadow_skipped.inc()
            return
        took_us = (time.perf_counter_ns() - t0) // 1000
        m = answer.model
        served = records.ranking(m.name if m else None, m.version if m else None,
                                 answer.ranking.path, answer.ranking.items, answer.ranking.scores)
        other = records.ranking(shadow_model.name, shadow_model.version, ranking.path,
                                ranking.items, ranking.scores)
        self.shadow_log.log(query.visitor.encode(),
                            orjson.dumps(records.shadow(request_id, ts, query, served, other, took_us)))

    # -- reporting --------------------------------------------------------------
    def health(self) -> dict:
        now = _mono_ms()
        models = {role: (m.describe() if (m := self.watcher.current.get(name)) else None)
                  for role, name in (("served", self.settings.model_name),
                                     ("shadow", self.settings.shadow_model)) if name}
        breakers = {"redis": self.redis_breaker.snapshot(now).as_dict(),
                    "model": self.model_breaker.snapshot(now).as_dict()}
        popular = self.popular
        degraded = models["served"] is None or any(b["state"] != "closed" for b in breakers.values())
        return {"status": "degraded" if degraded else "ok", "models": models, "breakers": breakers,
                "model_error": self.watcher.last_error,
                "popular": {"items": len(popular.items) if popular else 0,
                            "fresh_partitions": popular.fresh_partitions if popular else 0,
                            "age_ms": popular.age_ms() if popular else None},
                "cache": {"entries": len(self.cache), "hits": self.cache.hits,
                          "misses": self.cache.misses},
                "scoring": {"batches": self.scoring.batches, "scored": self.scoring.jobs},
                "wrong_type_keys": self.features.wrong_type if self.features else 0,
                "exposures": {"sent": self.exposures.sent, "dropped": self.exposures.dropped,
                              "buffered": len(self.exposures.buffer),
                              "kafka_ready": self.exposures.ready},
                "experiments": {"surface": self.allocation.surface,
                                "caught_up": self.experiments.caught_up.is_set(),
                                "running": [e.id for e in self.allocation.live],
                                "error": self.experiments.last_error}}

    def refresh_metrics(self) -> None:
        m, now = self.metrics, _mono_ms()
        for dep, breaker in (("redis", self.redis_breaker), ("model", self.model_breaker)):
            snap = breaker.snapshot(now)
            m.breaker_state.labels(dep).set({"closed": 0, "half_open": 1, "open": 2}[snap.state.value])
            m.catch_up(m.breaker_opened, dep, snap.opened_count)
            m.catch_up(m.breaker_rejected, dep, snap.rejected)
            m.breaker_error_rate.labels(dep).set(snap.error_rate)
        m.set_series(m.model_info, {
            (role, model.name, model.version): 1
            for role, name in (("served", self.settings.model_name),
                               ("shadow", self.settings.shadow_model))
            if name and (model := self.watcher.current.get(name)) is not None}, gone=0)
        m.set_series(m.posterior_version, {(e.id,): e.version for e in self.allocation.live
                                           if e.version is not None}, gone=-1)
        if self.popular is not None:
            m.popular_items.set(len(self.popular.items))
            age = self.popular.age_ms()
            m.popular_age.set(-1 if age is None else age / 1000)
        for tlog in (self.exposures, self.shadow_log):
            m.catch_up(m.log_sent, tlog.topic, tlog.sent)
            m.catch_up(m.log_dropped, tlog.topic, tlog.dropped)
            m.log_buffered.labels(tlog.topic).set(len(tlog.buffer))
