"""ConFIG (Liu, Chu and Thuerey, *ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks*, ICLR 2025): against the paper's formula on J in float64 NumPy (pseudo-inverse of the
unit rows, projection length) and against TorchJD 0.18, with and without direction weights; the
paper's claims (equal angles to every gradient, conflict-free for independent gradients), the
direction's invariance to row scaling, degenerate inputs and the input checks; the shared
properties: expected structure, Gramian-only, permutation invariance, positive homogeneity,
linearity under scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.config import ConFIG, config_weights

from .._properties import (
    assert_close,
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_linear_under_scaling,
    assert_non_conflicting,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import (
    DEGENERATE_MATRICES,
    POSITIVE_SCALES,
    full_rank_matrices,
    gaussian_matrices,
    independent_row_matrices,
)


def paper_formula(J: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """g_u = U([U(g_1), ..., U(g_m)]^{-T} w), g_ConFIG = (sum_i g_i . g_u) g_u, on J itself."""
    U = J / np.linalg.norm(J, axis=1, keepdims=True)
    w = np.ones(J.shape[0]) if w is None else w
    x = np.linalg.pinv(U) @ w
    gu = x / np.linalg.norm(x)
    return (J @ gu).sum() * gu


def well_conditioned(J: torch.Tensor) -> bool:
    U = J / J.norm(dim=1, keepdim=True)
    s = torch.linalg.svdvals(U)
    return float(s[-1]) > 1e-3 * float(s[0])


@settings(max_examples=40, deadline=None)
@given(J=full_rank_matrices(min_tasks=1, max_tasks=7, max_dim=10, min_log_scale=-6,
                            max_log_scale=6),
       w=st.lists(st.floats(0.1, 5.0), min_size=7, max_size=7), use_w=st.booleans())
def test_matches_paper_formula(J: torch.Tensor, w: list[float], use_w: bool) -> None:
    """Any shape (T > D: the least-squares direction, as the paper's pseudo-inverse)."""
    assume(well_conditioned(J))
    T = J.shape[0]
    pref = torch.tensor(w[:T], dtype=torch.float64) if use_w else None
    ref = paper_formula(J.numpy(), None if pref is None else pref.numpy())
    d = ConFIG(pref_vector=pref)(J)
    assert np.allclose(d.numpy(), ref, rtol=1e-9, atol=1e-10 * np.linalg.norm(ref) + 1e-300)


@settings(max_examples=40, deadline=None)
@given(J=independent_row_matrices(), log_k=st.lists(st.floats(-3, 3), min_size=5, max_size=5))
def test_equal_angles_conflict_free_and_row_scaling(J: torch.Tensor, log_k: list[float]) -> None:
    """Independent rows: every g_i has the same positive cosine with d (so d conflicts with
    none), and rescaling the rows leaves the direction as it is (only U(g_i) enters it)."""
    assume(well_conditioned(J))
    agg = ConFIG()
    d = agg(J)
    cos = (J @ d) / (J.norm(dim=1) * d.norm())
    assert bool((cos > 0).all())
    assert torch.allclose(cos, cos.mean().expand_as(cos), rtol=1e-8)
    assert_non_conflicting(d, J)
    # Length: the sum of the projections onto the unit direction.
    u = d / d.norm()
    assert torch.allclose(d.norm(), (J @ u).sum(), rtol=1e-10)
    k = 10.0 ** torch.tensor(log_k[: J.shape[0]], dtype=torch.float64)
    d2 = ConFIG()(J * k[:, None])
    assert torch.allclose(d2 / d2.norm(), u, atol=1e-8)


def test_against_torchjd() -> None:
    """TorchJD 0.18's ConFIG: the same formula (its pref_vector default, all ones, is our None;
    only the ratios of the weights matter) and the same length."""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    worst = {torch.float32: 0.0, torch.float64: 0.0}
    for T in (1, 2, 3, 5, 8):
        for D in (T, 16):
            for dtype in (torch.float32, torch.float64):
                J = torch.randn(T, D, generator=gen, dtype=torch.float64)
                J = (J * torch.exp(torch.randn(T, 1, generator=gen, dtype=torch.float64))).to(dtype)
                p = torch.rand(T, generator=gen, dtype=torch.float64).to(dtype) + 0.2
                for ours, theirs in ((ConFIG(), tj.ConFIG()),
                                     (ConFIG(pref_vector=p), tj.ConFIG(pref_vector=p)),
                                     (ConFIG(pref_vector=3 * p), tj.ConFIG(pref_vector=p))):
                    a, b = ours(J), theirs(J)
                    tol = 1e-3 if dtype == torch.float32 else 1e-9
                    err = float((a - b).norm() / b.norm())
                    assert err <= tol, (T, D, dtype, err)
                    worst[dtype] = max(worst[dtype], err)
    assert worst[torch.float64] < 1e-9, worst


def test_sum_scale_and_degenerate_inputs() -> None:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for T in (1, 2, 4):
        d = ConFIG()(g.expand(T, -1).clone())
        assert torch.allclose(d, T * g, rtol=1e-12)  # equal rows: the sum
    # Exactly opposite gradients: no direction at equal positive angles; d = 0.
    agg = ConFIG()
    assert torch.equal(agg(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])), torch.zeros(2))
    assert torch.equal(agg.weights, torch.zeros(2))
    # A zero row has no unit vector: weight 0, the others as without it.
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    agg(J)
    assert agg.weights[1] == 0
    assert torch.allclose(agg(J), ConFIG()(J[[0, 2]]), rtol=1e-14)
    assert torch.equal(ConFIG()(torch.zeros(3, 4)), torch.zeros(4))
    assert torch.allclose(config_weights(torch.tensor([[4.0]])), torch.tensor([1.0]))


