"""`clickloop train --precompute`: who is active, what a `topk:<visitor>` value holds, and that
the lists are the serving ranker's (seen items excluded)."""
from __future__ import annotations

import argparse

import orjson
import pytest

from services.model.precompute import DAY_MS, active_users, last_seen, rankings, topk_value
from services.model.train import TrainOptions, fit
from services.recommender.ranking import Ranking, rank
from tests.unit.test_train_fit import planted


def test_last_seen_is_each_users_latest_time():
    from services.model.transform import Interaction as I
    rows = [I("u", "a", "view", 5), I("u", "b", "view", 3), I("v", "a", "click", 7), I("u", "c", "view", 9)]
    assert last_seen(rows) == {"u": 9, "v": 7}
    assert last_seen([]) == {}


END = 100 * DAY_MS


@pytest.mark.parametrize("days,expected,why", [
    (1.0, ["b", "c"], "b exactly one day before the end counts"),
    (0.5, ["c"], "half a day"),
    (10.0, ["a", "b", "c"], "everyone"),
])
def test_active_users(days, expected, why):
    last = {"a": END - 3 * DAY_MS, "b": END - DAY_MS, "c": END}
    assert active_users(last, END, days) == expected, why


def test_topk_value_is_the_contracts_json():
    value = topk_value("als", "v1", Ranking(["a", "b"], [0.9, 0.25], "model"), 1234)
    assert orjson.loads(value) == {"name": "als", "version": "v1", "items": [["a", 0.9], ["b", 0.25]],
                                   "computed_ms": 1234}


def test_rankings_are_the_serving_rankers_with_seen_items_excluded():
    o = TrainOptions.from_args(argparse.Namespace(
        name=None, since=None, until=None, test_fraction=0.2, factors=6, iterations=8,
        regularization=0.1, alpha=10.0, backend="numpy", k=5, no_announce=False, precompute=True,
        precompute_k=4, active_days=7.0, json=False), "als")
    rows = planted()
    trained = fit(rows, o)
    seen: dict[str, set[str]] = {}
    for r in rows:
        seen.setdefault(r.user, set()).add(r.item)
    catalogue = trained.catalogue()
    users = ["u0", "u7", "u119"]
    got = dict(rankings(trained, users, 4))
    assert list(got) == users
    for user, ranking in got.items():
        row = trained.matrix.users.index(user)
        expected = rank(catalogue, trained.factors.users[row], 4, seen=seen[user],
                        n_interactions=len(seen[user]))
        assert ranking == expected and ranking.path == "model"
        assert len(ranking.items) == 4 and not set(ranking.items) & seen[user]
