"""The worker supervisor's pure parts: restart decisions and the worker count."""
from __future__ import annotations

import os

import pytest

from services.workers import (FIRST_DELAY_S, MAX_DELAY_S, MAX_QUICK_EXITS, QUICK_EXIT_S,
                              next_restart, stale_metrics_dirs, worker_count)


def test_a_worker_that_lived_long_is_restarted_at_once_and_the_streak_resets():
    decision = next_restart(quick_exits=3, lived_s=QUICK_EXIT_S + 1)
    assert decision.delay_s == 0.0 and decision.quick_exits == 0


def test_young_deaths_back_off_doubling_up_to_the_cap():
    delays, quick = [], 0
    for _ in range(MAX_QUICK_EXITS - 1):
        decision = next_restart(quick, lived_s=0.5)
        delays.append(decision.delay_s)
        quick = decision.quick_exits
    assert delays == [min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** i) for i in range(MAX_QUICK_EXITS - 1)]
    assert delays == sorted(delays) and delays[0] == FIRST_DELAY_S


def test_too_many_young_deaths_in_a_row_give_up():
    decision = next_restart(MAX_QUICK_EXITS - 1, lived_s=0.1)
    assert decision.delay_s is None and decision.quick_exits == MAX_QUICK_EXITS


def test_one_long_life_between_young_deaths_starts_the_count_again():
    quick = next_restart(next_restart(0, 1.0).quick_exits, 1.0).quick_exits
    assert quick == 2
    assert next_restart(quick, QUICK_EXIT_S).quick_exits == 0


@pytest.mark.parametrize("configured", [1, 3, 16])
def test_a_configured_count_is_taken_as_it_is(configured):
    assert worker_count(configured) == configured


def test_zero_means_one_worker_per_usable_cpu():
    assert worker_count(0) == len(os.sched_getaffinity(0)) >= 1


def test_stale_metrics_dirs_are_those_of_supervisors_no_longer_alive_in_this_namespace():
    names = ["clickloop-recommender-metrics-7-101-abc_12x", "clickloop-collector-metrics-7-202-zz9",
             "clickloop-my-svc-metrics-7-303-q1", "clickloop-recommender-metrics-k3j2h1g0",
             "clickloop-recommender-metrics-7-404-", "something-else-7-505-x",
             "clickloop-x-metrics-7-606-a/b", "clickloop-recommender-metrics-8-707-xy",
             "clickloop-recommender-metrics-101-abc"]
    alive = {202}
    assert stale_metrics_dirs(names, 7, lambda pid: pid in alive) == [
        "clickloop-recommender-metrics-7-101-abc_12x", "clickloop-my-svc-metrics-7-303-q1"]
    assert stale_metrics_dirs(names, 7, lambda pid: True) == []
    # another pid namespace's directory: its pid means another process there
    assert stale_metrics_dirs(names, 8, lambda pid: False) == ["clickloop-recommender-metrics-8-707-xy"]