def test_input_checks() -> None:
    for bad in (torch.zeros(3), torch.ones(2, 2), torch.tensor([-1.0, 0.0]),
                torch.tensor([1.0, -1.0])):
        with pytest.raises(ValueError, match="pref_vector must be a 1-D tensor"):
            ConFIG(pref_vector=bad)
    with pytest.raises(ValueError, match=r"pref_vector must have shape \[3\]"):
        ConFIG(pref_vector=torch.ones(2))(torch.randn(3, 4))
    with pytest.raises(ValueError, match="0 at every present task"):
        ConFIG(pref_vector=torch.tensor([0.0, 1.0])).aggregate(torch.randn(1, 4),
                                                                 present=[True, False])
    with pytest.raises(ValueError, match="rtol"):
        ConFIG(rtol=-1.0)
    for name in ("config", "ConFIG", "con-fig", "con_fig"):
        assert isinstance(get(name), ConFIG)
    assert repr(get("config", pref_vector=[1.0, 2.0])) == ("ConFIG(pref_vector=[1.0, 2.0], "
                                                           "rtol=None)")
    assert get("config").reads == "gramian" and ConFIG.gramian_only


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(min_tasks=1, max_tasks=7, max_dim=10))
def test_expected_structure(J: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        assert_expected_structure(ConFIG(), J.to(dtype), weights_rtol=1e-4)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: ConFIG(), DEGENERATE_MATRICES)


@settings(max_examples=20, deadline=None)
@given(J=gaussian_matrices(min_tasks=2, max_tasks=6, tall=True))
def test_gramian_only(J: torch.Tensor) -> None:
    Q, _ = torch.linalg.qr(torch.randn(J.shape[1], J.shape[1], dtype=J.dtype,
                                       generator=torch.Generator().manual_seed(0)))
    a = ConFIG()(J)
    b = ConFIG()(J @ Q)
    assert_close(b, a @ Q, rtol=1e-9, atol=1e-10 * scale_of(J), norm=True)


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(min_tasks=2, max_tasks=6, max_dim=8), perm_seed=st.integers(0, 999),
       w=st.lists(st.floats(0.1, 5.0), min_size=6, max_size=6))
def test_permutation_invariant(J: torch.Tensor, perm_seed: int, w: list[float]) -> None:
    T = J.shape[0]
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(perm_seed))
    tol = 1e-9 * float(J.norm(dim=1).sum())
    assert_permutation_invariant(lambda: ConFIG(), J, perm, atol=tol, norm=True,
                                 weights=lambda a: a.weights, weights_rtol=1e-6,
                                 weights_atol=1e-9)
    p = torch.tensor(w[:T], dtype=torch.float64)
    assert_permutation_invariant(lambda: ConFIG(pref_vector=p), J, perm, atol=tol, norm=True,
                                 permuted=lambda: ConFIG(pref_vector=p[perm]))


@settings(max_examples=25, deadline=None)
@given(K=gaussian_matrices(max_tasks=6))
def test_positively_homogeneous(K: torch.Tensor) -> None:
    assert_positively_homogeneous(lambda: ConFIG(), K, POSITIVE_SCALES, rtol=1e-9,
                                  atol=1e-10 * float(K.norm(dim=1).sum()), norm=True)


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(min_tasks=2, max_tasks=6, max_dim=8),
       c=st.lists(st.floats(0.1, 10.0), min_size=12, max_size=12))
def test_linear_under_scaling(J: torch.Tensor, c: list[float]) -> None:
    """The unit direction reads only U(g_i), unchanged by c > 0, and the length
    sum_i c_i g_i . g_u is linear in c: so c -> A(diag(c) J) is linear."""
    T = J.shape[0]
    c1 = torch.tensor(c[:T], dtype=torch.float64)
    c2 = torch.tensor(c[6:6 + T], dtype=torch.float64)
    atol = 1e-9 * float((J.norm(dim=1) * (c1 + c2)).sum())
    assert_linear_under_scaling(lambda: ConFIG(), J, c1, c2, atol=atol)
