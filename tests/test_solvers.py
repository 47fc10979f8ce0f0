"""The shared solvers against cvxpy and the KKT conditions."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators._solvers import (
    dual_cone_weights,
    min_norm_weights,
    min_norm_weights_pgd,
    project_simplex,
)

from .strategies import jacobians


def solve(prob: cp.Problem) -> None:
    """CLARABEL, or OSQP at tight tolerances where the interior-point method gives up (a cone
    with an empty interior, e.g. {x : J x >= 0} for more rows than columns)."""
    try:
        prob.solve(solver=cp.CLARABEL)
    except cp.error.SolverError:
        prob.solve(solver=cp.OSQP, eps_abs=1e-10, eps_rel=1e-10, max_iter=200_000, polish=True)


def cvxpy_min_norm(J: torch.Tensor) -> float:
    """Optimal value of min ||w^T Jn||^2 over the simplex, Jn = J / max row norm."""
    Jn = J.numpy() / max(float(J.norm(dim=1).max()), 1e-300)
    w = cp.Variable(J.shape[0])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(Jn.T @ w)), [w >= 0, cp.sum(w) == 1])
    solve(prob)
    return float(prob.value)


def normalised_objective(J: torch.Tensor, w: torch.Tensor) -> float:
    Jn = J / J.norm(dim=1).max().clamp_min(1e-300)
    return float((w @ Jn).pow(2).sum())


@settings(max_examples=120, deadline=None)
@given(jacobians(max_tasks=10))
def test_min_norm_matches_cvxpy_and_kkt(J: torch.Tensor) -> None:
    G = J @ J.T
    w = min_norm_weights(G, "active-set")
    assert w.shape == (J.shape[0],)
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-12
    ours = normalised_objective(J, w)
    ref = cvxpy_min_norm(J)
    assert ours <= ref * (1 + 1e-6) + 1e-10, (ours, ref)
    # KKT on the normalised Gramian: (G w)_i >= w^T G w, with equality on the support.
    Gn = (G / torch.diagonal(G).max().clamp_min(1e-300)).numpy()
    wn = w.numpy()
    Gw = Gn @ wn
    obj = wn @ Gw
    tol = 1e-9
    assert np.all(Gw >= obj - tol)
    support = wn > 1e-9
    assert np.all(np.abs(Gw[support] - obj) <= tol)


@settings(max_examples=60, deadline=None)
@given(jacobians(min_tasks=2, max_tasks=2))
def test_closed_form_two_tasks_equals_active_set(J: torch.Tensor) -> None:
    G = J @ J.T
    w_closed = min_norm_weights(G, "closed-form")
    w_exact = min_norm_weights(G, "active-set")
    assert normalised_objective(J, w_closed) <= normalised_objective(J, w_exact) * (1 + 1e-9) + 1e-12


@settings(max_examples=30, deadline=None)
@given(jacobians(max_tasks=6, min_log_scale=-3, max_log_scale=3))
def test_cvxpy_option_and_pgd_close_to_exact(J: torch.Tensor) -> None:
    G = J @ J.T
    exact = normalised_objective(J, min_norm_weights(G, "active-set"))
    via_cvxpy = normalised_objective(J, min_norm_weights(G, "cvxpy"))
    assert via_cvxpy <= exact + 1e-6
    pgd = min_norm_weights_pgd(G, iters=2000)
    assert abs(float(pgd.sum()) - 1) < 1e-9 and bool((pgd >= 0).all())
    assert normalised_objective(J, pgd) <= exact + 1e-3


def test_min_norm_known_cases() -> None:
    # Opposite gradients: the origin is in the hull (Pareto-stationary), d = 0.
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    w = min_norm_weights(J @ J.T)
    assert torch.allclose(w @ J, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    # One zero row: all weight on it.
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(min_norm_weights(J @ J.T) @ J, torch.zeros(2, dtype=torch.float64))
    # All rows zero: uniform weights, no NaN.
    w = min_norm_weights(torch.zeros(3, 3))
    assert torch.allclose(w, torch.full((3,), 1 / 3))
    # Single task.
    assert min_norm_weights(torch.ones(1, 1)).tolist() == [1.0]


def test_min_norm_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        min_norm_weights(torch.ones(2, 3))
    with pytest.raises(ValueError, match="T = 2"):
        min_norm_weights(torch.eye(3), "closed-form")
    with pytest.raises(ValueError, match="unknown min-norm method"):
        min_norm_weights(torch.eye(3), "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        min_norm_weights(torch.tensor([[1.0, 0, 0], [0, float("nan"), 0], [0, 0, 1]]), "active-set")


@settings(max_examples=80, deadline=None)
@given(jacobians(max_tasks=8), st.integers(0, 2**31 - 1))
def test_dual_cone_projection_matches_cvxpy(J: torch.Tensor, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scale = float(J.norm(dim=1).max())
    if scale == 0:
        return
    Jn = J / scale  # cvxpy's tolerances are absolute: compare on a normalised problem
    v = torch.tensor(rng.standard_normal(J.shape[1]), dtype=torch.float64)
    lam = dual_cone_weights(Jn @ Jn.T, Jn @ v)
    assert bool((lam >= 0).all())
    d = v + lam @ Jn
    assert bool((Jn @ d >= -1e-9).all())
    x = cp.Variable(J.shape[1])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - v.numpy())), [Jn.numpy() @ x >= 0])
    solve(prob)
    ours = float((d - v).pow(2).sum())
    assert ours <= prob.value + 1e-6 * max(1.0, prob.value)
    assert np.abs(d.numpy() - x.value).max() <= 1e-4 * max(1.0, float(v.norm()))


def test_dual_cone_batched_columns_equal_single() -> None:
    torch.manual_seed(0)
    J = torch.randn(5, 7, dtype=torch.float64)
    B = torch.randn(5, 3, dtype=torch.float64)
    G = J @ J.T
    lam = dual_cone_weights(G, B)
    for k in range(3):
        assert torch.allclose(lam[:, k], dual_cone_weights(G, B[:, k]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12))
def test_project_simplex_matches_cvxpy(values: list[float]) -> None:
    v = torch.tensor(values, dtype=torch.float64)
    p = project_simplex(v)
    assert abs(float(p.sum()) - 1) < 1e-9 and bool((p >= 0).all())
    x = cp.Variable(len(values))
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - v.numpy())), [x >= 0, cp.sum(x) == 1])
    solve(prob)
    # The projection is unique; ours must be at least as close to v as cvxpy's point.
    assert float((p - v).pow(2).sum()) <= prob.value + 1e-7 * max(1.0, prob.value)


@settings(max_examples=80, deadline=None)
@given(J=jacobians(max_tasks=10), other=jacobians(max_tasks=10), seed=st.integers(0, 2**16),
       guess=st.sampled_from(["previous", "random", "all", "wrong size"]))
def test_warm_started_active_set_equals_cold(J: torch.Tensor, other: torch.Tensor, seed: int,
                                             guess: str) -> None:
    """A remembered support is only a first guess: whatever it is (the last problem's, a random
    or a full one, or one of another size), the warm solve gives the cold solve's direction (the
    weights themselves may differ where the optimum is not unique, e.g. 0 in the hull), for
    min-norm and for the dual cone."""
    T = J.shape[0]
    G = J @ J.T
    gen = np.random.default_rng(seed)
    if guess == "previous":
        warm: dict = {}
        min_norm_weights(other @ other.T, warm=warm)
    elif guess == "random":
        warm = {"support": gen.random(T) < 0.5}
    elif guess == "all":
        warm = {"support": np.ones(T, dtype=bool)}
    else:
        warm = {"support": np.ones(T + 1, dtype=bool)}
    scale = max(float(J.norm(dim=1).max()), 1e-300)
    cold = min_norm_weights(G)
    hot = min_norm_weights(G, warm=warm)
    assert float((hot @ J - cold @ J).norm()) <= 1e-9 * scale
    assert torch.equal(min_norm_weights(G, warm=warm), hot)  # again, from its own support
    if T > 2:  # (T = 2 has a closed form: no active set)
        assert np.array_equal(warm["support"], (hot > 0).numpy())
    v = torch.as_tensor(gen.standard_normal((J.shape[1], 2)), dtype=J.dtype) * scale
    wd: dict = {0: {"support": gen.random(T) < 0.5}}
    d_hot = v + J.T @ dual_cone_weights(G, J @ v, warm=wd)  # the projections of v's columns
    d_cold = v + J.T @ dual_cone_weights(G, J @ v)
    assert float((d_hot - d_cold).norm()) <= 1e-8 * scale
    assert set(wd) == {0, 1}
