"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2) against the
paper's closed form on J in float64 numpy and against TorchJD 0.18; equal projections, invariance
of the direction's line to row scaling, degenerate inputs; then the shared properties: expected
structure, positive homogeneity, permutation invariance, a non-zero direction when the tasks share
a descent direction.  (Not non-conflicting: the equal projections can be negative.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators.imtlg import IMTLG, imtlg_weights

from .._properties import (
    assert_close,
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import (
    DEGENERATE_MATRICES,
    POSITIVE_SCALES,
    common_direction_matrices,
    gaussian_matrices,
    independent_row_matrices,
    jacobians,
)


def paper_closed_form(J: np.ndarray) -> np.ndarray:
    """alpha_{2:T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum alpha_{2:T} (rows of D: g_1 - g_t,
    rows of U: u_1 - u_t)."""
    u = J / np.linalg.norm(J, axis=1, keepdims=True)
    Dm = J[0] - J[1:]
    Um = u[0] - u[1:]
    rest = J[0] @ Um.T @ np.linalg.inv(Dm @ Um.T)
    return np.concatenate([[1 - rest.sum()], rest])


@settings(max_examples=40, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=12, min_log_scale=-6, max_log_scale=6,
                   kinds=("random", "orthogonal")))
def test_matches_paper_closed_form(J: torch.Tensor) -> None:
    assume(J.shape[1] >= J.shape[0])  # the paper's inverse exists for independent gradients
    Jn = J.numpy()
    s = np.linalg.svd(Jn, compute_uv=False)
    assume(s[-1] > 1e-4 * s[0])
    alpha_ref = paper_closed_form(Jn)
    agg = IMTLG()
    d = agg(J)
    assert agg.weights is not None
    atol = 1e-8 * np.abs(alpha_ref).max()
    assert np.allclose(agg.weights.numpy(), alpha_ref, rtol=1e-6, atol=atol)
    assert abs(float(agg.weights.sum()) - 1) < 1e-9
    # Equal projections onto every unit gradient.
    proj = (J @ d) / J.norm(dim=1)
    assert torch.allclose(proj, proj.mean().expand_as(proj), rtol=1e-7, atol=0)
    assert torch.allclose(agg.diagnostics["projections"], proj, rtol=1e-7)


@settings(max_examples=40, deadline=None)
@given(J=independent_row_matrices(), log_k=st.lists(st.floats(-3, 3), min_size=5, max_size=5))
@example(  # rows scaled by 1e-3 and 1e2: on G itself this lost 3 digits
    J=torch.tensor([[0.1257, -0.1321, 0.6404, 0.1049, -0.5357],
                    [0.3616, 1.3040, 0.9471, -0.7037, -1.2654],
                    [-0.6233, 0.0413, -2.3250, -0.2188, -1.2459],
                    [-0.7323, -0.5443, -0.3163, 0.4116, 1.0425],
                    [-0.1285, 1.3665, -0.6652, 0.3515, 0.9035]], dtype=torch.float64),
    log_k=[-3.0, 0.0, 0.0, 2.0, 0.0])
def test_direction_invariant_to_row_scaling(J: torch.Tensor, log_k: list[float]) -> None:
    """u_t does not change when g_t is scaled by k_t > 0: neither does the direction's line."""
    k = 10.0 ** torch.tensor(log_k[: J.shape[0]], dtype=torch.float64)
    sv = torch.linalg.svdvals(J)
    assume(float(sv[-1]) > 1e-6 * float(sv[0]))  # independent rows: a unique weighting
    agg = IMTLG()
    d = agg(J)
    d2 = IMTLG()(J * k[:, None])
    # d' = d / sum_t (alpha_t / k_t): parallel to d, with the sign of that sum (weights can be
    # negative, so it can flip: the paper's normalisation sum alpha' = 1).
    assert agg.weights is not None
    factor = 1.0 / float((agg.weights / k).sum())
    assert torch.allclose(d2, factor * d, rtol=1e-7, atol=1e-9 * float(d2.norm() + d.norm()))


def test_degenerate_inputs() -> None:
    # Exactly opposite gradients: no weighting has equal non-zero projections; d = 0.
    agg = IMTLG()
    d = agg(torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))
    assert torch.equal(d, torch.zeros(2)) and torch.equal(agg.weights, torch.zeros(2))
    # A zero row: it has no unit gradient; the others get equal projections.
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    d = agg(J)
    assert torch.allclose(J[[0, 2]] @ d / J[[0, 2]].norm(dim=1), torch.full((2,), 0.75,
                                                                            dtype=torch.float64))
    # Duplicated rows: the pseudo-inverse splits the weight.
    J = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(agg(J), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.equal(IMTLG()(torch.zeros(3, 4)), torch.zeros(4))
    with pytest.raises(ValueError, match="rtol"):
        IMTLG(rtol=-1.0)


def test_weights_function_example_and_one_task() -> None:
    assert torch.allclose(imtlg_weights(torch.tensor([[4.0]])), torch.tensor([1.0]))
    J = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(IMTLG()(J), J[0])


def test_against_torchjd() -> None:
    """TorchJD 0.18's IMTLG is G^+ n normalised; ours is the same for invertible G, and on the
    same line for dependent rows (it takes the pseudo-inverse of the cosine matrix instead; see
    the module docstring).  (On exactly opposite rows TorchJD normalises a rounding-level sum and
    returns a non-zero direction; we return 0, see test_degenerate_inputs.)"""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    for T in (2, 3, 6, 10):
        for dtype in (torch.float32, torch.float64):
            J = torch.randn(T, 16, generator=gen, dtype=torch.float64)
            J = J.to(dtype)
            ref, ours = tj.IMTLG()(J), IMTLG()(J)
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            atol = tol * float(ref.abs().max())
            assert torch.allclose(ours, ref, rtol=tol, atol=atol), (T, dtype)
            # Dependent rows (a duplicate and a multiple): the same line.
            Jd = torch.cat([J, J[:1], 2.5 * J[1:2]])
            ref, ours = tj.IMTLG()(Jd), IMTLG()(Jd)
            cos = float(ref @ ours / (ref.norm() * ours.norm()))
            assert abs(abs(cos) - 1) < 10 * tol, (T, dtype, cos)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, max_dim=10, min_log_scale=-6, max_log_scale=6),
       K=gaussian_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        assert_expected_structure(IMTLG(), J.to(dtype))
    assert_expected_structure(IMTLG(), K)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: IMTLG(), DEGENERATE_MATRICES)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=5, max_dim=8, min_log_scale=-3, max_log_scale=3),
       log_s=st.floats(-6, 6), K=gaussian_matrices())
