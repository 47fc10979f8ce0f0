"""DualProj (the projection of the mean gradient onto the dual cone of the rows: Lopez-Paz and
Ranzato, NeurIPS 2017, eq. 10-13; named DualProj by Quinton and Rey, 2024): against cvxpy's
projection and TorchJD, the KKT conditions of the projection, and its properties: non-conflicting
and weighted, permutation invariant, positively homogeneous but not linear under scaling, and
strongly stationary (d = 0 exactly when 0 is a positive combination of the rows); with the
expected structure at any scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.dualproj import DualProj

from .._properties import (
    assert_expected_structure,
    assert_non_conflicting,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    assert_weighted,
    assert_zero_direction,
    permutation_gap,
    scale_of,
)
from ..strategies import (
    cancelling_row_matrices,
    common_direction_matrices,
    controlled_matrices,
    gaussian_matrices,
    jacobians,
    non_strongly_stationary_matrices,
    strongly_stationary_matrices,
)
from ._cone_helpers import cvxpy_project, torchjd_reference


@settings(max_examples=40, deadline=None)
@given(jacobians(max_tasks=8, max_dim=10))
def test_matches_cvxpy_projection(J: torch.Tensor) -> None:
    d = DualProj()(J)
    ref = cvxpy_project(J.numpy(), J.numpy().mean(axis=0))
    # cvxpy's x is accurate to ~sqrt(its tolerance) near degenerate constraints; the KKT test
    # below certifies exact optimality.
    assert np.abs(d.numpy() - ref).max() <= 1e-5 * scale_of(J)


@settings(max_examples=100, deadline=None)
@given(jacobians(max_tasks=10, max_dim=12))
def test_projection_satisfies_kkt(J: torch.Tensor) -> None:
    """d = mean + J^T lam is the projection of the mean iff lam >= 0, J d >= 0, lam . J d = 0."""
    agg = DualProj()
    d = agg(J)
    lam = agg.diagnostics["lam"]
    s = scale_of(J)
    assert torch.allclose(d, J.mean(0) + lam @ J, rtol=0, atol=1e-12 * s * (1 + float(lam.sum())))
    Jd = J @ d
    assert bool((lam >= 0).all()) and bool((Jd >= -1e-10 * s * s).all())
    assert bool(((lam * Jd).abs() <= 1e-10 * s * s * (1 + lam)).all())


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**31 - 1), st.floats(-6, 6))
def test_matches_torchjd(T: int, seed: int, log_scale: float) -> None:
    J = torch.tensor(np.random.default_rng(seed).standard_normal((T, T + 3)) * 10**log_scale)
    ref = torchjd_reference("DualProj", J)
    assert torch.allclose(DualProj()(J), ref, rtol=0, atol=1e-9 * scale_of(J))


@settings(max_examples=150, deadline=None)
@given(J=jacobians(max_tasks=10, max_dim=12, min_log_scale=-6, max_log_scale=6),
       K=gaussian_matrices(), R=gaussian_matrices(min_tasks=3, rank=2))
def test_non_conflicting_finite_minimal(J: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> None:
    """J d >= 0 (to 1e-10 T s^2) on hard, Gaussian and rank-2 Gaussian matrices; on the hard
    ones d = w^T J, and d is the mean itself when the mean conflicts with no row."""
    agg = DualProj()
    d = assert_non_conflicting(agg, J)
    s = scale_of(J)
    assert_weighted(agg, J, d, atol=1e-12 * s)
    # Idempotent: d is already in the cone, so projecting J-combinations of it changes nothing
    # when the mean does not conflict.
    mean = J.mean(0)
    if bool((J @ mean >= 0).all()):
        assert torch.allclose(d, mean, rtol=0, atol=1e-12 * s)
    assert_non_conflicting(DualProj(), K)
    assert_non_conflicting(DualProj(), R)


@settings(max_examples=80, deadline=None)
@given(jacobians(max_tasks=8), st.randoms(use_true_random=False))
def test_permutation_invariant(J: torch.Tensor, rnd) -> None:
    perm = list(range(J.shape[0]))
    rnd.shuffle(perm)
    assert_permutation_invariant(DualProj, J, perm, atol=1e-9 * scale_of(J))


@settings(max_examples=40, deadline=None)
@given(jacobians(max_tasks=8, min_log_scale=-6, max_log_scale=6), st.floats(1e-3, 1e3))
def test_positively_homogeneous(J: torch.Tensor, c: float) -> None:
    """Scaling every row by the same c > 0 scales d by c (not linear in per-row scalings)."""
    assert_positively_homogeneous(DualProj, J, c, atol=1e-9 * scale_of(J))


def test_not_linear_under_row_scaling() -> None:
    """Unlike UPGrad, DualProj is not linear in diag(c) J (the paper's comparison)."""
    J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    a = torch.tensor([1.0, 0.1], dtype=torch.float64)[:, None]
    b = torch.tensor([0.1, 1.0], dtype=torch.float64)[:, None]
    agg = DualProj()
    assert not torch.allclose(agg(J * (a + b)), agg(J * a) + agg(J * b), atol=1e-6)


def test_known_values_zero_rows_and_errors() -> None:
    J = torch.tensor([[1.0, 0.0], [-3.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(DualProj()(J), torch.tensor([0.0, 0.5], dtype=torch.float64))
    assert torch.equal(DualProj()(torch.zeros(2, 3)), torch.zeros(3))
    Jz = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]])
    dz = DualProj()(Jz)
    assert bool(torch.isfinite(dz).all()) and bool((Jz @ dz >= -1e-6).all())
    with pytest.raises(ValueError, match="pref_vector must have shape"):
        DualProj(pref_vector=torch.ones(3))(J)
    d = DualProj(pref_vector=torch.tensor([1.0, 0.0]))(J)  # project g1 = (1, 0)
    assert bool((J @ d >= -1e-12).all())
    assert isinstance(get("dualproj"), DualProj)


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(), K=controlled_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    """On Gaussian matrices, and on any rank, stationarity and scale (10^-8 to 10^8)."""
    assert_expected_structure(DualProj, J)
    assert_expected_structure(DualProj, K, weights_atol=1e-10 * float(K.norm(dim=1).sum()))


@settings(max_examples=25, deadline=None)
@given(J=cancelling_row_matrices(), K=strongly_stationary_matrices())
def test_zero_at_strong_stationarity(J: torch.Tensor, K: torch.Tensor) -> None:
    """v^T J = 0 for a v > 0: the dual cone is the null space of J, and the mean (in the row
    space) projects to 0."""
    assert_zero_direction(DualProj, J, rtol=1e-7)
    assert_zero_direction(DualProj, K, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(J=non_strongly_stationary_matrices(), K=common_direction_matrices())
def test_nonzero_off_strong_stationarity(J: torch.Tensor, K: torch.Tensor) -> None:
    """d = (1/T + lam)^T J with lam >= 0: d = 0 only when J is strongly stationary."""
    assert_nonzero_direction(DualProj, J)
    assert_nonzero_direction(DualProj, K)


# --- float32 rounding: the order of the tasks ---------------------------------------------------

FLOAT32_SHAPES = ((4, 3), (9, 11), (20, 10), (20, 100))


@pytest.mark.parametrize("shape", FLOAT32_SHAPES)
@pytest.mark.parametrize("seed", range(4))
def test_float32_permutation_invariant_to_rounding(shape: tuple[int, int], seed: int) -> None:
    """float32 Gaussian J: permuting the rows moves d by at most 2e-7 (TorchJD's own gap on these
    inputs; it was 2.2e-6 with float32 steps in G and w^T J, now accumulated in float64)."""
    J = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    assert permutation_gap(DualProj, J, perms=4, seed=seed) <= 2e-7


@pytest.mark.parametrize("shape", FLOAT32_SHAPES)
def test_float32_matches_torchjd(shape: tuple[int, int]) -> None:
    """Our float32 d against TorchJD's in float64 on the same J, its projector unregularised
    (``torchjd_reference``: the same dual problem and scale, p = 1/T), to 2e-7 times the largest
    row norm.  Conventions: TorchJD's defaults normalise G and add 1e-4 to its diagonal, a
    regularised problem; on these inputs that moves d by ~1e-3, and by up to 0.26 on the
    20 x 10 ones whose rows' hull holds 0 (there the exact d is 0), so it is not compared."""
    for seed in range(3):
        J = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        d = DualProj()(J)
        ref = torchjd_reference("DualProj", J.double())
        assert float((d.double() - ref).abs().max()) <= 2e-7 * scale_of(J)
