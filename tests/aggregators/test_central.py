"""The central direction (Nakamura, Grassi and Wolf, *Leveraging convergence behavior to balance
conflicting tasks in multi-task learning*, arXiv:2204.06698, 2022, eq. 3-4) against a float64
reference on explicit unit vectors, the bisector for two tasks, zero rows; then its properties:
expected structure at any scale, non-conflicting, permutation invariance (where eq. 3 has one
solution), positive homogeneity, d = 0 at strongly stationary matrices and d != 0 where the tasks
share a descent direction."""

from __future__ import annotations

import torch
from hypothesis import given, settings

from torch_mtlgrad.aggregators import Central
from torch_mtlgrad.aggregators._solvers import min_norm_weights

from .._properties import (
    assert_expected_structure,
    assert_non_conflicting,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    assert_zero_direction,
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
    strongly_stationary_matrices,
)


@settings(max_examples=80, deadline=None)
@given(jacobians(max_tasks=7))
def test_central_is_convex_combination_with_equalised_angles(J: torch.Tensor) -> None:
    agg = Central()
    v = agg(J)
    c = agg.weights
    assert c is not None and bool((c >= 0).all()) and abs(float(c.sum()) - 1) < 1e-9
    assert torch.allclose(v, c @ J, rtol=1e-9, atol=1e-12 * float(J.abs().max()))
    # Reference: eq. 3-4 in float64 on explicit unit vectors.
    norms = J.norm(dim=1)
    nz = norms > 0
    if not bool(nz.any()):
        assert bool((v == 0).all())
        return
    U = J[nz] / norms[nz, None]
    m = U.shape[0]
    # T = 2 on unit vectors: k* = (1/2, 1/2) (the bisector); otherwise the exact solver.
    kw = min_norm_weights(U @ U.T, "active-set") if m > 2 else torch.full((m,), 1 / m, dtype=J.dtype)
    gamma = 1 / (kw / norms[nz]).sum()
    ref = gamma * (kw @ U)
    assert torch.allclose(v, ref, rtol=1e-6, atol=1e-9 * float(norms.max()))


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
@given(gaussian_matrices(min_dim=2))
def test_permutation_invariant(J: torch.Tensor) -> None:
    """D >= 2: with D = 1 and rows of one sign every k on the simplex solves eq. 3 and eq. 4's
    gamma depends on the one taken, so the direction is not unique."""
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
