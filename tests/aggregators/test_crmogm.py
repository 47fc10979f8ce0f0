"""CR-MOGM (Zhou, Zhang, Jiang, Zhong, Gu & Zhu, "On the Convergence of Stochastic
Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022): the moving average recomputed
by hand in float64 numpy over several steps on MGDA's closed form for two tasks (independent of
the library's solver), TorchJD 0.18's ``CRMOGMWeighting`` (on the same base weights, and with
UPGrad as the base against TorchJD's own ``UPGradWeighting``); then its properties: expected
structure and convex weights on hard inputs over several calls, permutation invariance over
steps, ``alpha = 0`` / ``alpha = 1``, the base's flags and routes; state and validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.crmogm import CRMOGM
from torch_mtlgrad.aggregators.mgda import MinNorm
from torch_mtlgrad.aggregators.rlw import RLW

from .._properties import (
    assert_expected_structure,
    assert_permutation_invariant,
    assert_state_dict_roundtrip,
)
from ..strategies import jacobians


def mgda_two_tasks(J: np.ndarray) -> np.ndarray:
    """MGDA's weights for two rows in closed form: ``w_1 = clip((g_2 - g_1) . g_2 /
    ||g_1 - g_2||^2, 0, 1)`` (Sener and Koltun, Algorithm 1)."""
    g1, g2 = J
    diff = g1 - g2
    nn = float(diff @ diff)
    w1 = 0.5 if nn == 0 else min(max(float((g2 - g1) @ g2) / nn, 0.0), 1.0)
    return np.array([w1, 1.0 - w1])


def crmogm_reference(lam_hats: list[np.ndarray], alpha: float) -> list[np.ndarray]:
    out, lam = [], None
    for lh in lam_hats:
        lam = lh.copy() if lam is None else alpha * lam + (1 - alpha) * lh
        out.append(lam.copy())
    return out


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_matches_hand_computed_average_of_mgda(D: int, seed: int, alpha: float) -> None:
    rng = np.random.default_rng(seed)
    Js = [rng.standard_normal((2, D)) * 10 ** rng.uniform(-2, 2) for _ in range(6)]
    agg = CRMOGM(alpha=alpha)
    expected = crmogm_reference([mgda_two_tasks(J) for J in Js], alpha)
    for J, lam in zip(Js, expected):
        out = agg.aggregate(torch.tensor(J))
        np.testing.assert_allclose(out.weights.numpy(), lam, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out.direction.numpy(), lam @ J, rtol=1e-9,
                                   atol=1e-12 * np.abs(J).max())


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_random_base_matches_the_average_of_its_draws(T: int, seed: int, alpha: float) -> None:
    """A random base (RLW): the same seed's draws, averaged by hand."""
    rng = np.random.default_rng(seed)
    Js = [torch.tensor(rng.standard_normal((T, 4))) for _ in range(5)]
    twin = RLW(seed=seed)
    expected = crmogm_reference([twin.aggregate(J).weights.numpy() for J in Js], alpha)
    agg = CRMOGM(RLW(seed=seed), alpha=alpha)
    assert agg.random and agg.reads == "losses"
    for J, lam in zip(Js, expected):
        np.testing.assert_allclose(agg.aggregate(J).weights.numpy(), lam, rtol=1e-12, atol=1e-15)


