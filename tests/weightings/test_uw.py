"""Uncertainty weighting (Kendall, Gal and Cipolla, *Multi-Task Learning Using Uncertainty to
Weigh Losses for Scene Geometry and Semantics*, CVPR 2018, eq. 7 and 10): its update equations by
hand in float64 and its fixed point; then its properties: permutation invariance, expected
structure, linearity under scaling of J, and, the weights exp(-s) being positive, a non-zero
direction off strong stationarity; state and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.weightings import UncertaintyWeighting

from .._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_nonzero_direction,
    assert_permutation_invariant,
    scale_of,
)
from ..strategies import (
    controlled_matrices,
    jacobians,
    non_strongly_stationary_matrices,
)
from ._reference import make


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from(["adam", "sgd"]),
       st.floats(1e-4, 0.5), st.floats(-2, 2))
def test_matches_hand_computed_updates(T: int, seed: int, opt: str, lr: float,
                                       init: float) -> None:
    rng = np.random.default_rng(seed)
    agg = UncertaintyWeighting(lr=lr, optimizer=opt, init_log_var=init)
    ref = make(opt, np.full(T, init), lr)
    for _ in range(6):
        J = rng.standard_normal((T, 5))
        L = rng.uniform(0.01, 5.0, size=T)
        s = ref.x
        w = np.exp(-s)
        d = agg(torch.tensor(J), torch.tensor(L))
        assert np.allclose(d.numpy(), w @ J, rtol=1e-12, atol=1e-12)
        assert np.allclose(agg.weights.numpy(), w, rtol=1e-12, atol=0)
        # d/ds of sum exp(-s) L + s
        ref.step(1 - np.exp(-s) * L)
        assert np.allclose(agg.log_var.numpy(), ref.x, rtol=1e-12, atol=1e-12)


def test_sgd_fixed_point_is_log_loss() -> None:
    """The minimiser of exp(-s) L + s is s = log L: with constant losses s converges to it."""
    agg = UncertaintyWeighting(lr=0.2, optimizer="sgd")
    L = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    J = torch.eye(3, dtype=torch.float64)
    for _ in range(300):
        agg(J, L)
    assert torch.allclose(agg.log_var, L.log(), atol=1e-9)
    assert torch.allclose(agg(J, L), 1 / L, atol=1e-9)  # weights exp(-s) = 1 / L


@settings(max_examples=40, deadline=None)
@given(jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), st.floats(-6, 6),
       st.randoms(use_true_random=False))
def test_finite_and_permutation_equivariant(J: torch.Tensor, log_loss: float, rnd) -> None:
    T = J.shape[0]
    L = 10.0 ** (log_loss + torch.arange(T, dtype=J.dtype) / T)
    perm = list(range(T))
    rnd.shuffle(perm)
    assert_permutation_invariant(lambda: UncertaintyWeighting(lr=0.05), [(J, L)] * 3, perm,
                                 rtol=1e-12, atol=1e-12 * float(J.abs().max()),
                                 weights=lambda agg: agg.weights, weights_rtol=1e-5,
                                 weights_atol=1e-8)


def test_state_dict_roundtrip_gives_identical_next_output() -> None:
    rng = np.random.default_rng(0)
    steps = [(torch.tensor(rng.standard_normal((3, 4))), torch.tensor(rng.uniform(0.1, 2, 3)))
             for _ in range(6)]
    a = UncertaintyWeighting(lr=0.1)
    for J, L in steps[:3]:
        a(J, L)
    b = UncertaintyWeighting(lr=0.1)
    b.load_state_dict(a.state_dict())
    for J, L in steps[3:]:
        assert torch.equal(a(J, L), b(J, L))
    assert torch.equal(a.log_var, b.log_var)


def test_validation_and_registry() -> None:
    agg = UncertaintyWeighting()
    with pytest.raises(ValueError, match="needs the loss values"):
        agg(torch.ones(2, 3))
    agg(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="reset"):
        agg(torch.ones(3, 3), torch.ones(3))
    with pytest.raises(ValueError, match="optimizer"):
        UncertaintyWeighting(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="learning rate"):
        UncertaintyWeighting(lr=0.0)
    assert isinstance(get("uw"), UncertaintyWeighting)
    with pytest.raises(ValueError, match="tension"):
        get("uw+tension")
    d = get("uw")(torch.ones(2, 3), torch.ones(2))
    assert d.dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), K=controlled_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    """Over three calls with changing losses, on hard matrices and at any rank and scale."""
    for M in (J, K):
        agg = UncertaintyWeighting(lr=0.05)
        for step in range(3):
            L = torch.linspace(1.0, 3.0, M.shape[0], dtype=M.dtype) ** (-step) + 0.1 * step
            assert_expected_structure(agg, M, L, weights_atol=1e-12 * float(M.norm(dim=1).sum()))


@settings(max_examples=20, deadline=None)
@given(J=controlled_matrices(max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6))
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float]) -> None:
    """The weights read the losses only: with the same losses, A(diag(c) J) = sum_t w_t c_t g_t
    at every step, linear in c."""
    T = J.shape[0]
    steps = [(J, torch.linspace(1.0, 3.0, T, dtype=J.dtype) ** (-k) + 0.1 * k) for k in range(4)]
    c1_, c2_ = torch.tensor(c1[:T], dtype=J.dtype), torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(lambda: UncertaintyWeighting(lr=0.05), steps, c1_, c2_,
                                atol=1e-12 * 20 * T * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(non_strongly_stationary_matrices())
def test_nonzero_off_strong_stationarity(J: torch.Tensor) -> None:
    """Positive weights: d = w^T J = 0 only when J is strongly stationary."""
    agg = UncertaintyWeighting(lr=0.05)
    for step in range(3):
        L = torch.linspace(1.0, 3.0, J.shape[0], dtype=J.dtype) ** (-step) + 0.1 * step
        assert_nonzero_direction(agg, J, L)
