"""Implicit-feedback ALS (Hu, Koren & Volinsky 2008): user and item factor matrices.

Trained with the `implicit` library (CPU, conjugate gradient) when it imports,
else with the direct-solve numpy ALS below; both use `implicit`'s convention,
so a model from either folds in new users the same way: an observed weight w
gives confidence c = alpha * w and preference 1, an unobserved pair confidence
1 and preference 0, and each user's factors solve

    (YᵀY + Σᵢ (cᵢ - 1) yᵢyᵢᵀ + λI) x = Σᵢ cᵢ yᵢ     over the user's items i.

`solve_rows` is that equation for many rows at once; the numpy trainer
alternates it over users and items, and `FoldIn` uses it at serving time for a
user the model has never seen (their recent items from the feature store).
BLAS is held to one thread while training (DESIGN.md: threads fight on 2 cores).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.linalg.lapack import dposv

from streams._native import FoldSolver

Backend = Literal["auto", "implicit", "numpy"]


class FitError(ValueError):
    """Training failed or gave factors that are not all finite (NaN, inf): nothing of it
    may be written or served."""


@dataclass(frozen=True, slots=True)
class AlsParams:
    """Training parameters (also what fold-in needs: regularization and alpha)."""

    factors: int = 32
    regularization: float = 0.1
    alpha: float = 10.0          # confidence per unit of weight; >= 1 so every c - 1 >= 0
    iterations: int = 15
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        # NaN compares False both ways, so `alpha < 1` alone lets NaN through (and inf
        # regularization or alpha gives NaN factors): finite first.
        if not (math.isfinite(self.alpha) and math.isfinite(self.regularization)):
            raise ValueError(f"alpha={self.alpha} and regularization={self.regularization} "
                             f"must be finite numbers")
        if self.factors < 1 or self.iterations < 1 or self.threads < 1:
            raise ValueError("factors, iterations and threads must be >= 1")
        if self.alpha < 1.0 or self.regularization <= 0.0:
            raise ValueError(f"alpha={self.alpha} must be >= 1 and regularization > 0")

    def as_dict(self) -> dict:
        """For the artifact's manifest."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Factors:
    """A trained model's factor matrices."""

    users: np.ndarray            # (n_users, factors) float32
    items: np.ndarray            # (n_items, factors) float32
    backend: str                 # "implicit" or "numpy": which trainer produced them


def implicit_available() -> bool:
    """Whether the `implicit` library imports here."""
    try:
        import implicit.cpu.als  # noqa: F401
    except ImportError:
        return False
    return True


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, "blas")


def gram(factors: np.ndarray) -> np.ndarray:
    """YᵀY in float64, the part of every row's system shared by all rows."""
    f = factors.astype(np.float64, copy=False)
    return f.T @ f