def fed_weighting(weights: list[torch.Tensor]):
    """A TorchJD weighting that returns the weights it is fed, one per call."""
    tj = pytest.importorskip("torchjd.aggregation")

    class Fed(tj.Weighting):
        def __init__(self) -> None:
            super().__init__()
            self.queue = list(weights)

        def forward(self, stat: torch.Tensor, /) -> torch.Tensor:
            return self.queue.pop(0)

    return Fed()


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**31 - 1), st.sampled_from([0.9, 0.0, 0.5, 1.0]))
def test_matches_torchjd_smoothing(T: int, seed: int, alpha: float) -> None:
    """TorchJD's ``CRMOGMWeighting`` around the same MGDA weights (default base and factor)."""
    tj = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(seed)
    Js = [torch.tensor(rng.standard_normal((T, 5))) for _ in range(8)]
    base = MinNorm()
    theirs = tj.CRMOGMWeighting(fed_weighting([base.aggregate(J).weights for J in Js]), alpha=alpha)
    ours = get("crmogm") if alpha == 0.9 else CRMOGM(alpha=alpha)
    for J in Js:
        torch.testing.assert_close(ours.aggregate(J).weights, theirs(J @ J.T), rtol=0,
                                   atol=1e-15)


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_upgrad_base_matches_torchjd(T: int, seed: int) -> None:
    """``CRMOGM("upgrad")`` against ``CRMOGMWeighting(UPGradWeighting())`` on ``G``
    (TorchJD's projector without its normalisation and regularisation, see
    ``_cone_helpers.torchjd_reference``)."""
    tj = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("qpsolvers")
    from torchjd._linalg import QuadprogProjector

    rng = np.random.default_rng(seed)
    theirs = tj.CRMOGMWeighting(tj.UPGradWeighting(
        projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-12)))
    ours = get("cr-mogm", base="upgrad")
    for _ in range(6):
        J = torch.tensor(rng.standard_normal((T, T + 3)))
        G = J @ J.T
        w = ours.aggregate(J).weights
        torch.testing.assert_close(w, theirs(G), rtol=1e-7, atol=1e-9 * float(w.abs().max()))


@settings(max_examples=30, deadline=None)
@given(jacobians(min_tasks=1, max_tasks=6, max_dim=8, min_log_scale=-6, max_log_scale=6))
def test_expected_structure_and_convex_weights(J: torch.Tensor) -> None:
    agg = CRMOGM()
    for k in range(3):
        w = assert_expected_structure(agg, J * (1 + k)).weights
        assert bool((w >= 0).all()) and abs(float(w.sum()) - 1.0) < 1e-9, w


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 5))
def test_permutation_invariant_over_steps(seed: int, T: int) -> None:
    rng = np.random.default_rng(seed)
    steps = [torch.tensor(rng.standard_normal((T, 6))) for _ in range(4)]
    assert_permutation_invariant(CRMOGM(alpha=0.7), steps, perms=2, rtol=1e-8, atol=1e-10,
                                 weights=lambda a: a.weights, weights_rtol=1e-8,
                                 weights_atol=1e-10, seed=seed)


def test_alpha_extremes_and_a_schedule() -> None:
    rng = np.random.default_rng(0)
    Js = [torch.tensor(rng.standard_normal((3, 5))) for _ in range(4)]
    zero, one, base = CRMOGM(alpha=0.0), CRMOGM(alpha=1.0), MinNorm()
    first = None
    for J in Js:
        wb = base.aggregate(J).weights
        assert torch.equal(zero.aggregate(J).weights, wb)
        w1 = one.aggregate(J).weights
        first = wb if first is None else first
        assert torch.equal(w1, first)
    agg = CRMOGM()
    agg(Js[0])
    agg.alpha = 0.25  # e.g. 1 - lr / lr_0, set between calls (the paper's Corollary 1)
    prev = agg.weights.clone()
    w = agg.aggregate(Js[1]).weights
    torch.testing.assert_close(w, 0.25 * prev + 0.75 * base.aggregate(Js[1]).weights,
                               rtol=1e-14, atol=1e-15)
    assert torch.equal(agg.diagnostics["lambda_hat"], base.weights)


def test_the_base_flags_and_routes() -> None:
    assert get("crmogm").reads == "gramian" and get("crmogm").gramian_only
    assert get("cr_mogm", base="mean").reads == "losses"
    assert not get("crmogm").random and get("crmogm", base="pcgrad").random
    assert get("crmogm", base=MinNorm(normalization="loss")).needs_losses
    assert CRMOGM.stateful and get("crmogm+tension").base.__class__ is CRMOGM
    J = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    a, b = CRMOGM(), CRMOGM()
    for c in (1.0, 2.0):
        wa = a.aggregate(J * c).weights
        wb = b.aggregate_gramian((J * c) @ (J * c).T).weights
        torch.testing.assert_close(wa, wb, rtol=1e-12, atol=1e-14)
    lw = get("crmogm", base="dwa")
    out = lw.aggregate_losses(torch.tensor([1.0, 2.0]), num_tasks=2)
    assert out.weights.shape == (2,)


