"""Uncertainty weighting: its update equations by hand in float64, properties and state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.weightings import UncertaintyWeighting

from ..strategies import jacobians
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
    a, b = UncertaintyWeighting(lr=0.05), UncertaintyWeighting(lr=0.05)
    for _ in range(3):
        da, db = a(J, L), b(J[perm], L[perm])
        assert bool(torch.isfinite(da).all())
        assert torch.allclose(da, db, rtol=1e-12, atol=1e-12 * float(J.abs().max()))
        assert torch.allclose(a.weights[perm], b.weights)


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
