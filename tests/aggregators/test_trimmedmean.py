"""TrimmedMean (Yin et al., *Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates*, ICML 2018): against a float64 NumPy re-derivation of the coordinate-wise trimmed mean and
against TorchJD 0.18; the paper's robustness (with at most ``b`` corrupted rows every coordinate
stays within the range of the honest values); the default trim and the input checks; the shared
properties: expected structure, permutation invariance (bit for bit), positive homogeneity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.trimmedmean import TrimmedMean

from .._properties import (
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import DEGENERATE_MATRICES, POSITIVE_SCALES, gaussian_matrices, jacobians
from ..test_capture import forbid_host_sync


def reference(J: np.ndarray, b: int) -> np.ndarray:
    """Per column: drop the b smallest and b largest values, average the rest (float64)."""
    T, D = J.shape
    out = np.empty(D)
    for k in range(D):
        col = sorted(float(x) for x in J[:, k])
        out[k] = sum(col[b:T - b]) / (T - 2 * b)
    return out


@settings(max_examples=40, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=9, max_dim=10), data=st.data())
def test_matches_reference(J: torch.Tensor, data: st.DataObject) -> None:
    T = J.shape[0]
    b = data.draw(st.integers(0, (T - 1) // 2))
    ref = reference(J.numpy(), b)
    d = TrimmedMean(trim_number=b)(J)
    assert np.allclose(d.numpy(), ref, rtol=1e-12, atol=1e-14 * scale_of(J))
    d32 = TrimmedMean(trim_number=b)(J.float())
    assert d32.dtype == torch.float32
    assert np.allclose(d32.double().numpy(), ref, rtol=1e-5, atol=1e-6 * scale_of(J))


def test_against_torchjd() -> None:
    """The same rule and count convention as TorchJD 0.18's TrimmedMean(trim_number=b)."""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for T in (1, 2, 3, 4, 7, 10):
        for b in range((T - 1) // 2 + 1):
            for dtype in (torch.float32, torch.float64):
                J = torch.randn(T, 13, generator=gen, dtype=dtype) * 3.0
                ref, ours = tj.TrimmedMean(trim_number=b)(J), TrimmedMean(trim_number=b)(J)
                tol = 1e-6 if dtype == torch.float32 else 1e-14
                assert torch.allclose(ours, ref, rtol=tol, atol=tol), (T, b, dtype)
                worst = max(worst, float((ours - ref).abs().max()))
    assert worst <= 1e-6, worst


@settings(max_examples=30, deadline=None)
@given(J=gaussian_matrices(min_tasks=3, max_tasks=9, max_dim=8), data=st.data())
def test_robust_to_b_corrupted_rows(J: torch.Tensor, data: st.DataObject) -> None:
    """With q <= b rows replaced by anything, each coordinate of d lies between the smallest and
    the largest honest value of its column (the trimmed set holds only values inside that
    range), so the corrupted rows can move d only within the honest rows' range."""
    T = J.shape[0]
    b = data.draw(st.integers(1, (T - 1) // 2))
    q = data.draw(st.integers(1, b))
    rows = data.draw(st.lists(st.integers(0, T - 1), min_size=q, max_size=q, unique=True))
    log_size = data.draw(st.floats(0, 12))
    seed = data.draw(st.integers(0, 2**31 - 1))
    bad = J.clone()
    rng = np.random.default_rng(seed)
    bad[rows] = torch.tensor(rng.standard_normal((q, J.shape[1])) * 10.0**log_size)
    honest = torch.tensor([t for t in range(T) if t not in rows])
    d = TrimmedMean(trim_number=b)(bad)
    lo, hi = J[honest].min(dim=0).values, J[honest].max(dim=0).values
    assert bool((d >= lo).all()) and bool((d <= hi).all()), (d, lo, hi)


def test_default_trim_and_checks() -> None:
    J = torch.tensor([[1.0, 4.0], [3.0, 0.0]], dtype=torch.float64)
    agg = TrimmedMean()
    assert torch.equal(agg(J[:1]), J[0]) and torch.equal(agg(J), J.mean(dim=0))  # 1, 2 rows
    assert agg.weights is None
    J5 = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]], dtype=torch.float64)
    assert torch.equal(TrimmedMean()(J5), torch.tensor([2.0], dtype=torch.float64))  # (1+2+3)/3
    assert torch.equal(TrimmedMean(trim_number=2)(J5), torch.tensor([2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"needs at least 2 \* 2 \+ 1 = 5 rows .* got 4"):
        TrimmedMean(trim_number=2)(J5[:4])
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="trim_number must be a non-negative int"):
            TrimmedMean(trim_number=bad)  # type: ignore[arg-type]
    for name in ("trimmedmean", "trimmed-mean", "Trimmed_Mean"):
        assert isinstance(get(name), TrimmedMean)
    assert repr(get("trimmedmean", trim_number=2)) == "TrimmedMean(trim_number=2)"
    assert get("trimmedmean").reads == "jacobian" and not TrimmedMean.gramian_only


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=7, max_dim=10, min_log_scale=-6, max_log_scale=6))
def test_expected_structure(J: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        out = assert_expected_structure(TrimmedMean(), J.to(dtype))
        assert out.weights is None


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: TrimmedMean(), DEGENERATE_MATRICES)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=8, max_dim=8), data=st.data())
def test_permutation_invariant(J: torch.Tensor, data: st.DataObject) -> None:
    """Sorting each column makes the order of the tasks irrelevant, bit for bit."""
    b = data.draw(st.integers(0, (J.shape[0] - 1) // 2))
    assert_permutation_invariant(lambda: TrimmedMean(trim_number=b), J, 4, seed=b)


@settings(max_examples=25, deadline=None)
@given(K=gaussian_matrices(max_tasks=7))
def test_positively_homogeneous(K: torch.Tensor) -> None:
    assert_positively_homogeneous(lambda: TrimmedMean(), K, POSITIVE_SCALES,
                                  rtol=1e-14, atol=1e-15 * scale_of(K))


def test_no_host_synchronisation() -> None:
    """One sort and a mean: nothing read on the host (CPU stand-in for
    torch.cuda.set_sync_debug_mode('error'))."""
    J = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    with forbid_host_sync():
        d = TrimmedMean().aggregate(J, check_finite=False).direction
    assert d is not None and d.shape == (5,)
