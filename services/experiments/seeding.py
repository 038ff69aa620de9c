"""Seeds for Monte Carlo results: a given seed, or a fresh one that is then returned.

Fresh seeds are 53-bit so they survive a JSON round trip through any language's
doubles: whoever reads a result can redraw it exactly.
"""
from __future__ import annotations

import secrets

import numpy as np

MAX_SEED = 2 ** 53 - 1


def resolve(seed: int | None) -> tuple[int, np.random.Generator]:
    """(the seed, a Generator seeded with it); a fresh seed when none is given."""
    if seed is None:
        seed = secrets.randbits(53)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        from services.experiments import ExperimentError
        raise ExperimentError(f"a seed must be an integer between 0 and 2**53 - 1, got {seed!r}")
    return seed, np.random.default_rng(seed)
