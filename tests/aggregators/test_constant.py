"""Constant weights: d = w^T J with validated user weights, against TorchJD 0.18's Constant."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators.constant import Constant

from ..strategies import jacobians
from ._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_non_zero,
    assert_permutation_invariant,
    matrices,
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


# Shared properties (tests/aggregators/_properties.py) of Constant (positive weights; equal
# weights for permutation invariance).
PROPERTY = settings(max_examples=25, deadline=None)


def _constant(J: torch.Tensor, equal: bool = False) -> Constant:
    return Constant([1.0 if equal else 0.5 + t for t in range(J.shape[0])])


@PROPERTY
@given(matrices())
def test_property_expected_structure(J: torch.Tensor) -> None:
    assert_expected_structure(_constant(J), J)


@PROPERTY
@given(matrices())
def test_property_permutation_invariant(J: torch.Tensor) -> None:
    assert_permutation_invariant(_constant(J, equal=True), J)


@PROPERTY
@given(matrices())
def test_property_linear_under_scaling(J: torch.Tensor) -> None:
    assert_linear_under_scaling(_constant(J), J)


@PROPERTY
@given(non_strongly_stationary_matrices())
def test_property_non_zero_off_stationary(J: torch.Tensor) -> None:
    assert_non_zero(_constant(J), J)
