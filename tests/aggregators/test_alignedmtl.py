"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR
2023, Algorithm 1) against the Procrustes solution from the SVD of J (float64 numpy), its
orthogonality property, and TorchJD 0.18; then the shared properties: expected structure,
positive homogeneity, permutation invariance, a non-zero direction when the tasks share a descent
direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators.alignedmtl import AlignedMTL, alignment_matrix

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
    jacobians,
)


def procrustes_reference(J: np.ndarray, scale_mode: str, w: np.ndarray) -> np.ndarray:
    """J = U S V^T (rank R); the aligned gradients are sqrt(scale) U V^T (the closest matrix
    with orthonormal rows, rescaled), and d = w^T (aligned)."""
    U, S, Vt = np.linalg.svd(J, full_matrices=False)
    lam = S**2
    keep = lam > J.shape[0] * np.finfo(np.float64).eps * lam.max() if lam.size else lam > 0
    if not keep.any():
        return np.zeros(J.shape[1])
    lam_k = lam[keep]
    scale = {"min": lam_k.min(), "median": np.sort(lam_k)[(lam_k.size - 1) // 2],
             "rmse": lam_k.mean()}[scale_mode]
    aligned = np.sqrt(scale) * U[:, keep] @ Vt[keep]
    return w @ aligned


@settings(max_examples=40, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, max_dim=10, min_log_scale=-6, max_log_scale=6,
                   kinds=("random", "orthogonal", "duplicate", "zero_row", "rank1", "opposite")),
       scale_mode=st.sampled_from(["min", "median", "rmse"]), weighted=st.booleans())
def test_matches_procrustes_from_svd(J: torch.Tensor, scale_mode: str, weighted: bool) -> None:
    T = J.shape[0]
    w = np.linspace(0.5, 2.0, T) if weighted else np.ones(T)
    d = AlignedMTL(task_weights=w.tolist() if weighted else None, scale_mode=scale_mode)(J)
    ref = procrustes_reference(J.numpy(), scale_mode, w)
    scale = float(J.norm(dim=1).max()) * T
    assert np.linalg.norm(d.numpy() - ref) <= 1e-8 * scale, (d, ref)


@settings(max_examples=30, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=10, min_log_scale=-4, max_log_scale=4,
                   kinds=("random", "orthogonal")))
def test_aligned_gradients_are_orthogonal_with_equal_norms(J: torch.Tensor) -> None:
    T, D = J.shape
    sv = torch.linalg.svdvals(J)
    if T > D or float(sv[-1]) <= 1e-6 * float(sv[0]):
        return  # full row rank only: then (B J)(B J)^T = lambda_R I
    B = alignment_matrix(J @ J.T)
    A = B @ J
    lam_min = float(sv[-1]) ** 2
    assert torch.allclose(A @ A.T, lam_min * torch.eye(T, dtype=J.dtype), rtol=1e-6,
                          atol=1e-7 * lam_min)


def test_examples_and_validation() -> None:
    J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(AlignedMTL()(J), torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(AlignedMTL(scale_mode="rmse")(J),
                          torch.full((2,), 2.5**0.5, dtype=torch.float64))
    assert torch.equal(AlignedMTL()(torch.zeros(3, 4)), torch.zeros(4))
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTL(scale_mode="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 task weights but J has 3 rows"):
        AlignedMTL(task_weights=[1.0, 2.0])(torch.ones(3, 2))
    with pytest.raises(ValueError, match="finite"):
        AlignedMTL(task_weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="rtol"):
        AlignedMTL(rtol=-1.0)
    agg = AlignedMTL()
    agg(J)
    expect = torch.tensor([4.0, 1.0], dtype=torch.float64)
    assert torch.allclose(agg.diagnostics["eigenvalues"], expect)


def test_against_torchjd() -> None:
    """TorchJD 0.18's AlignedMTL uses the same balance transformation with the preference 1/T
    by default; ours sums the aligned gradients (the authors' code), i.e. is T times it."""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    for T in (2, 3, 6, 10):
        for mode in ("min", "median", "rmse"):
            for dtype in (torch.float32, torch.float64):
                J = torch.randn(T, 16, generator=gen, dtype=torch.float64)
                if T > 3:
                    J[-1] = J[0]  # rank-deficient
                J = J.to(dtype)
                ref = tj.AlignedMTL(scale_mode=mode)(J) * T
                ours = AlignedMTL(scale_mode=mode)(J)
                tol = 1e-4 if dtype == torch.float32 else 1e-10
                assert torch.allclose(ours, ref, rtol=tol, atol=tol * float(ref.abs().max()))
                pref = torch.linspace(0.2, 1.0, T, dtype=dtype)
                ref_p = tj.AlignedMTL(pref_vector=pref, scale_mode=mode)(J)
                ours_p = AlignedMTL(task_weights=pref, scale_mode=mode)(J)
                assert torch.allclose(ours_p, ref_p, rtol=tol, atol=tol * float(ref_p.abs().max()))


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, max_dim=10, min_log_scale=-6, max_log_scale=6),
       K=gaussian_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        assert_expected_structure(AlignedMTL(), J.to(dtype))
    assert_expected_structure(AlignedMTL(), K)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: AlignedMTL(), DEGENERATE_MATRICES)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=5, max_dim=8, min_log_scale=-3, max_log_scale=3),
       log_s=st.floats(-6, 6), K=gaussian_matrices())
def test_positively_homogeneous(J: torch.Tensor, log_s: float, K: torch.Tensor) -> None:
    """d(s J) = s d(J) for s > 0 (the scale sqrt(lambda) scales with s)."""
    assert_positively_homogeneous(lambda: AlignedMTL(), J, 10.0**log_s, rtol=1e-8,
                                  atol=1e-8 * float(J.norm(dim=1).sum()), norm=True)
    assert_positively_homogeneous(lambda: AlignedMTL(), K, POSITIVE_SCALES,
                                  atol=1e-9 * scale_of(K))


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       perm_seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_permutation_invariant(J: torch.Tensor, perm_seed: int, K: torch.Tensor) -> None:
    """The SVD of P J is P U S V^T: the aligned gradients are reordered, their sum is not."""
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    a, b = assert_permutation_invariant(lambda: AlignedMTL(), J, perm, rtol=1e-9,
                                        atol=1e-9 * float(J.norm(dim=1).sum()), norm=True)
    wa, wb = a.weights[perm], b.weights  # the same weights, reordered
    assert_close(wa, wb, rtol=1e-6, atol=1e-9 * float(wa.abs().max() + 1))
    assert_permutation_invariant(lambda: AlignedMTL(), K, 3, atol=1e-9 * scale_of(K))


@settings(max_examples=25, deadline=None)
@given(common_direction_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor) -> None:
    """The rows share a descent direction (0 is not in their hull): d != 0."""
    assert_nonzero_direction(AlignedMTL(), J)
