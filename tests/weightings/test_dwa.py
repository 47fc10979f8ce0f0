"""DWA (Liu, Johns and Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019,
Sec. 3.3, eq. 7-8): the weights by hand in float64 over several epochs; then its properties:
permutation invariance and scale-freeness in the losses (the weights read loss ratios), expected
structure, linearity under scaling of J, and, the weights being positive, a non-zero direction off
strong stationarity; manual epochs and state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.weightings import DWA

from .._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_loss_scale_free,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_state_dict_roundtrip,
    scale_of,
)
from ..strategies import (
    controlled_matrices,
    jacobians,
    non_strongly_stationary_matrices,
)


def reference_weights(Ls: list[np.ndarray], steps_per_epoch: int, temp: float) -> list[np.ndarray]:
    """lambda for every call: epochs of steps_per_epoch calls, L_k(t) the epoch means."""
    T = Ls[0].shape[0]
    means: list[np.ndarray] = []
    out = []
    for i, _ in enumerate(Ls):
        t = i // steps_per_epoch + 1  # current epoch, 1-based
        if t <= 2:
            out.append(np.ones(T))
        else:
            w = means[t - 2] / means[t - 3]  # L(t-1) / L(t-2)
            e = np.exp(w / temp)
            out.append(T * e / e.sum())
        if (i + 1) % steps_per_epoch == 0:
            means.append(np.mean(Ls[i + 1 - steps_per_epoch:i + 1], axis=0))
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.floats(0.1, 10.0), st.integers(0, 2**31 - 1))
def test_matches_hand_computed_weights(T: int, steps_per_epoch: int, temp: float,
                                       seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 6 * steps_per_epoch
    Ls = [rng.uniform(0.05, 5.0, size=T) for _ in range(n)]
    ref = reference_weights(Ls, steps_per_epoch, temp)
    agg = DWA(temperature=temp, steps_per_epoch=steps_per_epoch)
    for i, L in enumerate(Ls):
        J = rng.standard_normal((T, 3))
        d = agg(torch.tensor(J), torch.tensor(L))
        assert np.allclose(agg.weights.numpy(), ref[i], rtol=1e-12, atol=1e-12)
        assert np.allclose(d.numpy(), ref[i] @ J, rtol=1e-12, atol=1e-12)
        assert abs(float(agg.weights.sum()) - T) < 1e-9


def test_manual_epochs_equal_counted_epochs() -> None:
    rng = np.random.default_rng(1)
    Ls = [torch.tensor(rng.uniform(0.1, 2.0, size=3)) for _ in range(12)]
    J = torch.eye(3, dtype=torch.float64)
    counted = DWA(steps_per_epoch=3)
    manual = DWA(steps_per_epoch=None)
    for i, L in enumerate(Ls):
        assert torch.equal(counted(J, L), manual(J, L))
        if (i + 1) % 3 == 0:
            manual.end_epoch()
    with pytest.raises(RuntimeError, match="no losses"):
        manual.end_epoch()
        manual.end_epoch()


@settings(max_examples=40, deadline=None)
@given(jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), st.floats(-6, 6),
       st.randoms(use_true_random=False))
def test_finite_scale_free_and_permutation_equivariant(J: torch.Tensor, log_loss: float,
                                                       rnd) -> None:
    """Weights depend on loss ratios only: scaling every loss by c changes nothing."""
    T = J.shape[0]
    perm = list(range(T))
    rnd.shuffle(perm)
    steps = [(J, torch.linspace(1.0, 3.0, T, dtype=J.dtype) ** (-k) + 0.1 * k) for k in range(4)]
    assert_permutation_invariant(DWA, steps, perm, rtol=1e-12, atol=1e-12 * float(J.abs().max()))
    assert_loss_scale_free(DWA, steps, 10.0**log_loss, rtol=1e-9, atol=1e-8)


def test_zero_loss_gives_ratio_one() -> None:
    agg = DWA()
    J = torch.eye(2, dtype=torch.float64)
    agg(J, torch.tensor([0.0, 1.0], dtype=torch.float64))
    agg(J, torch.tensor([0.0, 2.0], dtype=torch.float64))
    w = agg(J, torch.tensor([1.0, 1.0], dtype=torch.float64))
    ratio = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(w, 2 * torch.softmax(ratio / 2, 0))


def test_state_dict_roundtrip_mid_epoch() -> None:
    # 7 of 14 steps at 3 steps per epoch: the state is saved inside the third epoch.
    assert_state_dict_roundtrip(lambda: DWA(steps_per_epoch=3), seed=2, steps=14, split=7)


def test_validation_and_registry() -> None:
    with pytest.raises(ValueError, match="non-negative losses"):
        DWA()(torch.ones(2, 3), torch.tensor([1.0, -1.0]))
    DWA(validate=False)(torch.ones(2, 3), torch.tensor([1.0, -1.0]))  # sync-free: no check
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0.0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        DWA(steps_per_epoch=0)
    agg = DWA()
    agg(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="reset"):
        agg(torch.ones(3, 3), torch.ones(3))
    assert isinstance(get("dwa", temperature=1.0), DWA)
    with pytest.raises(ValueError, match="tension"):
        get("dwa+tension")


@settings(max_examples=25, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), K=controlled_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    """Over three calls with changing losses, on hard matrices and at any rank and scale."""
    for M in (J, K):
        agg = DWA()
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
    assert_linear_under_scaling(lambda: DWA(), steps, c1_, c2_,
                                atol=1e-12 * 20 * T * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(non_strongly_stationary_matrices())
def test_nonzero_off_strong_stationarity(J: torch.Tensor) -> None:
    """Positive weights: d = w^T J = 0 only when J is strongly stationary."""
    agg = DWA()
    for step in range(3):
        L = torch.linspace(1.0, 3.0, J.shape[0], dtype=J.dtype) ** (-step) + 0.1 * step
        assert_nonzero_direction(agg, J, L)
