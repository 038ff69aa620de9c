"""Which declared topic configs an existing topic falls short of (streams.topics.config_changes)."""
from __future__ import annotations

import pytest

from streams.topics import MODELS, config_changes, topic_configs

WEEK = str(7 * 24 * 3_600_000)


def test_a_topic_with_the_declared_configs_needs_nothing():
    assert config_changes(topic_configs(MODELS), {"cleanup.policy": "compact",
                                                  "min.compaction.lag.ms": WEEK}) == {}


@pytest.mark.parametrize("policy,ok", [("compact", True), ("compact,delete", True),
                                       ("delete, compact", True), ("delete", False), ("", False)])
def test_a_policy_that_includes_the_declared_one_is_kept(policy, ok):
    assert (config_changes({"cleanup.policy": "compact"}, {"cleanup.policy": policy}) == {}) is ok


@pytest.mark.parametrize("lag,ok", [(WEEK, True), (str(30 * 24 * 3_600_000), True), ("0", False),
                                    ("not a number", False)])
def test_a_compaction_lag_at_least_as_long_is_kept(lag, ok):
    assert (config_changes({"min.compaction.lag.ms": WEEK}, {"min.compaction.lag.ms": lag}) == {}) is ok


def test_changes_name_the_current_and_the_declared_value():
    assert config_changes(topic_configs(MODELS), {"cleanup.policy": "delete"}) == {
        "cleanup.policy": ("delete", "compact"), "min.compaction.lag.ms": (None, WEEK)}


def test_other_configs_are_compared_as_they_are():
    assert config_changes({"max.message.bytes": "2000000"}, {"max.message.bytes": "2000000"}) == {}
    assert config_changes({"max.message.bytes": "2000000"}, {"max.message.bytes": "1048588"}) == {
        "max.message.bytes": ("1048588", "2000000")}
