"""ALS on a synthetic dataset with planted tastes: both trainers beat the popularity baseline on
a time-based hold-out, evaluated through the serving ranker; implicit's solver agrees with ours."""
from __future__ import annotations

import random

import numpy as np
import pytest
import scipy.sparse as sp

from services.model.als import AlsParams, FoldIn, implicit_available, train
from services.model.metrics import catalogue_of, evaluate, ranker
from services.model.split import cutoff_for, holdout_truth, time_split
from services.model.transform import Interaction, interaction_matrix

DAY = 86_400_000
PARAMS = AlsParams(factors=8, regularization=0.1, alpha=10.0, iterations=10, seed=1)


def planted(users: int = 240, groups: int = 4, per_group: int = 15, seed: int = 11) -> list[Interaction]:
    """Users of one taste group interact with that group's items; items of group 0 are the most
    popular overall (group sizes 40 %, 20 %, 20 %, 20 %), plus 5 % noise on random items."""
    rng = random.Random(seed)
    items = [[f"g{g}i{j}" for j in range(per_group)] for g in range(groups)]
    rows = []
    for u in range(users):
        g = 0 if u < users * 0.4 else 1 + u % (groups - 1)
        for _ in range(12):
            pool = items[rng.randrange(groups)] if rng.random() < 0.05 else items[g]
            action = "click" if rng.random() < 0.3 else "view"
            rows.append(Interaction(f"u{u}", rng.choice(pool), action, rng.randrange(100 * DAY)))
    return rows


def fit_and_evaluate(backend: str, k: int = 10):
    rows = planted()
    split = time_split(rows, cutoff_for(rows, 0.2))
    train_m = interaction_matrix(split.train)
    factors = train(train_m.matrix, PARAMS, backend=backend)
    catalogue = catalogue_of(train_m, factors.items)
    truth = holdout_truth(split, set(train_m.items))
    model = evaluate(ranker(catalogue, train_m, factors.users), truth, k)
    popular = evaluate(ranker(catalogue, train_m, None), truth, k)
    return factors, model, popular


