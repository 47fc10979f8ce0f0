"""GradNorm (Chen et al., *GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks*, ICML 2018, Sec. 3 and Algorithm 1): its update equations by hand in float64
over several steps and the balance it reaches; then its properties: expected structure, finite
weights on zero rows and permutation invariance over steps; the Gramian path, the restart, state
and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.weightings import GradNorm

from .._properties import (
    assert_expected_structure,
    assert_permutation_invariant,
    assert_state_dict_roundtrip,
)
from ..strategies import (
    controlled_matrices,
    jacobians,
)
from ._reference import make


def reference_steps(Js: list[np.ndarray], Ls: list[np.ndarray], alpha: float, opt: str,
                    lr: float, layer: tuple[int, int] | None) -> tuple[list, list]:
    T = Js[0].shape[0]
    w = make(opt, np.ones(T), lr)
    L0 = Ls[0]
    used, after = [], []
    for J, L in zip(Js, Ls):
        cols = J if layer is None else J[:, layer[0]:layer[1]]
        n = np.sqrt((cols * cols).sum(axis=1))
        gw = w.x * n  # G_W^(i) = ||w_i g_i||
        ratio = (L / L0) / np.mean(L / L0)  # r_i
        target = gw.mean() * ratio**alpha  # held constant
        used.append(w.x.copy())
        w.step(np.sign(gw - target) * n)  # d/dw_i sum_j |G_W^(j) - target_j|
        x = np.maximum(w.x, 0)
        w.x = x * T / x.sum()  # renormalise to sum T
        after.append(w.x.copy())
    return used, after


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from(["adam", "sgd"]),
       st.floats(1e-3, 0.2), st.floats(0.0, 3.0), st.booleans())
def test_matches_hand_computed_updates(T: int, seed: int, opt: str, lr: float, alpha: float,
                                       use_layer: bool) -> None:
    rng = np.random.default_rng(seed)
    Js = [rng.standard_normal((T, 6)) * rng.uniform(0.5, 2, size=(T, 1)) for _ in range(6)]
    Ls = [rng.uniform(0.1, 4.0, size=T) for _ in range(6)]
    layer = (2, 5) if use_layer else None
    used, after = reference_steps(Js, Ls, alpha, opt, lr, layer)
    agg = GradNorm(alpha=alpha, lr=lr, optimizer=opt, layer=layer)
    for k, (J, L) in enumerate(zip(Js, Ls)):
        d = agg(torch.tensor(J), torch.tensor(L))
        assert np.allclose(agg.weights.numpy(), used[k], rtol=1e-10, atol=1e-12)
        assert np.allclose(d.numpy(), used[k] @ J, rtol=1e-10, atol=1e-12)
        assert np.allclose(agg.task_weights.numpy(), after[k], rtol=1e-10, atol=1e-12)
        assert abs(float(agg.task_weights.sum()) - T) < 1e-9


def test_balances_gradient_norms() -> None:
    """With equal training rates the weighted norms w_i ||g_i|| are driven to a common value."""
    J = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    L = torch.tensor([1.0, 1.0], dtype=torch.float64)
    agg = GradNorm(lr=0.01, optimizer="sgd")
    tail = []
    for step in range(1000):
        agg(J, L)
        if step >= 800:
            tail.append(agg.task_weights.clone())
    # The L1 loss's sign steps oscillate around the balance w = (1.6, 0.4), where
    # w_1 ||g_1|| = w_2 ||g_2|| = 1.6 and w_1 + w_2 = 2; on average they sit on it.
    w = torch.stack(tail).mean(0)
    assert torch.allclose(w, torch.tensor([1.6, 0.4], dtype=torch.float64), atol=0.01)


@settings(max_examples=40, deadline=None)
@given(jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), st.randoms(use_true_random=False))
def test_finite_zero_rows_and_permutation_equivariant(J: torch.Tensor, rnd) -> None:
    T = J.shape[0]
    perm = list(range(T))
    rnd.shuffle(perm)
    steps = [(J, torch.linspace(1.0, 2.0, T, dtype=J.dtype) / (1 + step)) for step in range(3)]
    assert_permutation_invariant(GradNorm, steps, perm, rtol=1e-9,
                                 atol=1e-9 * float(J.abs().max()),
                                 weights=lambda agg: agg.task_weights, weights_rtol=1e-9,
                                 weights_atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), K=controlled_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    """Over three calls with changing losses, on hard matrices and at any rank and scale."""
    for M in (J, K):
        agg = GradNorm()
        for step in range(3):
            L = torch.linspace(1.0, 3.0, M.shape[0], dtype=M.dtype) ** (-step) + 0.1 * step
            assert_expected_structure(agg, M, L, weights_atol=1e-12 * float(M.norm(dim=1).sum()))
            assert bool(torch.isfinite(agg.task_weights).all())


def test_gramian_path_equals_row_norm_path() -> None:
    J = torch.randn(4, 7, dtype=torch.float64)
    L = torch.rand(4, dtype=torch.float64) + 0.5
    a, b = GradNorm(lr=0.1), GradNorm(lr=0.1)
    w_rows = a.aggregate(J, L).weights
    w_gram = b.aggregate_gramian(J @ J.T, L).weights
    assert torch.equal(w_rows, w_gram)
    assert torch.allclose(a.task_weights, b.task_weights, rtol=1e-12)


def test_all_weights_at_zero_restart_at_one() -> None:
    """alpha < 1 lets every G_W^(i) exceed its target (mean r^alpha < 1); a huge step then
    pushes every weight below 0, and they restart at 1 (no host sync)."""
    agg = GradNorm(alpha=0.5, lr=100.0, optimizer="sgd")
    agg.load_state_dict({"weights": {"value": torch.ones(2, dtype=torch.float64),
                                     "optimizer": None},
                         "initial_losses": torch.ones(2, dtype=torch.float64)})
    J = torch.tensor([[0.4, 0.0], [0.0, 1.6]], dtype=torch.float64)
    agg(J, torch.tensor([0.1, 1.9], dtype=torch.float64))
    assert float(agg.diagnostics["restarted"]) == 1.0
    assert torch.equal(agg.task_weights, torch.ones(2, dtype=torch.float64))


def test_state_dict_roundtrip_gives_identical_next_output() -> None:
    assert_state_dict_roundtrip(GradNorm, seed=0, steps=6, split=3)


def test_validation_and_registry() -> None:
    with pytest.raises(ValueError, match="task 1 has initial loss"):
        GradNorm()(torch.ones(2, 3), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="needs the loss values"):
        GradNorm()(torch.ones(2, 3))
    with pytest.raises(ValueError, match="layer"):
        GradNorm(layer=(3, 1))
    with pytest.raises(ValueError, match="outside"):
        GradNorm(layer=(0, 9))(torch.ones(2, 3), torch.ones(2))
    agg = get("gradnorm", alpha=0.5)
    assert isinstance(agg, GradNorm) and agg.alpha == 0.5
    assert agg(torch.ones(2, 3), torch.ones(2)).dtype == torch.float32
    with pytest.raises(ValueError, match="tension"):
        get("gradnorm+tension")
