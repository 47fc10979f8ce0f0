"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
Algorithm 1): the dual solution against cvxpy's solution of the *primal* problem on J, the T = 2
closed form against a float64 scalar minimisation, the paper's guarantees, and TorchJD 0.18; then
the shared properties (to the accuracy of the dual solve): expected structure, positive
homogeneity, permutation invariance, a non-zero direction when the tasks share a descent
direction."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar

from torch_mtlgrad.aggregators.cagrad import CAGrad, cagrad_dual_weights
from torch_mtlgrad.aggregators.mgda import MinNorm

from .._properties import (
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import (
    DEGENERATE_MATRICES,
    POSITIVE_SCALES,
    common_direction_matrices,
    gaussian_matrices,
    jacobians,
)


def primal_cvxpy(J: np.ndarray, c: float) -> np.ndarray:
    """max_d min_t g_t . d  s.t.  ||d - g_0|| <= c ||g_0||, solved on J (scaled to unit size)."""
    s = float(np.linalg.norm(J, axis=1).max())
    Jn = J / s
    g0 = Jn.mean(axis=0)
    d = cp.Variable(J.shape[1])
    t = cp.Variable()
    prob = cp.Problem(cp.Maximize(t), [Jn @ d >= t, cp.norm(d - g0, 2) <= c * np.linalg.norm(g0)])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    assert prob.status in ("optimal", "optimal_inaccurate"), prob.status
    return np.asarray(d.value) * s


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
@settings(max_examples=15, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=10, min_log_scale=-6, max_log_scale=6,
                   kinds=("random", "orthogonal", "zero_row", "low_rank")),
       c=st.sampled_from([0.1, 0.4, 0.9]))
# A regression case: the interior-point w* had a spurious 1.6e-7 weight whose Newton polish
# stepped off the simplex; the active-set refinement drops it (worst improvement was 9e-5 short).
@example(J=torch.tensor([[-0.9853, -0.2989, -1.2937, 1.9947], [-1.9541, 0.8805, 1.2282, -0.2072],
                         [-1.3912, -1.2250, 0.2509, 0.4503], [-1.6398, 1.7619, -0.1539, 1.1500]],
                        dtype=torch.float64), c=0.9)
def test_dual_direction_solves_the_primal(J: torch.Tensor, c: float) -> None:
    """d from the dual (closed form or cvxpy) maximises the primal: its worst improvement equals
    the primal optimum and it lies in the ball."""
    g0 = J.mean(0)
    d = CAGrad(c=c)(J)
    scale = float(J.norm(dim=1).max())
    if float(g0.norm()) <= 1e-9 * scale:  # g_0 = 0: the ball is a point
        assert float(d.norm()) <= 1e-9 * scale
        return
    ref = primal_cvxpy(J.numpy(), c)
    worst, worst_ref = float((J @ d).min()), float((J.numpy() @ ref).min())
    assert abs(worst - worst_ref) <= 1e-7 * scale**2, (worst, worst_ref)
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-6) + 1e-9 * scale
    # When 0 is not in the convex hull of the gradients the maximiser lies on the sphere and is
    # unique: the directions agree.  (Otherwise the optimal value is 0, reached on a set.)
    if float(MinNorm()(J).norm()) > 1e-3 * scale:
        assert float(np.linalg.norm(d.numpy() - ref)) <= 1e-5 * scale, (d, ref)


@settings(max_examples=40, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=2, min_log_scale=-6, max_log_scale=6),
       c=st.sampled_from([0.0, 0.1, 0.4, 0.9, 1.5, 10.0]))
def test_two_task_closed_form_is_the_dual_minimiser(J: torch.Tensor, c: float) -> None:
    G = J @ J.T
    w, _ = cagrad_dual_weights(G, c, "closed-form")
    Jn = (J / J.norm(dim=1).max().clamp_min(1e-300)).numpy()
    g0 = Jn.mean(axis=0)
    k = c * float(np.linalg.norm(g0))

    def F(x: float) -> float:  # on the rows themselves: no cancellation in ||g_w||
        gw = x * Jn[0] + (1 - x) * Jn[1]
        return float(gw @ g0 + k * np.linalg.norm(gw))

    res = minimize_scalar(F, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-12})
    best = min(res.fun, F(0.0), F(1.0))
    # From G, the colinearity term A C - B^2 is known to ~eps A C, which moves a kink minimum
    # by ~sqrt(eps): F is then optimal to ~1e-8 (normalised units), else to rounding.
    assert F(float(w[0])) <= best + 1e-7, (float(w[0]), res.x)
    if float(torch.linalg.matrix_rank(J)) == 2:
        assert F(float(w[0])) <= best + 1e-12, (float(w[0]), res.x)
    assert abs(float(w.sum()) - 1) < 1e-12 and bool((w >= 0).all())


