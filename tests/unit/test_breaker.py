"""Circuit breaker state machine: Hystrix defaults (10 s window in 10 buckets, 20 requests,
50 % errors, 5 s sleep, 1 probe), driven by scripted timelines."""
from __future__ import annotations

import pytest

from services.recommender.breaker import BreakerConfig, CircuitBreaker, State


def outcomes(b: CircuitBreaker, n_ok: int, n_err: int, now: int) -> None:
    for _ in range(n_ok):
        assert b.allow(now)
        b.record(True, now)
    for _ in range(n_err):
        assert b.allow(now)
        b.record(False, now)


@pytest.mark.parametrize("n_ok,n_err,state,why", [
    (10, 9, State.CLOSED, "19 requests: under the minimum volume, even at 47 % errors"),
    (0, 19, State.CLOSED, "19 failures alone: still under the minimum volume"),
    (10, 10, State.OPEN, "20 requests at exactly 50 % errors trips"),
    (11, 9, State.CLOSED, "20 requests at 45 % errors does not"),
    (0, 20, State.OPEN, "all failing"),
    (100, 99, State.CLOSED, "199 requests at 49.7 %"),
    (100, 100, State.OPEN, "200 requests at 50 %"),
])
def test_trip_rule(n_ok, n_err, state, why):
    b = CircuitBreaker()
    outcomes(b, n_ok, n_err, now=1_000)
    assert b.state is state, why
    assert b.snapshot(1_000).requests == n_ok + n_err


@pytest.mark.parametrize("old_at,new_at,state,why", [
    (0, 9_999, State.OPEN, "10 old failures still in the window 9.999 s later"),
    (0, 10_000, State.CLOSED, "the old bucket left the window after 10 s"),
    (500, 10_499, State.CLOSED, "whole buckets: [0, 1 s) left at 10 s, though 500 ms is 9.999 s back"),
    (999, 9_000, State.OPEN, "bucket 0 is still among the last ten at 9 s"),
])
def test_rolling_window_expires_whole_buckets(old_at, new_at, state, why):
    b = CircuitBreaker()
    outcomes(b, 0, 10, now=old_at)
    outcomes(b, 0, 10, now=new_at)
    assert b.state is state, why


def test_window_counts_only_the_last_ten_buckets():
    b = CircuitBreaker()
    for second in range(15):
        outcomes(b, 1, 0, now=second * 1_000 + 10)
    snap = b.snapshot(14_500)
    assert (snap.requests, snap.failures, snap.error_rate) == (10, 0, 0.0)
    assert b.snapshot(30_000).requests == 0, "an idle window empties"


def tripped(now: int = 0, config: BreakerConfig | None = None) -> CircuitBreaker:
    b = CircuitBreaker(config)
    outcomes(b, 0, 20, now)
    assert b.state is State.OPEN
    return b


# (reason, steps: (op, t_ms, ok or None, expected allow / None, state after))
TIMELINES = [
    ("open refuses until the sleep window is over", [
        ("allow", 1, None, False, State.OPEN),
        ("allow", 4_999, None, False, State.OPEN),
        ("allow", 5_000, None, True, State.HALF_OPEN),
    ]),
    ("half-open lets one probe through, refuses the rest", [
        ("allow", 5_000, None, True, State.HALF_OPEN),
        ("allow", 5_001, None, False, State.HALF_OPEN),
        ("allow", 5_002, None, False, State.HALF_OPEN),
    ]),
    ("a successful probe closes", [
        ("allow", 5_000, None, True, State.HALF_OPEN),
        ("record", 5_010, True, None, State.CLOSED),
        ("allow", 5_011, None, True, State.CLOSED),
    ]),
    ("a failed probe opens again for a full sleep", [
        ("allow", 5_000, None, True, State.HALF_OPEN),
        ("record", 5_050, False, None, State.OPEN),
        ("allow", 10_049, None, False, State.OPEN),
        ("allow", 10_050, None, True, State.HALF_OPEN),
    ]),
    ("a timed-out probe counts as a failure", [
        ("allow", 6_000, None, True, State.HALF_OPEN),
        ("record", 6_010, False, None, State.OPEN),
    ]),
    ("a probe lost by the caller is retried after another sleep", [
        ("allow", 5_000, None, True, State.HALF_OPEN),
        ("allow", 9_999, None, False, State.HALF_OPEN),
        ("allow", 10_000, None, True, State.HALF_OPEN),
        ("record", 10_001, True, None, State.CLOSED),
    ]),
    ("outcomes recorded while open change nothing", [
        ("record", 100, True, None, State.OPEN),
        ("record", 200, True, None, State.OPEN),
        ("allow", 300, None, False, State.OPEN),
    ]),
]


@pytest.mark.parametrize("why,steps", TIMELINES, ids=[t[0] for t in TIMELINES])
def test_open_half_open_closed(why, steps):
    b = tripped()
    for op, t, ok, allowed, state in steps:
        if op == "allow":
            assert b.allow(t) is allowed, (why, t)
        else:
            b.record(ok, t)
        assert b.state is state, (why, t)


def test_several_probes_must_all_succeed():
    b = tripped(config=BreakerConfig(probes=3))
    assert [b.allow(5_000) for _ in range(4)] == [True, True, True, False]
    b.record(True, 5_001)
    b.record(True, 5_002)
    assert b.state is State.HALF_OPEN
    assert not b.allow(5_003), "two answered, one still out: no fourth probe"
    b.record(True, 5_004)
    assert b.state is State.CLOSED


def test_one_failed_probe_of_several_reopens():
    b = tripped(config=BreakerConfig(probes=3))
    assert b.allow(5_000) and b.allow(5_000)
    b.record(True, 5_001)
    b.record(False, 5_002)
    assert b.state is State.OPEN and b.opened_count == 2


def test_closing_forgets_old_failures():
    b = tripped(now=0)
    assert b.allow(5_000)
    b.record(True, 5_000)
    assert b.state is State.CLOSED
    b.allow(5_001)
    b.record(False, 5_001)
    assert b.state is State.CLOSED, "one failure after closing must not re-trip on old ones"
    assert b.snapshot(5_001).requests == 1


def test_snapshot_reports_transitions_and_rejections():
    b = tripped(now=2_000)
    for t in (2_100, 2_200, 2_300):
        b.allow(t)
    snap = b.snapshot(2_300)
    assert snap.as_dict() == {"state": "open", "requests": 20, "failures": 20, "error_rate": 1.0,
                              "opened_count": 1, "rejected": 3, "last_transition_ms": 2_000}
    assert CircuitBreaker().snapshot(0).as_dict()["last_transition_ms"] is None


def test_outcome_older_than_the_window_is_not_counted():
    b = CircuitBreaker()
    outcomes(b, 1, 0, now=25_000)
    b.record(False, 1_000)  # a clock step back lands on the same slot as a newer bucket
    assert b.snapshot(25_000).failures == 0


@pytest.mark.parametrize("kwargs", [
    {"window_ms": 10_000, "buckets": 3}, {"buckets": 0}, {"error_threshold": 0.0},
    {"error_threshold": 1.5}, {"min_requests": 0}, {"probes": 0}, {"sleep_ms": -1},
])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        BreakerConfig(**kwargs)
