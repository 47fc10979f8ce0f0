"""FairGrad (Ban and Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024) against an
independent float64 reference (cvxpy on the convex problem whose stationarity condition is
``G w = w^(-1/alpha)``) and TorchJD 0.18's ``FairGrad`` (the authors' least squares); the equation
itself to the stated tolerance; the paper's properties: every task improves
(``g_i . d = w_i^(-1/alpha) > 0``, non-conflicting), permutation invariance, the scaling law
``d(cJ) = c^((1 - alpha) / (1 + alpha)) d(J)``; zero rows; a clear error (never other weights)
at Pareto-stationary inputs and when the solve does not converge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.fairgrad import FairGrad, FairGradSolveError, fairgrad_weights

from .._properties import (
    assert_close,
    assert_expected_structure,
    assert_non_conflicting,
    assert_permutation_invariant,
    scale_of,
)
from ..strategies import non_weakly_stationary_matrices, strongly_stationary_matrices

ALPHAS = st.sampled_from([0.5, 1.0, 2.0])


def cvxpy_weights(G: np.ndarray, alpha: float) -> np.ndarray:
    """argmin_{w > 0} 1/2 w^T G w - sum_i psi(w_i), psi' = w^(-1/alpha): the convex problem whose
    stationarity condition is FairGrad's equation, solved by cvxpy (Clarabel)."""
    cp = pytest.importorskip("cvxpy")
    T = G.shape[0]
    s = float(np.max(np.diag(G)))  # solve on G / s: w(G / s) = s^(alpha / (1 + alpha)) w(G)
    evals, V = np.linalg.eigh(G / s)
    L = V * np.sqrt(np.clip(evals, 0, None))
    w = cp.Variable(T, pos=True)
    p = 1.0 / alpha
    if p == 1.0:
        barrier = -cp.sum(cp.log(w))
    elif p < 1.0:
        barrier = -cp.sum(cp.power(w, 1 - p)) / (1 - p)
    else:
        barrier = cp.sum(cp.power(w, 1 - p)) / (p - 1)
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ w) + barrier)).solve(
        solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return np.asarray(w.value) * s ** (-alpha / (1 + alpha))


def equation_error(G: torch.Tensor, w: torch.Tensor, alpha: float) -> float:
    """max_i |(G w)_i - w_i^(-1/alpha)| / w_i^(-1/alpha) over the non-zero rows."""
    nz = torch.diagonal(G) > 0
    rhs = w[nz] ** (-1.0 / alpha)
    return float(((G @ w)[nz] - rhs).abs().div(rhs).max())


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
@settings(max_examples=20, deadline=None)
@given(J=non_weakly_stationary_matrices(min_tasks=2, max_tasks=6, max_dim=10, min_log_scale=-3,
                                        max_log_scale=3), alpha=ALPHAS)
def test_matches_cvxpy_reference(J: torch.Tensor, alpha: float) -> None:
    G = J @ J.T
    agg = FairGrad(alpha)
    agg(J)
    w = agg.weights
    assert w is not None and bool((w > 0).all())
    ref = cvxpy_weights(G.numpy(), alpha)
    # Clarabel's power cones are accurate to a few 1e-6 (largest seen over 200 examples:
    # 8.6e-6 relative); the equation itself, checked here, pins ours to rounding.
    assert np.allclose(w.numpy(), ref, rtol=5e-5, atol=0), (w, ref)
    assert equation_error(G, w, alpha) <= 1e-9
    assert float(agg.diagnostics["residual"]) <= 1e-9


@settings(max_examples=30, deadline=None)
@given(J=non_weakly_stationary_matrices(min_tasks=1, max_tasks=8, max_dim=12, min_log_scale=-6,
                                        max_log_scale=6), alpha=ALPHAS)
def test_every_task_improves_by_its_share(J: torch.Tensor, alpha: float) -> None:
    """g_i . d = w_i^(-1/alpha) > 0 for every task (to the stated tolerance), so d is
    non-conflicting; or a FairGradSolveError, never other weights."""
    agg = FairGrad(alpha)
    try:
        out = assert_expected_structure(agg, J)
    except FairGradSolveError as err:  # float64 cannot resolve the utilities (cancellation)
        assert "cannot resolve" in str(err)
        return
    w = out.weights
    assert w is not None and bool((w > 0).all())
    utilities = J @ out.direction
    assert_close(utilities, w ** (-1.0 / alpha), rtol=1e-9 + 1e-12 * float(J.shape[0]))
    assert_non_conflicting(out.direction, J)


@settings(max_examples=20, deadline=None)
@given(J=non_weakly_stationary_matrices(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3,
                                        max_log_scale=3), alpha=ALPHAS,
       perm_seed=st.integers(0, 2**31 - 1))
def test_permutation_invariant(J: torch.Tensor, alpha: float, perm_seed: int) -> None:
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    assert_permutation_invariant(lambda: FairGrad(alpha), J, perm, rtol=1e-8,
                                 atol=1e-10 * scale_of(J), norm=True,
                                 weights=lambda a: a.weights, weights_rtol=1e-8)


@settings(max_examples=20, deadline=None)
@given(J=non_weakly_stationary_matrices(min_tasks=1, max_tasks=6, max_dim=8, min_log_scale=-2,
                                        max_log_scale=2), alpha=ALPHAS, log_c=st.floats(-3, 3))
def test_scaling_law(J: torch.Tensor, alpha: float, log_c: float) -> None:
    """J -> c J: w -> c^(-2 alpha / (1 + alpha)) w and d -> c^((1 - alpha) / (1 + alpha)) d
    (scale-free at alpha = 1)."""
    c = 10.0 ** log_c
    a, b = FairGrad(alpha), FairGrad(alpha)
    d, dc = a(J), b(c * J)
    assert_close(b.weights, c ** (-2 * alpha / (1 + alpha)) * a.weights, rtol=1e-8)
    assert_close(dc, c ** ((1 - alpha) / (1 + alpha)) * d, rtol=1e-8,
                 atol=1e-10 * float(dc.norm()), norm=True)
    if alpha == 1.0:
        assert abs(float(d @ d) - J.shape[0]) <= 1e-8 * J.shape[0]  # ||d||^2 = T


def test_against_torchjd() -> None:
    """TorchJD 0.18's FairGrad (SciPy's least squares from 1/T, as the authors): the same weights
    wherever its answer solves the equation (to its own accuracy, which we measure); at
    alpha = 0 it returns 1/T, ours the limit 1: ours = T * theirs."""
    tj = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("scipy")
    gen = torch.Generator().manual_seed(0)
    worst, compared = 0.0, 0
    for T in (2, 3, 5, 8):
        for alpha in (0.5, 1.0, 2.0, 5.0):
            for _ in range(3):
                J = torch.randn(T, 16, generator=gen, dtype=torch.float64)
                J = J * 10 ** torch.empty(T, 1, dtype=torch.float64).uniform_(-1, 1, generator=gen)
                G = J @ J.T
                theirs = tj.FairGradWeighting(alpha)(G)
                ours = fairgrad_weights(G, alpha)[0]
                assert equation_error(G, ours, alpha) <= 1e-9
                err = equation_error(G, theirs, alpha)
                if err > 1e-6:  # SciPy stopped early (e.g. alpha = 5): ours is the solution
                    continue
                compared += 1
                # The weights' error is of the order of the equation's (conditioning ~ 1).
                diff = float(((ours - theirs).abs() / ours).max())
                worst = max(worst, diff)
                assert diff <= 1e3 * err + 1e-12, (T, alpha, diff, err)
                d_theirs = tj.FairGrad(alpha)(J)
                assert_close(FairGrad(alpha)(J), d_theirs, rtol=1e3 * err + 1e-12, norm=True)
            J = torch.randn(T, 16, generator=gen, dtype=torch.float64)
            assert_close(fairgrad_weights(J @ J.T, 0.0)[0],
                         T * tj.FairGradWeighting(0.0)(J @ J.T), rtol=1e-15)
    assert compared >= 30, compared
    print(f"FairGrad vs TorchJD: {compared} cases, largest relative weight difference {worst:.3g}")


def test_orthogonal_and_equal_rows_closed_forms() -> None:
    # Orthogonal rows: w_i = ||g_i||^(-2 alpha / (1 + alpha)).
    J = torch.diag(torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64))
    for alpha in (0.5, 1.0, 3.0):
        w = fairgrad_weights(J @ J.T, alpha)[0]
        assert_close(w, torch.diagonal(J) ** (-2 * alpha / (1 + alpha)), rtol=1e-14)
    # T equal rows g: w_i = (T ||g||^2)^(-alpha / (1 + alpha)), d = T w_1 g (unnormalised).
    g = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    J = g.expand(4, 3).clone()
    for alpha in (0.5, 1.0, 3.0):
        agg = FairGrad(alpha)
        d = agg(J)
        x = (4 * float(g @ g)) ** (-alpha / (1 + alpha))
        assert_close(agg.weights, torch.full((4,), x, dtype=torch.float64), rtol=1e-12)
        assert_close(d, 4 * x * g, rtol=1e-12)