def test_guarantees_and_limits() -> None:
    torch.manual_seed(0)
    for T in (2, 3, 5):
        J = torch.randn(T, 8, dtype=torch.float64)
        J[1] = -0.8 * J[0] + 0.2 * J[1]  # a conflict
        g0 = J.mean(0)
        for c in (0.2, 0.4, 0.8):
            d = CAGrad(c=c)(J)
            # g_0 is feasible, so the worst improvement can only be better.
            assert float((J @ d).min()) >= float((J @ g0).min()) - 1e-9
            assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-6)
        # c = 0: the mean gradient.
        assert torch.allclose(CAGrad(c=0.0)(J), g0)
        # Large c: the min-norm (MGDA) direction, up to scale.
        d_big = CAGrad(c=1e6)(J)
        d_mgda = MinNorm()(J)
        cos = float(d_big @ d_mgda / (d_big.norm() * d_mgda.norm()))
        assert cos > 1 - 1e-6
        # Rescaling options of the authors' code.
        d = CAGrad(c=0.4)(J)
        assert torch.allclose(CAGrad(c=0.4, rescale="1+c^2")(J), d / 1.16)
        assert torch.allclose(CAGrad(c=0.4, rescale="1+c")(J), d / 1.4)


def test_closed_form_agrees_with_cvxpy_for_two_tasks() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        J = torch.randn(2, 6, generator=gen, dtype=torch.float64)
        a = CAGrad(method="closed-form")(J)
        b = CAGrad(method="cvxpy")(J)
        assert torch.allclose(a, b, atol=1e-5 * float(J.norm()))


def test_degenerate_dual_projects_g0_onto_the_cone() -> None:
    """0 in the hull with every hull direction within angle arccos(-c) of g_0: the dual optimum
    has g_w* = 0, every d in the ball with J d >= 0 is optimal; we return the one nearest g_0."""
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    agg = CAGrad(c=0.4)
    d = agg(J)
    assert torch.allclose(d, torch.tensor([0.0, 1.0 / 3.0], dtype=torch.float64), atol=1e-7)
    assert bool((J @ d >= -1e-9).all())
    # Opposite colinear pair with c >= 1 (T = 2 closed form): d = 0.
    J2 = torch.tensor([[1.0, 0.0], [-3.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(CAGrad(c=2.0)(J2), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    # A zero row: the dual optimum is at g_w* = 0 = g_1; every d in the ball with g_2 . d >= 0 is
    # optimal, and g_0 itself is one.
    J4 = torch.tensor([[0.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(CAGrad(c=0.4)(J4), J4.mean(0))
    J5 = torch.tensor([[0.0, 0.0], [-2.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    d5 = CAGrad(c=0.4)(J5)
    assert bool((J5 @ d5 >= -1e-9).all())
    assert float((d5 - J5.mean(0)).norm()) <= 0.4 * float(J5.mean(0).norm()) + 1e-9
    # g_0 = 0: d = 0.
    J3 = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    assert torch.equal(CAGrad()(J3), torch.zeros(2, dtype=torch.float64))


def test_validation() -> None:
    with pytest.raises(ValueError, match="c must be"):
        CAGrad(c=-0.1)
    with pytest.raises(ValueError, match="rescale must be"):
        CAGrad(rescale="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method must be"):
        CAGrad(method="scipy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs T = 2"):
        CAGrad(method="closed-form")(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="cvxpy solve"):
        CAGrad(cvxpy_solver="NOT_A_SOLVER")(torch.randn(3, 4))


def test_against_torchjd() -> None:
    """TorchJD 0.18's CAGrad solves the same dual (cvxpy/CLARABEL on an SVD factor of the
    normalised Gramian) and does not rescale: our default rescale="none" is its convention."""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    for T in (2, 3, 6):
        for c in (0.4, 0.9):
            J = torch.randn(T, 10, generator=gen, dtype=torch.float64)
            ref, ours = tj.CAGrad(c=c)(J), CAGrad(c=c)(J)
            assert torch.allclose(ours, ref, rtol=0, atol=1e-4 * float(ref.norm())), (T, c)
    # TorchJD's documented example.
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    assert torch.allclose(CAGrad(c=0.5)(J), torch.tensor([0.1835, 1.2041, 1.2041]), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, max_dim=10, min_log_scale=-6, max_log_scale=6),
       K=gaussian_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        assert_expected_structure(CAGrad(), J.to(dtype))
    assert_expected_structure(CAGrad(), K)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: CAGrad(), DEGENERATE_MATRICES)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=5, max_dim=8, min_log_scale=-3, max_log_scale=3),
       log_s=st.floats(-6, 6), K=gaussian_matrices())
def test_positively_homogeneous(J: torch.Tensor, log_s: float, K: torch.Tensor) -> None:
    """d(s J) = s d(J) for s > 0 (to the accuracy of the dual solve)."""
    assert_positively_homogeneous(lambda: CAGrad(), J, 10.0**log_s, rtol=1e-5,
                                  atol=1e-5 * float(J.norm(dim=1).sum()), norm=True)
    assert_positively_homogeneous(lambda: CAGrad(), K, POSITIVE_SCALES,
                                  atol=1e-6 * scale_of(K))


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       perm_seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_permutation_invariant(J: torch.Tensor, perm_seed: int, K: torch.Tensor) -> None:
    """The dual problem does not depend on the order of the tasks (to the accuracy of its solve)."""
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    assert_permutation_invariant(lambda: CAGrad(), J, perm, rtol=1e-5,
                                 atol=1e-5 * float(J.norm(dim=1).sum()), norm=True)
    assert_permutation_invariant(lambda: CAGrad(), K, 3, atol=1e-6 * scale_of(K))


@settings(max_examples=25, deadline=None)
@given(common_direction_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor) -> None:
    """The rows share a descent direction (0 is not in their hull): d != 0."""
    assert_nonzero_direction(CAGrad(), J)
