"""The shared transform: events → interactions → weights, identical for training and serving."""
from __future__ import annotations

import numpy as np
import pytest

from services.model.als import AlsParams, FoldIn, solve_rows
from services.model.transform import (Interaction, actions_of, fold_in_inputs, interaction_matrix,
                                      interaction_of, interactions, item_weights, recent_actions,
                                      user_vector)
from streams.feature_windows import FeatureBatch, user_features


def ev(name: str | None, props: dict | None = None, user: str | None = "u1", anon: str | None = "a1",
       ts: int = 1_000, kind: str = "track") -> dict:
    return {"message_id": f"m{ts}{name}", "type": kind, "event": name, "user_id": user,
            "anonymous_id": anon, "timestamp": ts, "received_at": ts, "context": {},
            "properties": {} if props is None else props}


@pytest.mark.parametrize("event,expected,why", [
    (ev("Product Viewed", {"item_id": "i1"}), Interaction("u1", "i1", "view", 1_000), "a view"),
    (ev("Product Clicked", {"product_id": 42}), Interaction("u1", "42", "click", 1_000),
     "a click; Segment's product_id, ids as text"),
    (ev("Item Clicked", {"item_id": "i2"}, user=None), Interaction("a1", "i2", "click", 1_000),
     "anonymous visitors by their anonymous id"),
    (ev("Product Viewed"), None, "no item id"),
    (ev("Products Searched", {"item_id": "i1"}), None, "not an item event"),
    (ev(None, {"item_id": "i1"}, kind="page"), None, "a page view is not an item interaction"),
    ({**ev("Product Viewed"), "properties": "i1"}, None, "properties not an object"),
])
def test_interaction_of(event, expected, why):
    assert interaction_of(event) == expected, why


def test_interactions_skip_events_that_cannot_be_processed():
    events = [ev("Product Viewed", {"item_id": "i1"}), {"type": "track"}, "junk",
              {**ev("Product Viewed", {"item_id": "i2"}), "timestamp": "noon"}]
    assert [it.item for it in interactions(events)] == ["i1"]


def it(item: str, action: str = "view", ts: int = 0) -> Interaction:
    return Interaction("u", item, action, ts)


@pytest.mark.parametrize("rows,expected,why", [
    ([], {}, "nothing"),
    ([it("a")], {"a": 1.0}, "a view weighs 1"),
    ([it("a", "click")], {"a": 2.0}, "a click weighs 2"),
    ([it("a")] * 50, {"a": 1.0}, "repeats saturate: 50 views are one view"),
    ([it("a"), it("a", "click"), it("a")], {"a": 2.0}, "the strongest action wins, in any order"),
    ([it("a"), it("b", "click")], {"a": 1.0, "b": 2.0}, "items apart"),
])
def test_the_weighting_rule(rows, expected, why):
    assert item_weights(actions_of(rows)) == expected, why


def test_interaction_matrix_rows_are_the_rule_per_user():
    rows = [Interaction("u2", "b", "click", 1), Interaction("u1", "a", "view", 2),
            Interaction("u1", "a", "click", 3), Interaction("u2", "c", "view", 4),
            Interaction("u1", "c", "view", 5)]
    m = interaction_matrix(rows)
    assert (m.users, m.items) == (("u1", "u2"), ("a", "b", "c"))
    assert m.matrix.toarray().tolist() == [[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]]
    assert m.matrix.dtype == np.float32
    fixed = interaction_matrix(rows, items=["c", "a"])
    assert fixed.items == ("c", "a") and fixed.matrix.toarray().tolist() == [[1.0, 2.0], [1.0, 0.0]]


def test_fold_in_inputs_drop_unknown_items():
    pos, w = fold_in_inputs({"b": 2.0, "zz": 1.0, "a": 1.0}, {"a": 0, "b": 3})
    assert pos == [0, 3] and w == [1.0, 2.0]


def test_serving_weights_equal_training_weights():
    """The seed's "repeat EXACTLY" rule: the recent list the features worker keeps gives
    the same weights as training computes from the same events."""
    names = ["Product Viewed", "Product Clicked", "Product Viewed", "Products Searched"]
    events = [ev(names[n % 4], {"item_id": f"i{n % 7}"}, ts=1_000 + n) for n in range(40)]
    training = interaction_matrix(interactions(events))
    train_row = dict(zip(training.items, training.matrix.toarray()[0].tolist()))
    batch = FeatureBatch().add_clicks(events)
    recent = user_features(batch.users["u1"], 2_000)["recent"]["items"]
    serving = item_weights(recent_actions(recent))
    assert serving == {i: w for i, w in train_row.items() if w}


def test_user_vector_solves_the_training_equation():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((6, 3)).astype(np.float32)
    params = AlsParams(factors=3, alpha=5.0, regularization=0.2)
    fold = FoldIn(items, params)
    index = {f"i{j}": j for j in range(6)}
    vec = user_vector([["i4", "click", 9], ["i1", "view", 3], ["gone", "view", 1]], index, fold)
    # The normal equations written out: (YᵀY + Σ (c-1) y yᵀ + λI) x = Σ c y.
    y = items.astype(np.float64)
    a = y.T @ y + 0.2 * np.eye(3)
    b = np.zeros(3)
    for j, w in ((1, 1.0), (4, 2.0)):
        c = 5.0 * w
        a += (c - 1.0) * np.outer(y[j], y[j])
        b += c * y[j]
    np.testing.assert_allclose(vec, np.linalg.solve(a, b), rtol=1e-5)
    assert user_vector([["gone", "view", 1]], index, fold) is None
    empty = solve_rows(items, fold.gram, np.array([0, 0]), np.array([], np.int64),
                       np.array([], np.float32), params)
    assert empty.tolist() == [[0.0, 0.0, 0.0]], "no interactions: the zero vector"
