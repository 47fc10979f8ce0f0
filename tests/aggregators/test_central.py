"""The central direction (Nakamura, Grassi and Wolf, *Leveraging convergence behavior to balance
conflicting tasks in multi-task learning*, arXiv:2204.06698, 2022, eq. 3-4) against a float64
brute-force reference on explicit unit vectors (cvxpy, two stages: eq. 3's minimum, then the
smallest minimiser), the bisector for two tasks, colinear and zero rows; then its properties:
expected structure at any scale, non-conflicting, permutation invariance (also where eq. 3 has
many minimisers: rank-deficient, colinear, D = 1; float64 and float32), positive homogeneity,
d = 0 at strongly stationary matrices and d != 0 where the tasks share a descent direction."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import Central

from .._properties import (
    assert_expected_structure,
    assert_non_conflicting,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    assert_zero_direction,
    permutation_gap,
    scale_of,
)
from ..strategies import (
    POSITIVE_SCALES,
    cancelling_row_matrices,
    common_direction_matrices,
    controlled_matrices,
    gaussian_matrices,
    jacobians,
    non_weakly_stationary_matrices,
    rank_deficient_matrices,
    strongly_stationary_matrices,
    zero_row_matrices,
)


def _solve(prob: cp.Problem) -> None:
    """Solve the reference QP to high accuracy: Clarabel with tight tolerances, then its
    defaults, then OSQP polished; an inaccurate answer is kept only when none is optimal (the
    comparison's tolerance then judges it)."""
    attempts = [{"solver": cp.CLARABEL, "tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12,
                 "tol_feas": 1e-12}, {"solver": cp.CLARABEL}]
    if "OSQP" in cp.installed_solvers():
        attempts.append({"solver": cp.OSQP, "eps_abs": 1e-12, "eps_rel": 1e-12,
                         "max_iter": 200000, "polish": True})
    inaccurate = None
    for opts in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prob.solve(**opts)
        except cp.error.SolverError:
            continue
        if prob.status == "optimal":
            return
        if prob.status == "optimal_inaccurate" and inaccurate is None:
            inaccurate = [v.value.copy() for v in prob.variables()]
    assert inaccurate is not None, prob.status
    for v, value in zip(prob.variables(), inaccurate):
        v.value = value


def smallest_minimiser_cvxpy(Urows: np.ndarray) -> np.ndarray:
    """Brute force, float64: eq. 3 on the unit rows ``Urows`` ([m, D]) by cvxpy, then, among its
    minimisers (the k on the simplex with the same point ``k^T U``, the minimum's point being
    unique), the one of smallest Euclidean norm, a second cvxpy QP.  The point's equations are
    written on an orthonormal basis of the row space of ``Urows^T`` (its independent ones)."""
    m = Urows.shape[0]
    k = cp.Variable(m)
    _solve(cp.Problem(cp.Minimize(cp.sum_squares(Urows.T @ k)), [k >= 0, cp.sum(k) == 1]))
    k1 = np.clip(k.value, 0.0, None)
    k1 /= k1.sum()
    _, sv, Vt = np.linalg.svd(Urows.T, full_matrices=False)
    B = Vt[sv > 1e-9 * sv[0]]
    k2 = cp.Variable(m)
    _solve(cp.Problem(cp.Minimize(cp.sum_squares(k2)),
                      [k2 >= 0, cp.sum(k2) == 1, B @ k2 == B @ k1]))
    k2v = np.clip(k2.value, 0.0, None)
    return k2v / k2v.sum()


def central_reference(J: torch.Tensor) -> torch.Tensor:
    """Eq. 3-4 in float64 on explicit unit vectors, with the smallest minimiser of eq. 3."""
    J = J.double()
    norms = J.norm(dim=1)
    nz = norms > 0
    if not bool(nz.any()):
        return torch.zeros(J.shape[1], dtype=J.dtype)
    U = J[nz] / norms[nz, None]
    k = torch.tensor(smallest_minimiser_cvxpy(U.numpy()))
    gamma = 1 / (k / norms[nz]).sum()
    return gamma * (k @ U)


@settings(max_examples=80, deadline=None)
@given(jacobians(max_tasks=7))
def test_central_is_convex_combination_with_equalised_angles(J: torch.Tensor) -> None:
    agg = Central()
    v = agg(J)
    c = agg.weights
    assert c is not None and bool((c >= 0).all()) and abs(float(c.sum()) - 1) < 1e-9
    assert torch.allclose(v, c @ J, rtol=1e-9, atol=1e-12 * float(J.abs().max()))
    norms = J.norm(dim=1)
    if not bool((norms > 0).any()):
        assert bool((v == 0).all())
        return
    # cvxpy's interior point: ~1e-7 relative on the weights.
    assert torch.allclose(v, central_reference(J), rtol=1e-5, atol=1e-6 * float(norms.max()))


@settings(max_examples=40, deadline=None)
@given(st.one_of(rank_deficient_matrices(max_tasks=8, max_dim=6, min_log_scale=-3,
                                         max_log_scale=3),
                 jacobians(min_tasks=3, max_tasks=7, max_dim=4,
                           kinds=("duplicate", "colinear", "rank1", "low_rank", "opposite")),
                 gaussian_matrices(min_tasks=5, max_tasks=8, max_dim=3)))
def test_smallest_minimiser_matches_cvxpy_two_stage(J: torch.Tensor) -> None:
    """Where eq. 3 has many minimisers (rank below T, colinear rows, more tasks than D): the
    weights are those of the smallest minimiser, against the brute-force cvxpy reference (float64),
    and so is the direction."""
    agg = Central()
    v = agg(J)
    norms = J.norm(dim=1)
    nz = norms > 0
    k_ref = torch.tensor(smallest_minimiser_cvxpy((J[nz] / norms[nz, None]).numpy()))
    c_ref = torch.zeros_like(norms)
    c_ref[nz] = (k_ref / norms[nz]) / (k_ref / norms[nz]).sum()
    assert agg.weights is not None
    assert torch.allclose(agg.weights, c_ref, rtol=0, atol=2e-6), (agg.weights, c_ref)
    assert torch.allclose(v, c_ref @ J, rtol=0, atol=2e-6 * float(norms.sum()))


def test_colinear_rows_share_their_weight() -> None:
    """u_1 = u_2 (rows (1, 0) and (3, 0)) and u_3 = (0, 1): eq. 3's minimisers put 1/2 on the pair
    in any split; the smallest splits it equally, k = (1/4, 1/4, 1/2), so gamma = 1 / (1/4 + 1/12
    + 1/2) = 6/5 and v = 6/5 (1/2, 1/2), in any order of the rows."""
    J = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    agg = Central()
    assert torch.allclose(agg(J), torch.tensor([0.6, 0.6], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(agg.weights, torch.tensor([0.3, 0.1, 0.6], dtype=torch.float64),
                          atol=1e-15)
    assert_permutation_invariant(Central, J, [[1, 2, 0], [2, 0, 1], [0, 2, 1]], atol=1e-15)
    # D = 1, rows of one sign: every k minimises; the smallest is uniform.
    J1 = torch.tensor([[1.0], [3.0], [2.0]], dtype=torch.float64)
    assert torch.allclose(Central()(J1), torch.tensor([3 / (1 + 1 / 3 + 1 / 2)],
                                                      dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(st.one_of(rank_deficient_matrices(min_tasks=3, max_tasks=12, max_dim=10),
                 zero_row_matrices(min_tasks=3, max_tasks=10, max_dim=6),
                 jacobians(min_tasks=3, max_tasks=8, max_dim=5,
                           kinds=("duplicate", "colinear", "rank1", "low_rank", "opposite")),
                 gaussian_matrices(min_tasks=4, max_tasks=10, max_dim=3)),
       st.integers(0, 2**16))
def test_permutation_invariant_where_eq3_is_not_unique(J: torch.Tensor, seed: int) -> None:
    """Rank-deficient (T > rank), zero, duplicate and colinear rows, D = 1: eq. 3 has many
    minimisers and the smallest one permutes with the rows; float64 to 1e-9 of the scale, and the
    same matrices in float32 to 2e-6 (G and v = c^T J accumulated in float64; before, 0.09 on
    such inputs)."""
    s = scale_of(J)
    assert_permutation_invariant(Central, J, 3, seed=seed, atol=1e-9 * s,
                                 weights=lambda a: a.weights, weights_atol=1e-9)
    assert permutation_gap(Central, J.float(), perms=3, seed=seed) <= 2e-6 * s


@pytest.mark.parametrize(("T", "D", "rank"), [(20, 10, 10), (20, 100, 5), (20, 100, 10),
                                             (20, 100, 19), (8, 3, 3)])
def test_float32_permutation_invariant_more_tasks_than_rank(T: int, D: int, rank: int) -> None:
    """The reported shapes: float32 Gaussian J with more tasks than its rank (scale 1 and 100).
    The direction moved by up to 2e-2 at scale 100 with the order of the rows; now ~1e-11."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        for scale in (1.0, 100.0):
            J = scale * torch.randn(T, rank, generator=g) @ torch.randn(rank, D, generator=g)
            assert permutation_gap(Central, J, perms=3, seed=seed) <= 1e-7 * scale_of(J)


@settings(max_examples=60, deadline=None)
@given(jacobians(min_tasks=2, max_tasks=2, kinds=("random", "colinear", "orthogonal")))
def test_central_two_tasks_is_bisector(J: torch.Tensor) -> None:
    g1, g2 = J
    n1, n2 = g1.norm(), g2.norm()
    ref = (g1 * n2 + g2 * n1) / (n1 + n2)
    assert torch.allclose(Central()(J), ref, rtol=1e-9, atol=1e-12 * float(n1 + n2))


def test_central_zero_rows() -> None:
    J = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(Central()(J), J[1])
    assert bool((Central()(torch.zeros(3, 4)) == 0).all())


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(rank=None), K=controlled_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    assert_expected_structure(Central, J)
    assert_expected_structure(Central, K, weights_atol=1e-12 * float(K.norm(dim=1).sum()))


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(min_tasks=2), R=gaussian_matrices(min_tasks=3, rank=2))
def test_non_conflicting(J: torch.Tensor, R: torch.Tensor) -> None:
    """v = gamma k*^T U with k*^T U the min-norm point of the unit rows' hull: u_t . v >= 0."""
    assert_non_conflicting(Central, J)
    assert_non_conflicting(Central, R)


@settings(max_examples=25, deadline=None)
@given(gaussian_matrices())
def test_permutation_invariant(J: torch.Tensor) -> None:
    """Any D (D = 1 with rows of one sign: every k solves eq. 3; the smallest is uniform)."""
    assert_permutation_invariant(Central, J, 3, atol=1e-9 * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(gaussian_matrices())
def test_positively_homogeneous(J: torch.Tensor) -> None:
    assert_positively_homogeneous(Central, J, POSITIVE_SCALES, atol=1e-9 * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(J=cancelling_row_matrices(), K=strongly_stationary_matrices())
def test_zero_at_strong_stationarity(J: torch.Tensor, K: torch.Tensor) -> None:
    """v^T J = 0 with v > 0 and no zero row: 0 is in the unit rows' hull too, so k*^T U = 0."""
    assert_zero_direction(Central, J, rtol=1e-7)
    assert_zero_direction(Central, K, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(J=common_direction_matrices(), K=non_weakly_stationary_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor, K: torch.Tensor) -> None:
    """0 is not in the rows' hull, hence not in the unit rows' hull: v != 0."""
    assert_nonzero_direction(Central, J)
    assert_nonzero_direction(Central, K)