BACKENDS = ["numpy"] + (["implicit"] if implicit_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_als_beats_popularity_on_planted_tastes(backend):
    factors, model, popular = fit_and_evaluate(backend)
    assert factors.backend == backend
    assert factors.users.shape == (240, 8) and factors.items.shape == (60, 8)
    assert factors.users.dtype == factors.items.dtype == np.float32
    assert model.users == popular.users > 100
    assert model.recall > popular.recall + 0.2, (model, popular)
    assert model.ndcg > popular.ndcg + 0.2, (model, popular)


def test_numpy_training_is_deterministic_for_a_seed():
    m = interaction_matrix(planted(users=40)).matrix
    a, b = train(m, PARAMS, "numpy"), train(m, PARAMS, "numpy")
    assert np.array_equal(a.users, b.users) and np.array_equal(a.items, b.items)


def test_implicit_is_installed():
    """`implicit` is a dependency (pyproject.toml): its absence is a broken install, not a skip."""
    assert implicit_available()


def test_fold_in_matches_implicits_own_solver():
    """Serving's fold-in uses implicit's confidence convention: same answer as its Cholesky
    recalculate_user for a user it never saw."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    m = interaction_matrix(planted(users=60)).matrix
    with threadpool_limits(1, "blas"):
        with_implicit = AlternatingLeastSquares(factors=8, regularization=0.1, alpha=10.0,
                                                iterations=5, random_state=0, num_threads=1)
        with_implicit.fit(m, show_progress=False)
    newcomer = sp.csr_matrix((np.array([1.0, 2.0, 1.0], np.float32), np.array([0, 3, 7]),
                              np.array([0, 3])), shape=(1, m.shape[1]))
    expected = with_implicit.recalculate_user(0, newcomer)
    got = FoldIn(with_implicit.item_factors, AlsParams(factors=8, regularization=0.1, alpha=10.0)
                 ).vector(np.array([0, 3, 7]), np.array([1.0, 2.0, 1.0], np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"factors": 0}, {"alpha": 0.5}, {"regularization": 0.0},
                                    {"iterations": 0}, {"threads": 0}])
def test_bad_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        AlsParams(**kwargs)


@pytest.mark.parametrize("kwargs,why", [
    ({"alpha": float("nan")}, "NaN compares False, so `alpha < 1` alone let it through"),
    ({"alpha": float("inf")}, "confidences overflow"),
    ({"regularization": float("nan")}, "NaN compares False"),
    ({"regularization": float("inf")}, "an infinite diagonal gives NaN factors"),
])
def test_params_must_be_finite(kwargs, why):
    with pytest.raises(ValueError, match="must be finite numbers"):
        AlsParams(**kwargs)


@pytest.mark.parametrize("argv", [["--alpha", "nan"], ["--regularization", "inf"],
                                  ["--backend", "numpy", "--alpha", "nan"]])
def test_the_cli_refuses_non_finite_params_with_exit_2(argv, capsys):
    from services.cli import main

    assert main(["train", "--no-announce", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clickloop train: ALS parameters: ") and "must be finite" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_that_gives_non_finite_factors_is_an_error(backend):
    """A finite alpha so large that alpha x weight overflows: implicit raises its own error,
    numpy ALS returns NaN factors; both are one FitError, never factors to write."""
    from services.model.als import FitError

    m = interaction_matrix(planted(users=40)).matrix
    with pytest.raises(FitError, match="alpha=1e[+]308"):
        train(m, AlsParams(factors=4, iterations=2, alpha=1e308), backend)


def test_train_command_refuses_them_before_writing_anything():
    """`fit` runs before the artifact is written (train.run): its TrainError is exit 2 with
    the parameters to change, and no artifact."""
    import argparse

    from services.model.train import TrainError, TrainOptions, fit

    args = argparse.Namespace(name=None, since=None, until=None, test_fraction=0.2, factors=4,
                              iterations=2, regularization=0.1, alpha=1e308, backend="numpy", k=5,
                              no_announce=True, precompute=False, precompute_k=None,
                              active_days=7.0, json=False)
    with pytest.raises(TrainError, match="nothing written. Lower --alpha or raise --regularization"):
        fit(planted(users=40), TrainOptions.from_args(args, "als"))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError):
        train(sp.csr_matrix((2, 2), dtype=np.float32), PARAMS, backend="gpu")  # type: ignore[arg-type]


def test_implicit_trains_with_one_blas_thread_even_when_imported_first_by_train():
    """The BLAS limit covers the OpenBLAS that importing implicit loads (a fresh process: in
    this one an earlier test may have imported it already); implicit warns otherwise."""
    import subprocess
    import sys

    code = ("import numpy as np, scipy.sparse as sp\n"
            "from services.model.als import AlsParams, train\n"
            "m = sp.random(40, 20, density=0.3, format='csr', dtype=np.float32, random_state=0)\n"
            "print(train(m, AlsParams(factors=4, iterations=2), 'implicit').backend)\n")
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "implicit", done.stderr


@pytest.mark.parametrize("alpha", [40.0, 0.01])
def test_solve_one_is_the_equation_whether_cholesky_applies_or_not(alpha):
    """Confidences >= 1 (alpha 40): positive definite, Cholesky. Far below 1 (alpha 0.01)
    with a tiny regularization: the matrix is indefinite and the LU fallback answers."""
    from services.model.als import solve_one

    rng = np.random.default_rng(1)
    items = rng.standard_normal((50, 8))
    base = items.T @ items + 1e-6 * np.eye(8)
    y = 10 * rng.standard_normal((6, 8))
    c = alpha * rng.random(6)
    a = base + (y.T * (c - 1.0)) @ y
    if alpha < 1:
        assert np.linalg.eigvalsh(a).min() < 0  # the fallback case really is not definite
    np.testing.assert_allclose(solve_one(base, y, c), np.linalg.solve(a, y.T @ c), rtol=1e-8, atol=1e-10)
