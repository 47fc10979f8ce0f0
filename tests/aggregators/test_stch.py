"""STCH (Lin et al., *Smooth Tchebycheff Scalarization for Multi-Objective Optimization*, ICML
2024): the weights are the gradient of ``mu log sum_t exp(lambda_t (L_t - z_t) / mu)``, checked
against torch.autograd of the scalarisation written out here and finite differences in
float64; LibMTL's STCH (log losses over its nadir vector, times T; its warm-up's sum of log
losses); the running-minimum ideal point by hand, its state and absent tasks; then its
properties: weights on the simplex with the default preference, the limit mu -> 0 (the
Tchebycheff max), invariance to a common shift of the losses, permutation invariance,
expected structure, linearity under scaling of J, a non-zero direction off strong
stationarity; validation and the loss-only route."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.stch import STCH

from .._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_nonzero_direction,
    assert_permutation_invariant,
    scale_of,
)
from ..strategies import controlled_matrices, jacobians, non_strongly_stationary_matrices
from ._loss_weighting import (
    autograd_gradient,
    finite_difference_gradient,
    max_loss_route_difference,
)

VALUES = st.lists(st.floats(0.01, 10.0), min_size=8, max_size=8)


def g_mu(L: torch.Tensor, lam: torch.Tensor, z: torch.Tensor, mu: float) -> torch.Tensor:
    """The smooth Tchebycheff scalarisation, with the max taken out of the exponent."""
    a = lam * (L - z) / mu
    m = a.max().detach()
    return mu * (m + torch.log(torch.exp(a - m).sum()))


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 8), L=VALUES, lam=VALUES, z=VALUES, mu=st.floats(0.01, 10.0))
def test_weights_are_the_gradient_of_g_mu(T: int, L: list[float], lam: list[float],
                                          z: list[float], mu: float) -> None:
    Lt, lt, zt = (torch.tensor(v[:T], dtype=torch.float64) for v in (L, lam, z))
    agg = STCH(mu=mu, preference=lt, ideal=zt)
    agg(torch.eye(T, dtype=torch.float64), Lt)
    F = lambda x: g_mu(x, lt, zt, mu)
    torch.testing.assert_close(agg.weights, autograd_gradient(F, Lt), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(agg.weights, finite_difference_gradient(F, Lt), rtol=1e-5,
                               atol=1e-6 * float(lt.max()))
    torch.testing.assert_close(agg.diagnostics["objective"], F(Lt), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 8), L=VALUES, nadir=VALUES, mu=st.floats(0.05, 10.0))
def test_against_libmtl_stch(T: int, L: list[float], nadir: list[float], mu: float) -> None:
    """LibMTL's STCH after its warm-up: losses log(L / nadir + 1e-20), minus their max, and
    T mu log sum exp(. / mu): its gradient is T times ours with log_losses=True, ideal=nadir."""
    Lt, nt = (torch.tensor(v[:T], dtype=torch.float64) for v in (L, nadir))

    def libmtl(x: torch.Tensor) -> torch.Tensor:
        losses = torch.log(x / nt + 1e-20)
        reg = losses - torch.max(losses.data).detach()
        return mu * torch.log(torch.sum(torch.exp(reg / mu))) * T

    agg = STCH(mu=mu, ideal=nt, log_losses=True)
    agg(torch.eye(T, dtype=torch.float64), Lt)
    torch.testing.assert_close(T * agg.weights, autograd_gradient(libmtl, Lt), rtol=1e-10,
                               atol=0)
    # Its warm-up trains on sum_t log L_t (weights 1 / L_t): T times ours as mu -> infinity.
    warm = STCH(mu=1e12, log_losses=True)
    warm(torch.eye(T, dtype=torch.float64), Lt)
    torch.testing.assert_close(T * warm.weights, 1 / Lt, rtol=1e-9, atol=0)


def test_hand_example_and_the_tchebycheff_limit() -> None:
    L = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    w = STCH()(torch.eye(3, dtype=torch.float64), L)
    torch.testing.assert_close(w, torch.softmax(L, 0), rtol=1e-15, atol=0)
    # mu -> 0: all the weight on the largest lambda_t (L_t - z_t), times lambda_t.
    lam = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    w = STCH(mu=1e-3, preference=lam)(torch.eye(3, dtype=torch.float64), L)
    torch.testing.assert_close(w, torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64), rtol=0,
                               atol=1e-12)


def test_running_minimum_ideal_point() -> None:
    """ideal='min': z is the running minimum of each loss (this call's included); by hand."""
    steps = [torch.tensor(v, dtype=torch.float64) for v in
             ([2.0, 1.0], [1.5, 3.0], [2.5, 0.5], [1.0, 1.0])]
    agg = STCH(mu=0.5, ideal="min")
    z = torch.full((2,), math.inf, dtype=torch.float64)
    for k, L in enumerate(steps):
        w = agg(torch.eye(2, dtype=torch.float64), L)
        z = torch.minimum(z, L)
        torch.testing.assert_close(w, torch.softmax((L - z) / 0.5, 0), rtol=1e-15, atol=0)
        torch.testing.assert_close(agg.diagnostics["ideal"], z, rtol=0, atol=0)
        if k == 1:
            state = agg.state_dict()
    assert torch.equal(agg.running_min, torch.tensor([1.0, 0.5], dtype=torch.float64))
    # Resume: the same next steps.
    b = STCH(mu=0.5, ideal="min")
    b.load_state_dict(state)
    a = STCH(mu=0.5, ideal="min")
    for L in steps[:2]:
        a(torch.eye(2, dtype=torch.float64), L)
    for L in steps[2:]:
        assert torch.equal(a(torch.eye(2, dtype=torch.float64), L),
                           b(torch.eye(2, dtype=torch.float64), L))
    # Absent tasks: an absent task's minimum does not move; a new task starts at its loss.
    c = STCH(ideal="min")
    c.aggregate(torch.eye(2), torch.tensor([3.0, 2.0]), present=[True, False, True])
    assert c.running_min.tolist() == [3.0, math.inf, 2.0]
    c.aggregate(torch.eye(2), torch.tensor([1.0, 5.0]), present=[False, True, True])
    assert c.running_min.tolist() == [3.0, 1.0, 2.0]
    c.reset()
    assert c.running_min is None
    with pytest.raises(ValueError, match="ideal='min'"):
        STCH().load_state_dict(state)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), L=VALUES,
       shift=st.floats(-5, 5), rnd=st.randoms(use_true_random=False))
