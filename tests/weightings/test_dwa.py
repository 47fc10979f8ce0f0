"""DWA: eq. (7)-(8) by hand in float64 over several epochs, properties and state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.weightings import DWA

from ..strategies import jacobians
from ._helpers import check_scale_free_and_permutation_equivariant, check_state_dict_roundtrip


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
    check_scale_free_and_permutation_equivariant(DWA, J, log_loss, rnd)


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
    check_state_dict_roundtrip(lambda: DWA(steps_per_epoch=3), seed=2, steps=14, split=7)


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
