"""IMTL, the hybrid (Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021, Sec. 3.3 and
Algorithm 1): at every step the direction is IMTL-G's on the gradients of the scaled losses
e^s L - s, checked against the paper's closed form alpha_{2:T} = g_1 U^T (D U^T)^{-1} written
out here in float64 (LibMTL's IMTL forms the same) and against TorchJD 0.18's IMTLG applied to
the scaled rows; the scales follow IMTL-L's updates exactly; the factorisation d =
IMTL-G(J) / sum_t (alpha^G_t / e^{s_t}); then equal projections onto every unit gradient,
permutation invariance, expected structure, non-conflicting for two tasks, the Gramian route,
absent tasks and state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.imtl import IMTL
from torch_mtlgrad.aggregators.imtlg import IMTLG
from torch_mtlgrad.aggregators.imtll import IMTLL

from .._properties import (
    assert_expected_structure,
    assert_non_conflicting,
    assert_permutation_invariant,
    assert_state_dict_roundtrip,
    scale_of,
)
from ..strategies import controlled_matrices, full_rank_matrices


def paper_closed_form(Jt: np.ndarray) -> np.ndarray:
    """IMTL-G's alpha on the rows of ``Jt`` (the paper's Algorithm 1, lines 9-12)."""
    U = Jt / np.linalg.norm(Jt, axis=1, keepdims=True)
    D = Jt[0] - Jt[1:]
    Ud = U[0] - U[1:]
    a = Jt[0] @ Ud.T @ np.linalg.inv(D @ Ud.T)
    return np.concatenate([[1 - a.sum()], a])


def _steps(seed: int, T: int, n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [(torch.tensor(rng.standard_normal((T, T + 3))), torch.tensor(rng.uniform(0.1, 3, T)))
            for _ in range(n)]


@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 6), seed=st.integers(0, 2**31 - 1), opt=st.sampled_from(["adam", "sgd"]))
def test_against_the_closed_form_and_torchjd(T: int, seed: int, opt: str) -> None:
    tj = pytest.importorskip("torchjd.aggregation")
    agg, loss_half = IMTL(lr=0.3, optimizer=opt), IMTLL(lr=0.3, optimizer=opt)
    for J, L in _steps(seed, T):
        k = np.ones(T) if agg.log_scale is None else np.exp(agg.log_scale.numpy())
        scaled = k[:, None] * J.numpy()
        if np.linalg.cond(scaled) > 1e8:
            return
        alpha = paper_closed_form(scaled)
        d = agg(J, L)
        loss_half(J, L)
        torch.testing.assert_close(agg.weights, torch.tensor(alpha * k), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(agg.diagnostics["alpha"], torch.tensor(alpha), rtol=1e-8,
                                   atol=1e-10)
        torch.testing.assert_close(d, tj.IMTLG()(torch.tensor(scaled)), rtol=1e-8,
                                   atol=1e-10 * scale_of(J))
        # The scales take IMTL-L's steps exactly.
        assert torch.equal(agg.log_scale, loss_half.log_scale)


@settings(max_examples=25, deadline=None)
@given(J=full_rank_matrices(min_tasks=2, max_tasks=6, min_dim=6, max_dim=10, min_log_scale=-3,
                             max_log_scale=3),
       seed=st.integers(0, 2**31 - 1))
def test_direction_is_imtlg_times_the_scales_factor(J: torch.Tensor, seed: int) -> None:
    """d = IMTL-G(J) / sum_t (alpha^G_t / k_t), k = e^s: the scales set only the length."""
    T = J.shape[0]
    L = torch.tensor(np.random.default_rng(seed).uniform(0.1, 3, T), dtype=J.dtype)
    agg = IMTL(lr=0.5, optimizer="sgd")
    agg(J, L)  # s = 0: IMTL-G itself
    k = torch.exp(agg.log_scale)
    d = agg(J, L)
    g = IMTLG()
    dg = g(J)
    factor = 1 / (g.weights / k).sum()
    if abs(float(factor)) > 1e6:
        return  # 1^T G^{-1} n near 0: no stable normalisation
    tol = 1e-9 * scale_of(J) * abs(float(factor))
    torch.testing.assert_close(d, dg * factor, rtol=1e-6, atol=tol)
    # Equal projections onto every unit gradient.
    proj = J @ d / J.norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand(T), rtol=1e-6, atol=tol)


def test_first_step_is_imtlg() -> None:
    for J, L in _steps(0, 4, n=1):
        assert torch.allclose(IMTL()(J, L), IMTLG()(J), rtol=1e-12, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(J=controlled_matrices(max_tasks=6, min_log_scale=-3, max_log_scale=3),
       rnd=st.randoms(use_true_random=False))
def test_permutation_invariant_and_structure(J: torch.Tensor, rnd) -> None:
    T = J.shape[0]
    L = torch.linspace(0.5, 2.0, T, dtype=J.dtype)
    perm = list(range(T))
    rnd.shuffle(perm)
    assert_permutation_invariant(lambda: IMTL(lr=0.1), [(J, L), (J, L.flip(0))], perm,
                                 rtol=1e-6, atol=1e-6 * scale_of(J) * T, norm=True)
    agg = IMTL(lr=0.1)
    for step in range(2):
        assert_expected_structure(agg, J, L * (step + 1), weights_rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(J=full_rank_matrices(min_tasks=2, max_tasks=2, min_dim=2, min_log_scale=-3,
                             max_log_scale=3))
def test_non_conflicting_for_two_tasks(J: torch.Tensor) -> None:
    agg = IMTL(lr=0.5, optimizer="sgd")
    for L in (torch.tensor([2.0, 0.5], dtype=J.dtype), torch.tensor([0.3, 3.0], dtype=J.dtype)):
        assert_non_conflicting(agg(J, L), J, rtol=1e-9)


def test_gramian_route_absent_tasks_and_state() -> None:
    steps = _steps(3, 4, n=6)
    a, b = IMTL(lr=0.2), IMTL(lr=0.2)
    for J, L in steps:
        x = a.aggregate(J, L)
        y = b.aggregate_gramian(J @ J.T, L)
        torch.testing.assert_close(y.weights, x.weights, rtol=1e-12, atol=1e-14)
    assert a.reads == "gramian" and a.from_gramian and a.runs_on_features
    # An absent task's scale does not move.
    c = IMTL(lr=0.2)
    J, L = steps[0]
    c(J, L)
    before = c.log_scale.clone()
    mask = [True, False, True, True]
    out = c.aggregate(J[mask], L[mask], present=mask)
    assert float(out.weights[1]) == 0.0 and float(c.log_scale[1]) == float(before[1])
    a2, b2 = assert_state_dict_roundtrip(lambda: IMTL(lr=0.1), seed=1, steps=6, split=2)
    assert torch.equal(a2.log_scale, b2.log_scale)
    assert isinstance(get("imtl"), IMTL) and get("imtl").needs_losses
    assert repr(IMTL()) == "IMTL(lr=0.001, optimizer='adam', init_log_scale=0.0, rtol=None)"
    with pytest.raises(ValueError, match="rtol"):
        IMTL(rtol=-1.0)
    with pytest.raises(ValueError, match="needs the loss values"):
        IMTL()(torch.eye(2))
    assert get("imtl+tension").base.__class__ is IMTL
