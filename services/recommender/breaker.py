"""A circuit breaker for one dependency (Redis, the model): pure state machine, time passed in.

Hystrix's rules and defaults: outcomes are counted in a rolling window of
`window_ms` (10 s) made of `buckets` (10) buckets; while closed, once the window
holds at least `min_requests` (20) outcomes and the error rate reaches
`error_threshold` (50 %), the breaker opens. Open, it refuses every call for
`sleep_ms` (5 s); then it is half-open and lets `probes` calls through (1 by
default). One failed probe opens it again for another sleep; `probes`
successful ones close it with an empty window, so failures from before the
outage cannot trip it again at once.

A timeout is a failure: the caller records `ok=False` when its deadline
passed. A probe that never reports back (the caller lost it) would keep the
breaker half-open forever, so after `sleep_ms` without an answer the probes
are let through again.

Outcomes recorded while open (calls that started before it opened) are counted
in the window for /metrics but change no state. While half-open every outcome
is taken as a probe's answer: the caller cannot tell a probe from a call that
started before the breaker opened, and Hystrix makes the same simplification.

Times are integer milliseconds of a monotonic clock, e.g.
`time.monotonic_ns() // 1_000_000`; the module never reads a clock.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    """Where the breaker is: closed (calls pass), open (refused), half-open (probing)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Hystrix-like defaults; `window_ms` must be a multiple of `buckets`."""

    window_ms: int = 10_000
    buckets: int = 10
    min_requests: int = 20
    error_threshold: float = 0.5
    sleep_ms: int = 5_000
    probes: int = 1

    def __post_init__(self) -> None:
        if self.buckets < 1 or self.window_ms < self.buckets or self.window_ms % self.buckets:
            raise ValueError(f"window_ms={self.window_ms} must be a positive multiple of "
                             f"buckets={self.buckets}")
        if not 0.0 < self.error_threshold <= 1.0:
            raise ValueError(f"error_threshold={self.error_threshold} must be in (0, 1]")
        if self.min_requests < 1 or self.sleep_ms < 0 or self.probes < 1:
            raise ValueError("min_requests and probes must be >= 1, sleep_ms >= 0")

    @property
    def bucket_ms(self) -> int:
        """Width of one bucket of the rolling window."""
        return self.window_ms // self.buckets


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What /metrics and /health show."""

    state: State
    requests: int               # outcomes in the rolling window
    failures: int
    error_rate: float           # failures / requests, 0.0 for an empty window
    opened_count: int           # times the breaker opened since start
    rejected: int               # calls refused since start
    last_transition_ms: int | None

    def as_dict(self) -> dict:
        """JSON-ready, for /metrics and /health."""
        return {"state": self.state.value, "requests": self.requests, "failures": self.failures,
                "error_rate": self.error_rate, "opened_count": self.opened_count,
                "rejected": self.rejected, "last_transition_ms": self.last_transition_ms}


class CircuitBreaker:
    """`allow(now)` before a call, `record(ok, now)` after it, `snapshot(now)` to report."""

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        n = self.config.buckets
        # Ring of buckets: slot i holds the bucket with absolute index `_ids[i]`.
        self._ids = [-1] * n
        self._ok = [0] * n
        self._err = [0] * n
        self.state = State.CLOSED
        self.opened_count = 0
        self.rejected = 0
        self.last_transition_ms: int | None = None
        self._opened_at = 0
        self._probes_out = 0          # probes let through and not answered yet
        self._probes_ok = 0
        self._probe_sent_at = 0

    # -- the rolling window ------------------------------------------------
    def _totals(self, now: int) -> tuple[int, int]:
        current = now // self.config.bucket_ms
        oldest = current - self.config.buckets
        ok = err = 0
        for i, bucket in enumerate(self._ids):
            if bucket > oldest:
                ok += self._ok[i]
                err += self._err[i]
        return ok + err, err

    def _count(self, ok: bool, now: int) -> None:
        bucket = now // self.config.bucket_ms
        slot = bucket % self.config.buckets
        if self._ids[slot] != bucket:
            if self._ids[slot] > bucket:
                return  # older than the window (a clock step back): nothing to count it in
            self._ids[slot], self._ok[slot], self._err[slot] = bucket, 0, 0
        if ok:
            self._ok[slot] += 1
        else:
            self._err[slot] += 1

    def _reset_window(self) -> None:
        n = self.config.buckets
        self._ids, self._ok, self._err = [-1] * n, [0] * n, [0] * n

    # -- transitions -------------------------------------------------------
    def _move(self, state: State, now: int) -> None:
        self.state = state
        self.last_transition_ms = now
        if state is State.OPEN:
            self.opened_count += 1
            self._opened_at = now
        elif state is State.CLOSED:
            self._reset_window()
        self._probes_out = self._probes_ok = 0

    def allow(self, now: int) -> bool:
        """Whether a call may go to the dependency now (a refused call should take the fallback)."""
        cfg = self.config
        if self.state is State.OPEN and now - self._opened_at >= cfg.sleep_ms:
            self._move(State.HALF_OPEN, now)
        if self.state is State.CLOSED:
            return True
        if self.state is State.HALF_OPEN:
            if self._probes_out and now - self._probe_sent_at >= cfg.sleep_ms:
                self._probes_out = 0  # lost probes: try again
            if self._probes_out + self._probes_ok < cfg.probes:
                self._probes_out += 1
                self._probe_sent_at = now
                return True
        self.rejected += 1
        return False

    def record(self, ok: bool, now: int) -> None:
        """The outcome of a call that `allow` let through; a timeout is `ok=False`."""
        self._count(ok, now)
        if self.state is State.HALF_OPEN:
            self._probes_out = max(0, self._probes_out - 1)
            if not ok:
                self._move(State.OPEN, now)
            else:
                self._probes_ok += 1
                if self._probes_ok >= self.config.probes:
                    self._move(State.CLOSED, now)
        elif self.state is State.CLOSED and not ok:
            requests, failures = self._totals(now)
            if requests >= self.config.min_requests and \
                    failures >= self.config.error_threshold * requests:
                self._move(State.OPEN, now)

    def snapshot(self, now: int) -> Snapshot:
        """State and window figures as of `now` (an open breaker past its sleep still shows open)."""
        requests, failures = self._totals(now)
        return Snapshot(self.state, requests, failures, failures / requests if requests else 0.0,
                        self.opened_count, self.rejected, self.last_transition_ms)
