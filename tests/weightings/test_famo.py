"""FAMO: its update equations by hand in float64 over several steps, properties and state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.weightings import FAMO

from ..strategies import jacobians
from ._helpers import check_scale_free_and_permutation_equivariant, check_state_dict_roundtrip
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
    check_scale_free_and_permutation_equivariant(lambda: FAMO(eps=0.0), J, log_loss, rnd)


def test_state_dict_roundtrip_gives_identical_next_output() -> None:
    a, b = check_state_dict_roundtrip(FAMO, seed=0, steps=6, split=3)
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
