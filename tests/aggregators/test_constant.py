"""Constant weights: d = w^T J with validated user weights, against TorchJD 0.18's Constant; then
its properties: expected structure, positive homogeneity, linearity under scaling, permutation
invariance (the weights reordered with the rows) and, with positive weights, a non-zero direction
off strong stationarity (Quinton and Rey 2024)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators.constant import Constant

from .._properties import (
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_linear_under_scaling,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import (
    DEGENERATE_MATRICES,
    POSITIVE_SCALES,
    common_direction_matrices,
    controlled_matrices,
    gaussian_matrices,
    jacobians,
    non_strongly_stationary_matrices,
)


@settings(max_examples=30, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=8, min_log_scale=-6, max_log_scale=6),
       data=st.data())
def test_direction_is_the_weighted_sum(J: torch.Tensor, data: st.DataObject) -> None:
    T = J.shape[0]
    w = data.draw(st.lists(st.floats(-10, 10), min_size=T, max_size=T))
    agg = Constant(w)
    d = agg(J)
    ref = torch.zeros(J.shape[1], dtype=torch.float64)
    for t in range(T):
        ref += w[t] * J[t]
    assert torch.allclose(d, ref, rtol=1e-12, atol=1e-12 * float(J.abs().sum()) * 10)
    assert torch.equal(agg.weights, torch.tensor(w, dtype=torch.float64))
    assert Constant(torch.tensor(w))(J.float()).dtype == torch.float32


def test_validation() -> None:
    with pytest.raises(ValueError, match="3 weights but J has 2 rows"):
        Constant([1.0, 2.0, 3.0])(torch.ones(2, 4))
    with pytest.raises(ValueError, match="1-D"):
        Constant(torch.ones(2, 2))
    with pytest.raises(ValueError, match="empty"):
        Constant([])
    with pytest.raises(ValueError, match="weight of task 1 is nan"):
        Constant([1.0, float("nan")])
    with pytest.raises(ValueError, match="weight of task 0 is inf"):
        Constant(torch.tensor([float("inf")]))
    with pytest.raises(TypeError, match="sequence of numbers"):
        Constant("12")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be numbers"):
        Constant([1.0, "a"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="sequence of numbers"):
        Constant(3.0)  # type: ignore[arg-type]
    assert repr(Constant([0.5, 2])) == "Constant([0.5, 2])"


def test_against_torchjd() -> None:
    tj = pytest.importorskip("torchjd.aggregation")
    J = torch.randn(4, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.tensor([0.1, -2.0, 3.0, 0.0], dtype=torch.float64)
    assert torch.allclose(Constant(w)(J), tj.Constant(w)(J), rtol=1e-14, atol=1e-14)


def increasing(T: int) -> Constant:
    """The positive weights 0.5, 1.5, ..., T - 0.5."""
    return Constant([0.5 + t for t in range(T)])


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, max_dim=10, min_log_scale=-6, max_log_scale=6),
       K=gaussian_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        assert_expected_structure(increasing(J.shape[0]), J.to(dtype))
    assert_expected_structure(increasing(K.shape[0]), K)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: increasing(T), DEGENERATE_MATRICES)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=5, max_dim=8, min_log_scale=-3, max_log_scale=3),
       log_s=st.floats(-6, 6), K=gaussian_matrices())
def test_positively_homogeneous(J: torch.Tensor, log_s: float, K: torch.Tensor) -> None:
    """d(s J) = s d(J) for s > 0."""
    assert_positively_homogeneous(lambda: increasing(J.shape[0]), J, 10.0**log_s, rtol=1e-8,
                                  atol=1e-8 * float(J.norm(dim=1).sum()), norm=True)
    assert_positively_homogeneous(lambda: increasing(K.shape[0]), K, POSITIVE_SCALES,
                                  atol=1e-9 * scale_of(K))


@settings(max_examples=20, deadline=None)
@given(J=controlled_matrices(max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6))
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float]) -> None:
    """The weights do not read J: Constant(w)(diag(c) J) = sum_t w_t c_t g_t, linear in c."""
    T = J.shape[0]
    c1_, c2_ = torch.tensor(c1[:T], dtype=J.dtype), torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(lambda: increasing(T), J, c1_, c2_, atol=1e-12 * 20 * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       perm_seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_permutation_invariant(J: torch.Tensor, perm_seed: int, K: torch.Tensor) -> None:
    """Reordering the rows and the weights alike changes nothing; equal weights need no
    reordering."""
    T = J.shape[0]
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(perm_seed))
    w = torch.arange(1.0, T + 1, dtype=torch.float64)
    assert_permutation_invariant(lambda: Constant(w), J, perm, permuted=lambda: Constant(w[perm]),
                                 rtol=1e-9, atol=1e-9 * float(J.norm(dim=1).sum()), norm=True,
                                 weights=lambda agg: agg.weights)
    assert_permutation_invariant(lambda: Constant([1.0] * K.shape[0]), K, 3,
                                 atol=1e-9 * scale_of(K))


@settings(max_examples=25, deadline=None)
@given(non_strongly_stationary_matrices(max_tasks=6, max_dim=8))
def test_nonzero_off_strong_stationarity(J: torch.Tensor) -> None:
    """The weights are positive: sum_t w_t g_t = 0 with w > 0 only when J is strongly stationary."""
    assert_nonzero_direction(increasing(J.shape[0]), J)


@settings(max_examples=25, deadline=None)
@given(common_direction_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor) -> None:
    """The rows share a descent direction (0 is not in their hull): d != 0."""
    assert_nonzero_direction(increasing(J.shape[0]), J)