def solve_one(base: np.ndarray, y: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The module's equation for one row: (base + Yᵀ(C - I)Y) x = Yᵀc, with y the row's
    observed counterpart factors (float64, n × k) and c their confidences.

    The matrix is symmetric and, whenever every confidence is at least 1 (alpha x
    weight >= 1, as with the defaults), positive definite: LAPACK's Cholesky solver
    (dposv) then takes 16 µs for k = 64 where `np.linalg.solve` (LU) took 27; a matrix
    it cannot factor goes to LU."""
    a = base + (y.T * (c - 1.0)) @ y
    b = y.T @ c
    _, x, info = dposv(a, b, lower=0)
    return x if info == 0 else np.linalg.solve(a, b)


def solve_rows(fixed: np.ndarray, fixed_gram: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
               weights: np.ndarray, params: AlsParams) -> np.ndarray:
    """Each CSR row's factors given the other side's `fixed` factors (the module's equation)."""
    rows, k = len(indptr) - 1, fixed.shape[1]
    out = np.zeros((rows, k), np.float32)
    base = fixed_gram + params.regularization * np.eye(k)
    for r in range(rows):
        lo, hi = indptr[r], indptr[r + 1]
        if lo == hi:
            continue  # nothing observed: the zero vector, as implicit gives
        out[r] = solve_one(base, fixed[indices[lo:hi]].astype(np.float64),
                           params.alpha * weights[lo:hi].astype(np.float64))
    return out


def _train_numpy(matrix: sp.csr_matrix, params: AlsParams) -> Factors:
    rng = np.random.default_rng(params.seed)
    n_users, n_items = matrix.shape
    users = (rng.random((n_users, params.factors)) * 0.01).astype(np.float32)
    items = (rng.random((n_items, params.factors)) * 0.01).astype(np.float32)
    by_item = matrix.T.tocsr()
    for _ in range(params.iterations):
        users = solve_rows(items, gram(items), matrix.indptr, matrix.indices, matrix.data, params)
        items = solve_rows(users, gram(users), by_item.indptr, by_item.indices, by_item.data, params)
    return Factors(users, items, "numpy")


def _train_implicit(matrix: sp.csr_matrix, params: AlsParams) -> Factors:
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=params.factors, regularization=params.regularization,
                                    alpha=params.alpha, iterations=params.iterations,
                                    random_state=params.seed, num_threads=params.threads)
    model.fit(matrix, show_progress=False)
    return Factors(np.ascontiguousarray(model.user_factors, np.float32),
                   np.ascontiguousarray(model.item_factors, np.float32), "implicit")


def train(matrix: sp.csr_matrix, params: AlsParams = AlsParams(), backend: Backend = "auto") -> Factors:
    """Factorize a users × items weight matrix (`transform.interaction_matrix`).

    FitError when the factors are not all finite (an alpha so large that confidences
    overflow, say): such a model must never be written or served."""
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    fit = _train_numpy
    failures: tuple[type[Exception], ...] = (np.linalg.LinAlgError,)   # a singular system, say
    if backend == "implicit" or (backend == "auto" and implicit_available()):
        # Imported before the BLAS limit: it applies only to the BLAS libraries already
        # loaded, and implicit brings scipy's own OpenBLAS (else it runs 2 threads and warns).
        import implicit.cpu.als  # noqa: F401
        from implicit.recommender_base import ModelFitError  # its "NaN encountered in factors"
        fit, failures = _train_implicit, (*failures, ModelFitError)
    elif backend not in ("auto", "numpy"):
        raise ValueError(f"unknown ALS backend {backend!r}")
    with _one_blas_thread(), np.errstate(all="ignore"):  # overflow is reported below, once
        try:
            factors = fit(matrix, params)
        except failures as exc:
            raise FitError(f"ALS failed ({exc}) with alpha={params.alpha}, "
                           f"regularization={params.regularization}") from None
    if not (np.isfinite(factors.users).all() and np.isfinite(factors.items).all()):
        raise FitError(f"ALS gave factors that are not finite (NaN or inf) with "
                       f"alpha={params.alpha}, regularization={params.regularization}")
    return factors


class FoldIn:
    """Factors for users unseen at training, from their item weights, with the model's own equation."""

    def __init__(self, item_factors: np.ndarray, params: AlsParams) -> None:
        self.items = np.ascontiguousarray(item_factors, np.float32)
        self.params = params
        self.gram = gram(self.items)  # computed once per model, not per request
        # solve_rows' left-hand base, also once per model.
        self.base = self.gram + params.regularization * np.eye(self.items.shape[1])
        # The native solver inverts the base once, so a user's system is a low-rank update
        # of it (native/src/foldin.rs): ~8 µs per fold-in where numpy + LAPACK took ~28.
        try:
            self.native: FoldSolver | None = FoldSolver(self.items, self.base)
        except ValueError:  # a base that is not positive definite (non-finite factors)
            self.native = None

    def vector(self, positions: Sequence[int], weights: Sequence[float]) -> np.ndarray | None:
        """The user's factor vector (float32), or None when none of their items is known.

        `solve_rows`' equation for one row: natively, or by `solve_one` when the native
        solver refuses the system (a confidence below 1 can make it indefinite)."""
        if len(positions) == 0:
            return None
        alpha = self.params.alpha
        confidences = [alpha * float(w) for w in weights]
        if self.native is not None:
            out = np.empty(self.items.shape[1], np.float32)
            if self.native.solve(out, positions, confidences):
                return out
        return solve_one(self.base, self.items[np.asarray(positions, np.int64)].astype(np.float64),
                         np.asarray(confidences, np.float64)).astype(np.float32)