def test_absent_tasks_reach_the_base() -> None:
    """With ``present=`` the base runs on the present tasks with its settings and state restricted
    to them (a per-task setting: Constant's weights; per-task state: GradVac's targets), an
    absent task's smoothed weight and base state stay, and a task first present later starts
    from its base weight."""
    from torch_mtlgrad.aggregators.constant import Constant
    from torch_mtlgrad.aggregators.gradvac import GradVac

    J = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    agg = CRMOGM(Constant([1.0, 2.0, 3.0, 4.0]), alpha=0.5)
    mask = torch.tensor([True, False, True, False])
    w = agg.aggregate(J[mask], present=mask).weights
    assert w.tolist() == [1.0, 0.0, 3.0, 0.0]
    assert torch.isnan(agg.lam[1]) and torch.isnan(agg.lam[3])
    assert agg.aggregate(J).weights.tolist() == [1.0, 2.0, 3.0, 4.0]
    agg = CRMOGM(GradVac(beta=0.3, seed=0))
    agg.aggregate(J)
    before = copy.deepcopy(agg.state_dict())
    agg.aggregate(J[mask] * 2, present=mask)
    after = agg.state_dict()
    for t in (1, 3):  # the absent tasks' rows and columns of phi_hat, and their lambda
        assert torch.equal(after["base"]["phi_hat"][t], before["base"]["phi_hat"][t])
        assert torch.equal(after["base"]["phi_hat"][:, t], before["base"]["phi_hat"][:, t])
        assert after["lambda"][t] == before["lambda"][t]
    lam_hat = agg.diagnostics["lambda_hat"]  # the base's weights of the two present tasks
    assert lam_hat.shape == (2,)
    torch.testing.assert_close(after["lambda"][mask], 0.9 * before["lambda"][mask] + 0.1 * lam_hat,
                               rtol=1e-15, atol=0)


def test_state_resume_and_reset() -> None:
    assert_state_dict_roundtrip(CRMOGM, seed=0, steps=8, split=3)
    assert_state_dict_roundtrip(lambda: CRMOGM("pcgrad"), seed=1, steps=8, split=4)
    agg = CRMOGM(RLW(seed=3))
    Js = [torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
          for i in range(4)]
    first = [agg(J) for J in Js]
    state = copy.deepcopy(agg.state_dict())
    assert set(state) == {"lambda", "base"} and set(state["base"]) == {"rng_state", "rng_device"}
    resumed = CRMOGM(RLW(seed=99))
    resumed.load_state_dict(state)  # the base's generator comes with it
    nxt = [agg(J) for J in Js]
    assert all(torch.equal(x, resumed(J)) for x, J in zip(nxt, Js))
    agg.reset()  # resets the base's generator too
    assert all(torch.equal(x, agg(J)) for x, J in zip(first, Js))


def test_validation() -> None:
    for bad in (-0.1, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
            CRMOGM(alpha=bad)  # type: ignore[arg-type]
    for base in ("moco", "graddrop", "mgda+tension"):
        with pytest.raises(TypeError, match="smooths the weights of a method"):
            CRMOGM(base)
    agg = CRMOGM()
    agg(torch.eye(3))
    before = agg.state_dict()["lambda"].clone()
    with pytest.raises(ValueError, match="holds weights for 3 tasks, got 2"):
        agg(torch.eye(2))
    assert torch.equal(agg.state_dict()["lambda"], before)
    with pytest.raises(ValueError, match="unknown keys"):
        agg.load_state_dict({"lam": None})
    with pytest.raises(ValueError, match=r"'lambda' must be a \[T\] tensor"):
        agg.load_state_dict({"lambda": torch.ones(2, 2), "base": {}})
    assert repr(get("crmogm", alpha=0.5)) == (
        "CRMOGM(base=MinNorm(normalization='none', method='auto'), alpha=0.5)")
