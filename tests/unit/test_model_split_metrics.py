"""Time-based hold-out and ranking metrics, against hand-computed values."""
from __future__ import annotations

import math
import random

import pytest

from services.model.metrics import evaluate, ndcg_at_k, recall_at_k
from services.model.split import cutoff_for, data_range, holdout_truth, time_split
from services.model.transform import Interaction


def it(user: str, item: str, ts: int) -> Interaction:
    return Interaction(user, item, "view", ts)


def test_split_never_leaks_the_future():
    rng = random.Random(5)
    rows = [it(f"u{rng.randrange(30)}", f"i{rng.randrange(50)}", rng.randrange(10_000))
            for _ in range(2_000)]
    for fraction in (0.1, 0.2, 0.5):
        split = time_split(rows, cutoff_for(rows, fraction))
        assert max(r.ts for r in split.train) < split.cutoff <= min(r.ts for r in split.test)
        assert sorted(split.train + split.test, key=id) == sorted(rows, key=id), "nothing lost"
        assert len(split.test) == pytest.approx(fraction * len(rows), abs=10)


@pytest.mark.parametrize("times,fraction,cutoff,why", [
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.2, 9, "last 20 %: times 9 and 10"),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.5, 6, "half"),
    ([1, 1, 1, 2], 0.5, 1, "ties at the cutoff all go to test"),
    ([7], 0.3, 7, "one interaction: it is the test"),
])
def test_cutoff(times, fraction, cutoff, why):
    assert cutoff_for([it("u", "i", t) for t in times], fraction) == cutoff, why


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_cutoff_refuses_bad_fractions(fraction):
    with pytest.raises(ValueError):
        cutoff_for([it("u", "i", 1)], fraction)


def test_data_range():
    assert data_range([it("u", "i", 5), it("u", "j", 2)]) == (2, 5)
    assert data_range([]) is None


def test_holdout_truth_keeps_new_known_items():
    rows = [it("u1", "a", 1), it("u1", "b", 2), it("u2", "a", 3),
            it("u1", "a", 10),   # already seen by u1: not something to predict
            it("u1", "c", 11),   # c never in train: the model cannot know it
            it("u2", "b", 12),   # new for u2, known: truth
            it("u3", "a", 13)]   # u3 is new; a is known: truth (served by popularity)
    split = time_split(rows, 10)
    assert holdout_truth(split, {"a", "b"}) == {"u2": {"b"}, "u3": {"a"}}


@pytest.mark.parametrize("recommended,relevant,k,recall,why", [
    (["a", "b", "c"], {"a"}, 3, 1.0, "the one relevant item found"),
    (["a", "b", "c"], {"c", "d"}, 3, 0.5, "one of two"),
    (["a", "b", "c"], {"c"}, 2, 0.0, "found past k does not count"),
    (["a", "b"], {"a", "b", "c", "d"}, 2, 0.5, "divided by all relevant, even above k"),
    ([], {"a"}, 5, 0.0, "nothing recommended"),
    (["a"], set(), 5, 0.0, "nothing relevant: neutral 0"),
])
def test_recall(recommended, relevant, k, recall, why):
    assert recall_at_k(recommended, relevant, k) == pytest.approx(recall), why


L2, L3, L4 = 1.0, 1 / math.log2(3), 0.5   # discounts of ranks 1, 2, 3


@pytest.mark.parametrize("recommended,relevant,k,ndcg,why", [
    (["a", "b", "c"], {"a"}, 3, 1.0, "a hit at rank 1 is ideal"),
    (["x", "a", "c"], {"a"}, 3, L3, "at rank 2: 1/log2(3)"),
    (["x", "y", "a"], {"a"}, 3, L4, "at rank 3: 1/2"),
    (["a", "x", "b"], {"a", "b"}, 3, (L2 + L4) / (L2 + L3), "two hits, one late"),
    (["x", "a"], {"a", "b", "c"}, 2, L3 / (L2 + L3), "IDCG counts min(k, |relevant|) ranks"),
    (["x", "y", "a"], {"a"}, 2, 0.0, "past k"),
    (["a"], set(), 3, 0.0, "nothing relevant"),
])
def test_ndcg(recommended, relevant, k, ndcg, why):
    assert ndcg_at_k(recommended, relevant, k) == pytest.approx(ndcg), why


def test_evaluate_averages_over_users_with_truth():
    lists = {"u1": ["a", "b"], "u2": ["x", "c"], "u3": ["a"]}
    truth = {"u1": {"a"}, "u2": {"c", "d"}, "u3": set()}
    got = evaluate(lambda user, k: lists[user][:k], truth, 2)
    assert got.users == 2
    assert got.recall == pytest.approx((1.0 + 0.5) / 2)
    assert got.ndcg == pytest.approx((1.0 + L3 / (L2 + L3)) / 2)
    assert got.as_dict() == {"k": 2, "users": 2, "recall@2": got.recall, "ndcg@2": got.ndcg}
    assert evaluate(lambda user, k: [], {}, 10).as_dict()["recall@10"] == 0.0