def test_simplex_shift_invariance_and_permutation(J: torch.Tensor, L: list[float], shift: float,
                                                  rnd) -> None:
    T = J.shape[0]
    Lt = torch.tensor(L[:T], dtype=J.dtype)
    a, b = STCH(), STCH()
    a(J, Lt)
    b(J, Lt + shift)
    assert bool((a.weights > 0).all()) and abs(float(a.weights.sum()) - 1) < 1e-12
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-9, atol=1e-12)
    perm = list(range(T))
    rnd.shuffle(perm)
    assert_permutation_invariant(lambda: STCH(ideal="min"), [(J, Lt), (J, Lt.flip(0))], perm,
                                 rtol=1e-12, atol=1e-12 * T * scale_of(J),
                                 weights=lambda x: x.weights, weights_rtol=1e-12,
                                 weights_atol=1e-15)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), K=controlled_matrices(),
       L=VALUES)
def test_expected_structure(J: torch.Tensor, K: torch.Tensor, L: list[float]) -> None:
    for M in (J, K):
        assert_expected_structure(STCH(mu=0.3), M, torch.tensor(L[:M.shape[0]], dtype=M.dtype))


@settings(max_examples=20, deadline=None)
@given(J=controlled_matrices(max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6), L=VALUES)
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float],
                              L: list[float]) -> None:
    T = J.shape[0]
    Lt = torch.tensor(L[:T], dtype=J.dtype)
    c1_, c2_ = torch.tensor(c1[:T], dtype=J.dtype), torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(lambda: STCH(ideal="min"), [(J, Lt), (J, Lt * 0.5)], c1_, c2_,
                                atol=1e-12 * 20 * T * scale_of(J))


@settings(max_examples=20, deadline=None)
@given(non_strongly_stationary_matrices(), VALUES)
def test_nonzero_off_strong_stationarity(J: torch.Tensor, L: list[float]) -> None:
    assert_nonzero_direction(STCH(), J, torch.tensor(L[:J.shape[0]], dtype=J.dtype))


def test_validation_and_registry() -> None:
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="mu must be a positive number"):
            STCH(mu=bad)
    with pytest.raises(ValueError, match="ideal must be None, 'min'"):
        STCH(ideal="max")
    with pytest.raises(ValueError, match="ideal must be positive"):
        STCH(ideal=[1.0, 0.0], log_losses=True)
    with pytest.raises(ValueError, match=r"task 1 has loss 0\.0.*log_losses.*None"):
        STCH(log_losses=True)(torch.eye(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="was tracking 2 tasks"):
        agg = STCH(ideal="min")
        agg(torch.eye(2), torch.ones(2))
        agg(torch.eye(3), torch.ones(3))
    agg = get("stch", mu=0.5)
    assert isinstance(agg, STCH) and agg.reads == "losses" and agg.mu == 0.5
    assert repr(STCH()) == "STCH(mu=1.0, preference=None, ideal=None, log_losses=False)"
    with pytest.raises(ValueError, match="tension"):
        get("stch+tension")


@pytest.mark.parametrize("kw", [{}, {"ideal": "min", "mu": 0.2}, {"log_losses": True}])
def test_loss_only_route_equals_the_jacobian_route(kw: dict) -> None:
    assert max_loss_route_difference(lambda: STCH(**kw)) < 1e-10
