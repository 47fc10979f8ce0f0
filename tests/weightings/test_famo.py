"""FAMO (Liu, Liu, Stone and Liu, *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023,
Sec. 3 and Algorithm 1): its update equations by hand in float64 over several steps; then its
properties: permutation invariance and scale-freeness in the losses (w_i is proportional to
z_i / L_i, and the logits follow log-loss decreases), expected structure, linearity under scaling
of J, and, the weights being positive, a non-zero direction off strong stationarity; state and
validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.weightings import FAMO

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
from ._reference import make


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def softmax_jacobian(x: np.ndarray) -> np.ndarray:
    z = softmax(x)
    return np.diag(z) - np.outer(z, z)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from(["adam", "sgd"]),
       st.floats(1e-3, 0.5), st.floats(0.0, 0.1), st.booleans(), st.booleans())
def test_matches_hand_computed_updates(T: int, seed: int, opt: str, beta: float, gamma: float,
                                       with_min: bool, exact_update: bool) -> None:
    rng = np.random.default_rng(seed)
    Lstar = rng.uniform(0.0, 0.5, size=T) if with_min else np.zeros(T)
    eps = 1e-8
    agg = FAMO(beta=beta, gamma=gamma, optimizer=opt,
               min_losses=torch.tensor(Lstar) if with_min else None)
    xi = make(opt, np.zeros(T), beta, gamma)
    prev = None
    for _ in range(6):
        J = rng.standard_normal((T, 4))
        L = Lstar + rng.uniform(0.05, 3.0, size=T)
        D = L - Lstar + eps
        if prev is not None:  # decrease of the log losses since the previous call
            xi.step(softmax_jacobian(xi.x).T @ (np.log(prev) - np.log(D)))
        z = softmax(xi.x)
        w = (z / D) / (z / D).sum()  # c z_i / (L_i - L*_i)
        d = agg(torch.tensor(J), torch.tensor(L))
        assert np.allclose(agg.weights.numpy(), w, rtol=1e-10, atol=1e-14)
        assert np.allclose(d.numpy(), w @ J, rtol=1e-10, atol=1e-12)
        assert abs(float(agg.weights.sum()) - 1) < 1e-12
        prev = D
        if exact_update:  # the paper's variant: losses re-evaluated after the step
            L_after = Lstar + (L - Lstar) * rng.uniform(0.5, 1.0, size=T)
            D_after = L_after - Lstar + eps
            agg.update(torch.tensor(L_after))
            xi.step(softmax_jacobian(xi.x).T @ (np.log(D) - np.log(D_after)))
            prev = None
        assert np.allclose(agg.logits.numpy(), xi.x, rtol=1e-10, atol=1e-13)


def test_stalled_task_gains_weight() -> None:
    agg = FAMO(beta=0.1)
    J = torch.eye(2, dtype=torch.float64)
    L = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for _ in range(30):
        agg(J, L)
        L = L * torch.tensor([0.9, 1.0], dtype=torch.float64)  # task 1 improves, task 2 stalls
    z = torch.softmax(agg.logits, 0)
    assert float(z[1]) > 0.6


@settings(max_examples=40, deadline=None)
@given(jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), st.floats(-6, 6),
       st.randoms(use_true_random=False))
def test_finite_scale_free_and_permutation_equivariant(J: torch.Tensor, log_loss: float,
                                                       rnd) -> None:
    """w_i ∝ z_i / L_i and delta = log-ratios: scaling every loss by c changes no weight."""
    T = J.shape[0]
    perm = list(range(T))
    rnd.shuffle(perm)
    steps = [(J, torch.linspace(1.0, 3.0, T, dtype=J.dtype) ** (-k) + 0.1 * k) for k in range(4)]
    assert_permutation_invariant(lambda: FAMO(eps=0.0), steps, perm, rtol=1e-12,
                                 atol=1e-12 * float(J.abs().max()))
    assert_loss_scale_free(lambda: FAMO(eps=0.0), steps, 10.0**log_loss, rtol=1e-9, atol=1e-8)


def test_state_dict_roundtrip_gives_identical_next_output() -> None:
    a, b = assert_state_dict_roundtrip(FAMO, seed=0, steps=6, split=3)
    assert torch.equal(a.logits, b.logits)


def test_validation_and_registry() -> None:
    with pytest.raises(ValueError, match="below its lower bound"):
        FAMO()(torch.ones(2, 3), torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="below its lower bound"):
        FAMO(min_losses=[0.0, 2.0])(torch.ones(2, 3), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="min_losses has 3 entries"):
        FAMO(min_losses=[0.0, 0.0, 0.0])(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(RuntimeError, match="first"):
        FAMO().update(torch.ones(2))
    unchecked = FAMO(validate=False)
    unchecked(torch.ones(2, 3), torch.tensor([1.0, -0.5]))
    assert bool((unchecked.weights < 0).any())  # documented: meaningless weights, no error
    zero = FAMO()(torch.ones(2, 3), torch.tensor([0.0, 1.0]))  # L = L*: eps keeps it finite
    assert bool(torch.isfinite(zero).all())
    assert isinstance(get("famo", beta=0.01), FAMO)
    with pytest.raises(ValueError, match="tension"):
        get("famo+tension")


@settings(max_examples=25, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), K=controlled_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    """Over three calls with changing losses, on hard matrices and at any rank and scale."""
    for M in (J, K):
        agg = FAMO()
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
    assert_linear_under_scaling(lambda: FAMO(), steps, c1_, c2_,
                                atol=1e-12 * 20 * T * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(non_strongly_stationary_matrices())
def test_nonzero_off_strong_stationarity(J: torch.Tensor) -> None:
    """Positive weights: d = w^T J = 0 only when J is strongly stationary."""
    agg = FAMO()
    for step in range(3):
        L = torch.linspace(1.0, 3.0, J.shape[0], dtype=J.dtype) ** (-step) + 0.1 * step
        assert_nonzero_direction(agg, J, L)
