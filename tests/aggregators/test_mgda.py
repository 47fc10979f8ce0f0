"""MinNorm, MGDA's min-norm direction (Sener and Koltun, *Multi-Task Learning as Multi-Objective
Optimization*, NeurIPS 2018; Desideri 2012): in the convex hull and minimal, common descent
(g_t . d >= ||d||^2, the KKT conditions of the min-norm point), the normalisations of Sener and
Koltun's code; then its properties: expected structure at any scale, non-conflicting, permutation
invariance, positive homogeneity, and d = 0 exactly at weakly (Pareto-) stationary matrices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from torch_mtlgrad.aggregators import MinNorm

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
    strictly_weakly_stationary_matrices,
    strongly_stationary_matrices,
)


@settings(max_examples=60, deadline=None)
@given(jacobians(max_tasks=6, min_log_scale=-4, max_log_scale=4))
def test_min_norm_direction_is_in_hull_and_minimal(J: torch.Tensor) -> None:
    agg = MinNorm()
    d = agg(J)
    w = agg.weights
    assert w is not None and bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-9
    assert torch.allclose(d, w @ J)
    # Minimal among the vertices and the mean (cheap necessary check; cvxpy check in test_solvers).
    cands = torch.cat([J, J.mean(0, keepdim=True)])
    assert float(d.norm()) <= float(cands.norm(dim=1).min()) * (1 + 1e-9) + 1e-12 * float(J.norm(dim=1).max())
    # Common descent: g_t . d >= ||d||^2 for every task (KKT of the min-norm point).
    assert bool((J @ d >= (d @ d) * (1 - 1e-7) - 1e-12 * float(J.norm()) ** 2).all())


def test_min_norm_normalizations() -> None:
    J = torch.tensor([[2.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    losses = torch.tensor([0.5, 4.0], dtype=torch.float64)
    for mode, s in [("none", [1.0, 1.0]), ("l2", [2.0, 10.0]), ("loss", [0.5, 4.0]),
                    ("loss+", [1.0, 40.0])]:
        agg = MinNorm(normalization=mode)  # type: ignore[arg-type]
        d = agg(J, losses)
        scales = torch.tensor(s, dtype=torch.float64)
        Js = J / scales[:, None]
        ref = MinNorm()(Js)  # the min-norm point of the scaled rows
        assert torch.allclose(d, ref), (mode, d, ref)
    with pytest.raises(ValueError, match="needs the loss values"):
        MinNorm(normalization="loss")(J)
    with pytest.raises(ValueError, match="normalization must be one of"):
        MinNorm(normalization="bad")  # type: ignore[arg-type]
    # A zero row with l2 normalisation does not divide by zero.
    d = MinNorm(normalization="l2")(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert bool(torch.isfinite(d).all())


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(rank=None), K=controlled_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    assert_expected_structure(MinNorm, J)
    assert_expected_structure(MinNorm, K, weights_atol=1e-12 * float(K.norm(dim=1).sum()))


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(min_tasks=2), R=gaussian_matrices(min_tasks=3, rank=2),
       K=controlled_matrices())
def test_non_conflicting(J: torch.Tensor, R: torch.Tensor, K: torch.Tensor) -> None:
    """On Gaussian matrices, rank-2 ones, and on any rank, stationarity and scale."""
    for M in (J, R, K):
        assert_non_conflicting(MinNorm, M)


@settings(max_examples=25, deadline=None)
@given(gaussian_matrices())
def test_permutation_invariant(J: torch.Tensor) -> None:
    """The min-norm point of the hull is unique, whatever the order of the rows."""
    assert_permutation_invariant(MinNorm, J, 3, atol=1e-9 * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(gaussian_matrices())
def test_positively_homogeneous(J: torch.Tensor) -> None:
    assert_positively_homogeneous(MinNorm, J, POSITIVE_SCALES, atol=1e-9 * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(J=cancelling_row_matrices(), K=strongly_stationary_matrices())
def test_zero_at_strong_stationarity(J: torch.Tensor, K: torch.Tensor) -> None:
    assert_zero_direction(MinNorm, J, rtol=1e-7)
    assert_zero_direction(MinNorm, K, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(strictly_weakly_stationary_matrices())
def test_zero_at_weak_stationarity(J: torch.Tensor) -> None:
    """0 in the hull of the rows, on its relative boundary: the min-norm point is 0 (d = 0 exactly
    at Pareto-stationary points), unlike UPGrad's and DualProj's directions."""
    assert_zero_direction(MinNorm, J, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(J=common_direction_matrices(), K=non_weakly_stationary_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor, K: torch.Tensor) -> None:
    """0 is not in the hull of the rows: its min-norm point is not 0."""
    assert_nonzero_direction(MinNorm, J)
    assert_nonzero_direction(MinNorm, K)
