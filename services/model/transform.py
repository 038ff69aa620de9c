"""THE feature transform shared by training and serving: events → interactions → item weights.

Training turns a user's archived events into a row of the interaction matrix;
serving turns the same user's recent interactions (the `recent` feature group
in Redis) into the fold-in vector of a user the model has not seen. Both go
through `item_weights`, so a rule changed here changes both sides at once (the
seed's "repeat EXACTLY" rule).

The weighting rule: a user's weight for an item is the strongest action they
took on it (view 1, click 2), not a count. Repeats saturate, so a bot or a
reload loop cannot dominate a row, and a bounded, deduplicated recent list at
serving time yields the same weights training computed from full history for
those items.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from schemas.clicks import ClickEvent, visitor_key
from services.model.als import FoldIn
from streams.codec import event_problem
from streams.sessions import event_name, item_of

Action = Literal["view", "click"]
ACTION_WEIGHTS: dict[str, float] = {"view": 1.0, "click": 2.0}
CLICK_EVENTS = frozenset({"Product Clicked", "Item Clicked"})


@dataclass(frozen=True, slots=True)
class Interaction:
    """One user action on one item at an event time (epoch ms)."""

    user: str
    item: str
    action: Action
    ts: int


@dataclass(frozen=True, slots=True)
class InteractionMatrix:
    """Users × items weights (CSR, float32), with the ids of rows and columns."""

    users: tuple[str, ...]
    items: tuple[str, ...]
    matrix: sp.csr_matrix


def interaction_of(event: ClickEvent) -> Interaction | None:
    """The item interaction an event (one `event_problem` accepts) is, if any."""
    if not isinstance(event.get("properties"), dict):
        return None
    item = item_of(event)
    if item is None:
        return None
    action: Action = "click" if event_name(event) in CLICK_EVENTS else "view"
    return Interaction(visitor_key(event), item, action, event["timestamp"])


def interactions(events: Iterable[ClickEvent]) -> list[Interaction]:
    """Every item interaction among events, skipping events that cannot be processed."""
    out = []
    for event in events:
        if event_problem(event) is None and (it := interaction_of(event)) is not None:
            out.append(it)
    return out


def item_weights(actions: Iterable[tuple[str, str]]) -> dict[str, float]:
    """THE rule, over (item, action) pairs: per item, the weight of the strongest action
    taken on it."""
    weights: dict[str, float] = {}
    for item, action in actions:
        w = ACTION_WEIGHTS[action]
        if w > weights.get(item, 0.0):
            weights[item] = w
    return weights


def actions_of(interactions: Iterable[Interaction]) -> Iterator[tuple[str, str]]:
    """Training's side: archived interactions as (item, action) pairs."""
    return ((it.item, it.action) for it in interactions)


def interaction_matrix(rows: Iterable[Interaction], items: Sequence[str] | None = None) -> InteractionMatrix:
    """Training's matrix: one row per user (sorted ids), `item_weights` of their interactions.

    Columns are `items` when given (interactions on other items are dropped),
    else every item seen, sorted.
    """
    by_user: dict[str, list[Interaction]] = {}
    for it in rows:
        by_user.setdefault(it.user, []).append(it)
    users = tuple(sorted(by_user))
    columns = tuple(items) if items is not None else tuple(sorted({it.item for its in by_user.values()
                                                                   for it in its}))
    index = {item: j for j, item in enumerate(columns)}
    indptr, indices, data = [0], [], []
    for user in users:
        row = sorted((index[i], w) for i, w in item_weights(actions_of(by_user[user])).items() if i in index)
        indices += [j for j, _ in row]
        data += [w for _, w in row]
        indptr.append(len(indices))
    matrix = sp.csr_matrix((np.asarray(data, np.float32), np.asarray(indices, np.int32),
                            np.asarray(indptr, np.int64)), shape=(len(users), len(columns)))
    return InteractionMatrix(users, columns, matrix)


def recent_actions(recent: Iterable[Sequence]) -> Iterator[tuple[str, str]]:
    """Serving's side: the `recent` feature group's `items` ([item, action, ts] entries) as
    (item, action) pairs, actions the rule does not weigh skipped."""
    return ((str(item), action) for item, action, _ in recent if action in ACTION_WEIGHTS)


def fold_in_inputs(weights: Mapping[str, float], index: Mapping[str, int]) -> tuple[list[int], list[float]]:
    """Item positions and weights for a fold-in, by position; items the model does not know
    are dropped."""
    known = sorted((index[i], w) for i, w in weights.items() if i in index)
    return [j for j, _ in known], [w for _, w in known]


def user_vector(recent: Iterable[Sequence], index: Mapping[str, int], fold: FoldIn) -> np.ndarray | None:
    """Serving: a user's recent interactions → training's weights → their fold-in factors
    (None when the model knows none of their items)."""
    return fold.vector(*fold_in_inputs(item_weights(recent_actions(recent)), index))
