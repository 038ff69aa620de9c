"""Deterministic A/B allocation: the same unit gets the same arm in every process,
after every restart, in every language that implements these few lines.

The rule (test vectors in schemas/allocation_vectors.json):

1. h = FNV-1a 32-bit of the UTF-8 bytes of "<experiment id>:<unit id>"
   (offset basis 2166136261, prime 16777619, arithmetic mod 2**32).
2. bucket = h mod 10000.
3. Arm boundaries over the 10,000 buckets: with S_i = w_1 + ... + w_i (IEEE
   doubles, added left to right) and T = S_n, B_i = floor((10000 * S_i) / T + 0.5)
   and B_n = 10000; arm i holds buckets [B_{i-1}, B_i) with B_0 = 0. A weight
   of 0 holds no bucket.
4. Namespaces: experiments that share a namespace split its 10,000 namespace
   buckets into disjoint half-open ranges [start, end). A unit's namespace
   bucket is FNV-1a 32 of "<namespace>:<unit id>" mod 10000; a unit outside the
   experiment's range is not in the experiment (no arm).

The experiment id salts the hash, so units are reshuffled independently for
each experiment (no carry-over of one test's arm into the next).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from services.experiments import ExperimentError

BUCKETS = 10_000
FNV32_OFFSET = 0x811C9DC5
FNV32_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    h = FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV32_PRIME) & 0xFFFFFFFF
    return h


def bucket(salt: str, unit: str) -> int:
    """The unit's bucket in [0, 10000) under `salt` (an experiment id or a namespace)."""
    return fnv1a_32(f"{salt}:{unit}".encode("utf-8")) % BUCKETS


def boundaries(weights: Sequence[float]) -> list[int]:
    """End bucket of each arm (rule 3); the last is always 10000."""
    if len(weights) < 1:
        raise ExperimentError("an experiment needs at least one arm")
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ExperimentError(f"arm weights must be finite and non-negative, got {list(weights)}")
    total = 0.0
    cumulative = []
    for w in weights:
        total += w
        cumulative.append(total)
    if total <= 0:
        raise ExperimentError(f"arm weights must not all be zero, got {list(weights)}")
    # Finite weights can still add up to infinity, or overflow 10000 * S_i (1e308 + 1):
    # floor() of that raises OverflowError, which no caller expects from a bad record.
    if not math.isfinite(BUCKETS * total):
        raise ExperimentError(f"arm weights are too large: 10000 x their total overflows, "
                              f"got {list(weights)}")
    ends = [math.floor(BUCKETS * s / total + 0.5) for s in cumulative]
    ends[-1] = BUCKETS
    return ends


def arm_of_bucket(b: int, ends: Sequence[int]) -> int:
    for i, end in enumerate(ends):
        if b < end:
            return i
    raise ExperimentError(f"bucket {b} is outside [0, {BUCKETS})")


def in_range(unit: str, namespace: str, start: int, end: int) -> bool:
    """Rule 4: is the unit's namespace bucket in [start, end)?"""
    return start <= bucket(namespace, unit) < end


def assign(experiment: str, unit: str, weights: Sequence[float],
           namespace: tuple[str, int, int] | None = None) -> int | None:
    """The arm index of `unit` in `experiment`, or None when a namespace range excludes it."""
    if namespace is not None and not in_range(unit, *namespace):
        return None
    return arm_of_bucket(bucket(experiment, unit), boundaries(weights))


class Allocator:
    """One experiment's allocation with its boundaries computed once (the recommender
    keeps one per running experiment)."""

    __slots__ = ("experiment", "ends", "namespace")

    def __init__(self, experiment: str, weights: Sequence[float],
                 namespace: tuple[str, int, int] | None = None) -> None:
        self.experiment = experiment
        self.ends = boundaries(weights)
        if namespace is not None:
            _, start, end = namespace
            if not 0 <= start < end <= BUCKETS:
                raise ExperimentError(f"a namespace range must satisfy 0 <= start < end <= {BUCKETS}, "
                                      f"got [{start}, {end})")
        self.namespace = namespace

    def __call__(self, unit: str) -> int | None:
        if self.namespace is not None and not in_range(unit, *self.namespace):
            return None
        return arm_of_bucket(bucket(self.experiment, unit), self.ends)