def test_positively_homogeneous(J: torch.Tensor, log_s: float, K: torch.Tensor) -> None:
    """d(s J) = s d(J) for s > 0 (the unit gradients do not change)."""
    assert_positively_homogeneous(lambda: IMTLG(), J, 10.0**log_s, rtol=1e-8,
                                  atol=1e-8 * float(J.norm(dim=1).sum()), norm=True)
    assert_positively_homogeneous(lambda: IMTLG(), K, POSITIVE_SCALES,
                                  atol=1e-9 * scale_of(K))


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       perm_seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_permutation_invariant(J: torch.Tensor, perm_seed: int, K: torch.Tensor) -> None:
    """The equal-projection conditions do not depend on the order of the tasks."""
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    a, b = assert_permutation_invariant(lambda: IMTLG(), J, perm, rtol=1e-9,
                                        atol=1e-9 * float(J.norm(dim=1).sum()), norm=True)
    wa, wb = a.weights[perm], b.weights  # the same weights, reordered
    assert_close(wa, wb, rtol=1e-6, atol=1e-9 * float(wa.abs().max() + 1))
    assert_permutation_invariant(lambda: IMTLG(), K, 3, atol=1e-9 * scale_of(K))


@settings(max_examples=25, deadline=None)
@given(common_direction_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor) -> None:
    """The rows share a descent direction (0 is not in their hull): d != 0."""
    assert_nonzero_direction(IMTLG(), J)
