"""The native fold-in (streams._native.FoldSolver, native/src/foldin.rs): the ALS equation
(B + Σ (c_i - 1) y_i y_iᵀ) x = Σ c_i y_i solved as a low-rank update of B⁻¹, against the
normal equations written out and solved by numpy."""
from __future__ import annotations

import numpy as np
import pytest

from services.model.als import AlsParams, FoldIn
from streams._native import FoldSolver


def model(n: int = 200, k: int = 16, seed: int = 0, reg: float = 0.1):
    rng = np.random.default_rng(seed)
    y = (rng.standard_normal((n, k)) * 0.3).astype(np.float32)
    base = y.astype(np.float64).T @ y + reg * np.eye(k)
    return y, base, rng


def reference(y, base, positions, confidences) -> np.ndarray:
    a, b = base.copy(), np.zeros(base.shape[0])
    for p, c in zip(positions, confidences):
        row = y[p].astype(np.float64)
        a += (c - 1.0) * np.outer(row, row)
        b += c * row
    return np.linalg.solve(a, b)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 7, 16, 64])
def test_agrees_with_the_normal_equations(seed, k):
    y, base, rng = model(k=k, seed=seed)
    solver = FoldSolver(y, base)
    for m in (1, 2, 5, 40):
        positions = rng.choice(len(y), m, replace=False).tolist()
        confidences = rng.choice([10.0, 20.0, 1.5, 1.0], m).tolist()  # 1.0: no matrix term
        out = np.empty(k, np.float32)
        assert solver.solve(out, positions, confidences)
        np.testing.assert_allclose(out, reference(y, base, positions, confidences), rtol=2e-5, atol=1e-6)


def test_only_confidences_of_one_is_the_base_solve():
    y, base, _ = model()
    out = np.empty(16, np.float32)
    assert FoldSolver(y, base).solve(out, [3, 9], [1.0, 1.0])
    np.testing.assert_allclose(out, np.linalg.solve(base, y[3].astype(np.float64) + y[9]), rtol=2e-5)


def test_confidence_below_one_is_refused_and_fold_in_falls_back_to_lu():
    y, base, _ = model(n=20, k=4, reg=1e-3)
    # Negative updates: the whole matrix stays positive definite here, but Woodbury's small
    # system (D⁻¹ < 0) does not, so the solver refuses and writes nothing.
    positions, confidences = [0, 1, 2, 3, 4, 5], [0.01] * 6
    out = np.full(4, 7.0, np.float32)
    assert not FoldSolver(y, base).solve(out, positions, confidences)
    assert out.tolist() == [7.0] * 4
    expected = reference(y, base, positions, confidences)
    # Weights below 1 / alpha (the rule's weights are 1 and 2, so only by a direct call).
    fold = FoldIn(y, AlsParams(factors=4, regularization=1e-3, alpha=10.0))
    np.testing.assert_allclose(fold.vector(positions, [0.001] * 6), expected, rtol=1e-4)


def test_fold_in_without_a_positive_definite_base_takes_the_numpy_path():
    y, _, _ = model(n=10, k=4)
    y[2, 1] = np.nan
    fold = FoldIn(y, AlsParams(factors=4))
    assert fold.native is None   # refused at build: numpy serves, NaN in, NaN out (the
    assert np.isnan(fold.vector([0, 1], [1.0, 2.0])).all()   # ranking's exact pass copes)
    with pytest.raises(ValueError, match="positive definite"):
        FoldSolver(y, fold.base)


@pytest.mark.parametrize("call,match", [
    (lambda s: s.solve(np.empty(16, np.float32), [200], [1.0]), "outside"),
    (lambda s: s.solve(np.empty(16, np.float32), [-1], [1.0]), "outside"),
    (lambda s: s.solve(np.empty(16, np.float32), [1, 2], [1.0]), "2 positions for 1"),
    (lambda s: s.solve(np.empty(8, np.float32), [1], [1.0]), "writable float32 array of 16"),
])
def test_bad_calls_are_refused(call, match):
    y, base, _ = model()
    with pytest.raises(ValueError, match=match):
        call(FoldSolver(y, base))


def test_bad_shapes_are_refused():
    y, base, _ = model()
    with pytest.raises(ValueError, match="base"):
        FoldSolver(y, base[:8, :8].copy())
    with pytest.raises((ValueError, BufferError)):
        FoldSolver(y.astype(np.float64), base)
