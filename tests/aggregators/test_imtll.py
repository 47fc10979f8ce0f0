"""IMTL-L (Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021, Sec. 3.1): its update
equations by hand in float64 (the weights e^s, the gradient e^s L - 1 of the scaled loss
e^s L - s in s, written as LibMTL's IMTL forms it and differentiated by torch.autograd; the
optimizers of tests/weightings/_reference.py) and its fixed point (every scaled loss e^s L = 1);
then its properties: permutation invariance, expected structure, linearity under scaling of J, a
non-zero direction off strong stationarity (positive weights); state, validation, the registry's
names and the loss-only route."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.imtll import IMTLL

from .._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_state_dict_roundtrip,
    scale_of,
)
from ..strategies import controlled_matrices, jacobians, non_strongly_stationary_matrices
from ..weightings._reference import make
from ._loss_weighting import autograd_gradient, max_loss_route_difference


def scaled_loss_gradients(s: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d/dL and d/ds of sum_t (e^{s_t} L_t - s_t), LibMTL's scaled losses, by autograd."""
    st_ = torch.tensor(s, dtype=torch.float64)
    Lt = torch.tensor(L, dtype=torch.float64)
    dL = autograd_gradient(lambda x: (st_.exp() * x - st_).sum(), Lt)
    ds = autograd_gradient(lambda x: (x.exp() * Lt - x).sum(), st_)
    return dL.numpy(), ds.numpy()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from(["adam", "sgd"]),
       st.floats(1e-4, 0.5), st.floats(-2, 2))
def test_matches_hand_computed_updates(T: int, seed: int, opt: str, lr: float,
                                       init: float) -> None:
    rng = np.random.default_rng(seed)
    agg = IMTLL(lr=lr, optimizer=opt, init_log_scale=init)  # type: ignore[arg-type]
    ref = make(opt, np.full(T, init), lr)
    for _ in range(6):
        J = rng.standard_normal((T, 5))
        L = rng.uniform(0.01, 5.0, size=T)
        w, ds = scaled_loss_gradients(ref.x, L)
        d = agg(torch.tensor(J), torch.tensor(L))
        assert np.allclose(agg.weights.numpy(), w, rtol=1e-12, atol=0)
        assert np.allclose(d.numpy(), w @ J, rtol=1e-12, atol=1e-12)
        ref.step(ds)
        assert np.allclose(agg.log_scale.numpy(), ref.x, rtol=1e-12, atol=1e-12)


def test_sgd_fixed_point_balances_the_scaled_losses() -> None:
    """The minimiser of e^s L - s is s = -log L: every scaled loss e^s L is 1, weights 1 / L."""
    agg = IMTLL(lr=0.2, optimizer="sgd")
    L = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    J = torch.eye(3, dtype=torch.float64)
    for _ in range(400):
        agg(J, L)
    torch.testing.assert_close(agg.log_scale, -L.log(), rtol=0, atol=1e-9)
    torch.testing.assert_close(agg(J, L) * L, torch.ones(3, dtype=torch.float64), rtol=0,
                               atol=1e-8)


@settings(max_examples=30, deadline=None)
@given(jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), st.floats(-6, 6),
       st.randoms(use_true_random=False))
def test_permutation_invariant(J: torch.Tensor, log_loss: float, rnd) -> None:
    T = J.shape[0]
    L = 10.0 ** (log_loss + torch.arange(T, dtype=J.dtype) / T)
    perm = list(range(T))
    rnd.shuffle(perm)
    assert_permutation_invariant(lambda: IMTLL(lr=0.05), [(J, L)] * 3, perm, rtol=1e-12,
                                 atol=1e-12 * float(J.abs().max()),
                                 weights=lambda agg: agg.weights, weights_rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), K=controlled_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    for M in (J, K):
        agg = IMTLL(lr=0.05)
        for step in range(3):
            L = torch.linspace(1.0, 3.0, M.shape[0], dtype=M.dtype) ** (-step) + 0.1 * step
            assert_expected_structure(agg, M, L, weights_atol=1e-12 * float(M.norm(dim=1).sum()))


@settings(max_examples=20, deadline=None)
@given(J=controlled_matrices(max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6))
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float]) -> None:
    T = J.shape[0]
    steps = [(J, torch.linspace(1.0, 3.0, T, dtype=J.dtype) ** (-k) + 0.1 * k) for k in range(4)]
    c1_, c2_ = torch.tensor(c1[:T], dtype=J.dtype), torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(lambda: IMTLL(lr=0.05), steps, c1_, c2_,
                                atol=1e-12 * 20 * T * scale_of(J))


@settings(max_examples=20, deadline=None)
@given(non_strongly_stationary_matrices())
def test_nonzero_off_strong_stationarity(J: torch.Tensor) -> None:
    agg = IMTLL(lr=0.05)
    for step in range(3):
        L = torch.linspace(1.0, 3.0, J.shape[0], dtype=J.dtype) ** (-step) + 0.1 * step
        assert_nonzero_direction(agg, J, L)


def test_state_validation_and_registry() -> None:
    a, b = assert_state_dict_roundtrip(lambda: IMTLL(lr=0.1), seed=0, steps=6, split=3)
    assert torch.equal(a.log_scale, b.log_scale)
    a.reset()
    assert a.log_scale is None
    agg = IMTLL()
    with pytest.raises(ValueError, match="needs the loss values"):
        agg(torch.ones(2, 3))
    agg(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="reset"):
        agg(torch.ones(3, 3), torch.ones(3))
    with pytest.raises(ValueError, match="optimizer"):
        IMTLL(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="init_log_scale must be a number"):
        IMTLL(init_log_scale="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown keys"):
        IMTLL().load_state_dict({"log_var": {}})
    for name in ("imtll", "imtl-l", "IMTL_L"):
        assert type(get(name)) is IMTLL
    assert get("imtll").reads == "losses"
    with pytest.raises(ValueError, match="tension"):
        get("imtll+tension")
    assert repr(IMTLL()) == "IMTLL(lr=0.001, optimizer='adam', init_log_scale=0.0)"


def test_loss_only_route_equals_the_jacobian_route() -> None:
    assert max_loss_route_difference(lambda: IMTLL(lr=0.1), steps=5) < 1e-10