def test_zero_rows_get_weight_zero() -> None:
    J = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 2.0, -1.0]], dtype=torch.float64)
    agg = FairGrad()
    d = agg(J)
    assert float(agg.weights[1]) == 0.0
    sub = FairGrad()
    assert_close(d, sub(J[[0, 2]]), rtol=1e-15)
    assert_close(agg.weights[[0, 2]], sub.weights, rtol=1e-15)
    assert torch.equal(FairGrad()(torch.zeros(3, 4)), torch.zeros(4))
    one = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # w = ||g||^(-1) at alpha = 1
    assert_close(FairGrad()(one), one[0] / 5, rtol=1e-15)


@settings(max_examples=20, deadline=None)
@given(J=strongly_stationary_matrices(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3,
                                      max_log_scale=3), alpha=ALPHAS)
def test_pareto_stationary_inputs_raise(J: torch.Tensor, alpha: float) -> None:
    """0 = v^T J with v > 0: no update improves every task, the equation has no solution."""
    agg = FairGrad(alpha)
    with pytest.raises(FairGradSolveError, match="Pareto-stationary"):
        agg(J)
    assert agg.weights is None


def test_errors_name_tasks_and_change_nothing() -> None:
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    with pytest.raises(FairGradSolveError, match=r"tasks \[0, 1\]\) are Pareto-stationary"):
        FairGrad()(J)
    # With absent tasks, tasks are named by their index among all tasks.
    with pytest.raises(FairGradSolveError, match=r"tasks \[1, 3\]"):
        FairGrad().aggregate(J, present=[False, True, False, True])
    # A solve cut short raises instead of returning its iterate.
    K = torch.tensor([[1.0, 0.0], [-0.9, 0.1]], dtype=torch.float64)
    with pytest.raises(FairGradSolveError, match="did not solve .* in 1 steps"):
        FairGrad(max_iter=1)(K)
    assert FairGrad()(K).shape == (2,)
    # Nearly opposite rows: float64 cannot resolve the utilities.
    with pytest.raises(FairGradSolveError, match="cannot resolve"):
        FairGrad()(torch.tensor([[1.0, 0.0], [-1.0, 1e-6]], dtype=torch.float64))


def test_arguments_and_registry() -> None:
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
            FairGrad(alpha=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tol must be a positive number"):
        FairGrad(tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be a positive int"):
        FairGrad(max_iter=0)
    for name in ("fairgrad", "fair-grad", "FAIR_GRAD"):
        assert isinstance(get(name), FairGrad)
    assert get("fairgrad").alpha == 1.0  # the authors' default
    agg = get("fairgrad")
    assert agg.reads == "gramian" and not agg.stateful and not agg.random
    # The weights from G alone equal those from J (the Gramian path).
    J = torch.tensor([[1.0, 0.5, 0.0], [0.2, 1.0, -0.3]], dtype=torch.float64)
    assert_close(agg.aggregate_gramian(J @ J.T).weights, FairGrad().aggregate(J).weights,
                 rtol=1e-14)
