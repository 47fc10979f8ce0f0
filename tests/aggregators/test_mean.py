"""Mean and Sum of the task gradients: the values, then their properties (Quinton and Rey, *Jacobian
Descent for Multi-Objective Optimization*, 2024): expected structure at any scale,
permutation invariance, positive homogeneity and linearity under scaling (fixed weights), and,
the weights being positive, a non-zero direction off strong stationarity.  (Not
non-conflicting.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import Mean, Sum

from .._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import (
    POSITIVE_SCALES,
    common_direction_matrices,
    controlled_matrices,
    gaussian_matrices,
    non_strongly_stationary_matrices,
)


def test_mean_and_sum() -> None:
    J = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.0, 1.0]])
    assert torch.allclose(Sum()(J), J.sum(0))
    assert torch.allclose(Mean()(J), J.mean(0))
    assert Mean().gramian_only is False


BOTH = {"mean": Mean, "sum": Sum}


@pytest.mark.parametrize("name", sorted(BOTH))
@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(rank=None), K=controlled_matrices())
def test_expected_structure(name: str, J: torch.Tensor, K: torch.Tensor) -> None:
    assert_expected_structure(BOTH[name], J)
    assert_expected_structure(BOTH[name], K, weights_atol=1e-12 * float(K.norm(dim=1).sum()))


@pytest.mark.parametrize("name", sorted(BOTH))
@settings(max_examples=25, deadline=None)
@given(gaussian_matrices())
def test_permutation_invariant(name: str, J: torch.Tensor) -> None:
    assert_permutation_invariant(BOTH[name], J, 3, atol=1e-9 * scale_of(J))


@pytest.mark.parametrize("name", sorted(BOTH))
@settings(max_examples=25, deadline=None)
@given(gaussian_matrices())
def test_positively_homogeneous(name: str, J: torch.Tensor) -> None:
    assert_positively_homogeneous(BOTH[name], J, POSITIVE_SCALES, atol=1e-9 * scale_of(J))


@pytest.mark.parametrize("name", sorted(BOTH))
@settings(max_examples=25, deadline=None)
@given(J=controlled_matrices(max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6))
def test_linear_under_scaling(name: str, J: torch.Tensor, c1: list[float], c2: list[float]) -> None:
    """Fixed weights: A(diag(c) J) = sum_t w_t c_t g_t is linear in c."""
    T = J.shape[0]
    c1_, c2_ = torch.tensor(c1[:T], dtype=J.dtype), torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(BOTH[name], J, c1_, c2_, atol=1e-12 * 20 * scale_of(J) * T)


@pytest.mark.parametrize("name", sorted(BOTH))
@settings(max_examples=25, deadline=None)
@given(J=non_strongly_stationary_matrices(), K=common_direction_matrices())
def test_nonzero_off_strong_stationarity(name: str, J: torch.Tensor, K: torch.Tensor) -> None:
    """Equal positive weights: d = 0 only when J is strongly stationary (Quinton and Rey 2024);
    in particular where the rows share a descent direction."""
    assert_nonzero_direction(BOTH[name], J)
    assert_nonzero_direction(BOTH[name], K)
