"""Time-based hold-out: train on the past, test on what came after the cutoff.

A random split would let the model learn from a user's later clicks to predict
earlier ones; here everything at or after the cutoff is test and everything
before it is train, for every user alike. The test truth per user keeps only
what a recommender could have been asked for: items new to that user (not
already in their train interactions) that the model knows (seen in train).
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from services.model.transform import Interaction


@dataclass(frozen=True, slots=True)
class Split:
    """Interactions before the cutoff (train) and at or after it (test)."""

    train: list[Interaction]
    test: list[Interaction]
    cutoff: int                 # epoch ms: train < cutoff <= test


def data_range(interactions: Sequence[Interaction]) -> tuple[int, int] | None:
    """First and last event time, or None without interactions."""
    if not interactions:
        return None
    times = [it.ts for it in interactions]
    return min(times), max(times)


def cutoff_for(interactions: Sequence[Interaction], test_fraction: float) -> int:
    """The event time that leaves about `test_fraction` of the interactions at or after it
    (ties at the cutoff time all go to test)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be between 0 and 1")
    if not interactions:
        raise ValueError("no interactions to split")
    times = sorted(it.ts for it in interactions)
    return times[min(len(times) - 1, int(len(times) * (1.0 - test_fraction)))]


def time_split(interactions: Sequence[Interaction], cutoff: int) -> Split:
    """Train: before the cutoff; test: at or after it."""
    return Split([it for it in interactions if it.ts < cutoff],
                 [it for it in interactions if it.ts >= cutoff], cutoff)


def holdout_truth(split: Split, known_items: Collection[str]) -> dict[str, set[str]]:
    """Per user, the test items new to them and known to the model; users with none left out."""
    seen: dict[str, set[str]] = {}
    for it in split.train:
        seen.setdefault(it.user, set()).add(it.item)
    truth: dict[str, set[str]] = {}
    for it in split.test:
        if it.item in known_items and it.item not in seen.get(it.user, ()):
            truth.setdefault(it.user, set()).add(it.item)
    return truth
