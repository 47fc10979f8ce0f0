"""UPGrad (Quinton and Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024): against
cvxpy's projection and TorchJD, the KKT conditions of every projection, and the properties the
paper proves: non-conflicting and weighted (with weights at least the preference), permutation
invariant, linear under scaling, and strongly stationary (d = 0 exactly when 0 is a positive
combination of the rows); with the expected structure at any scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.upgrad import UPGrad

from .._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_non_conflicting,
    assert_nonzero_direction,
    assert_permutation_invariant,
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
@given(jacobians(max_tasks=6, max_dim=8))
def test_matches_cvxpy_projection(J: torch.Tensor) -> None:
    d = UPGrad()(J)
    Jn = J.numpy()
    ref = np.mean([cvxpy_project(Jn, Jn[i]) for i in range(J.shape[0])], axis=0)
    s = scale_of(J)
    # cvxpy's interior point is accurate to ~sqrt(its tolerance) in x near degenerate
    # constraints; the KKT test below checks the exact optimality of every projection.
    assert np.abs(d.numpy() - ref).max() <= 1e-5 * s


@settings(max_examples=100, deadline=None)
@given(jacobians(max_tasks=10, max_dim=12))
def test_each_projection_satisfies_kkt(J: torch.Tensor) -> None:
    """x_i = g_i / T + J^T lam_i is the projection of g_i / T iff lam_i >= 0, J x_i >= 0 and
    lam_i . J x_i = 0 (the KKT conditions of the projection, a certificate independent of the
    solver)."""
    agg = UPGrad()
    agg(J)
    lam = agg.diagnostics["lam"]
    T = J.shape[0]
    s = scale_of(J)
    X = J / T + lam.T @ J  # row i is x_i
    JX = X @ J.T  # [i, k] = g_k . x_i
    assert bool((lam >= 0).all())
    assert bool((JX >= -1e-10 * s * s).all())
    comp = (lam.T * JX).abs()
    assert bool((comp <= 1e-10 * s * s * (1 + lam.T.abs())).all())


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**31 - 1), st.floats(-6, 6))
def test_matches_torchjd(T: int, seed: int, log_scale: float) -> None:
    J = torch.tensor(np.random.default_rng(seed).standard_normal((T, T + 3)) * 10**log_scale)
    ref = torchjd_reference("UPGrad", J)
    assert torch.allclose(UPGrad()(J), ref, rtol=0, atol=1e-9 * scale_of(J))


@settings(max_examples=150, deadline=None)
@given(J=jacobians(max_tasks=10, max_dim=12, min_log_scale=-6, max_log_scale=6),
       K=gaussian_matrices(), R=gaussian_matrices(min_tasks=3, rank=2))
def test_non_conflicting_finite_weighted(J: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> None:
    """J d >= 0 (to 1e-10 T s^2) on hard, Gaussian and rank-2 Gaussian matrices; on the hard
    ones, d = w^T J with w >= p (the dual variables are non-negative)."""
    agg = UPGrad()
    d = assert_non_conflicting(agg, J)
    assert_weighted(agg, J, d, atol=1e-12 * scale_of(J))
    assert bool((agg.weights >= 1.0 / J.shape[0] - 1e-12).all())
    assert_non_conflicting(UPGrad(), K)
    assert_non_conflicting(UPGrad(), R)


@settings(max_examples=80, deadline=None)
@given(jacobians(max_tasks=8), st.randoms(use_true_random=False))
def test_permutation_invariant(J: torch.Tensor, rnd) -> None:
    perm = list(range(J.shape[0]))
    rnd.shuffle(perm)
    assert_permutation_invariant(UPGrad, J, perm, atol=1e-9 * scale_of(J))


@settings(max_examples=80, deadline=None)
@given(jacobians(max_tasks=8, min_log_scale=-6, max_log_scale=6),
       st.lists(st.floats(0.1, 10), min_size=8, max_size=8),
       st.lists(st.floats(0.1, 10), min_size=8, max_size=8))
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float]) -> None:
    """The paper's property: c -> A(diag(c) J) is linear on c > 0."""
    T = J.shape[0]
    a = torch.tensor(c1[:T], dtype=J.dtype)
    b = torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(UPGrad, J, a, b, atol=1e-9 * 20 * scale_of(J))


def test_known_values_and_zero_rows() -> None:
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # The cone is {x1 >= 0, x2 >= x1}: g1 = (1, 0) projects to (1/2, 1/2), g2 = (-1, 1) to
    # (0, 1); their mean is (1/4, 3/4).
    d = UPGrad()(J)
    assert torch.allclose(d, torch.tensor([0.25, 0.75], dtype=torch.float64))
    Z = torch.zeros(3, 4)
    assert torch.equal(UPGrad()(Z), torch.zeros(4))
    Jz = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]])
    dz = UPGrad()(Jz)
    assert bool(torch.isfinite(dz).all()) and bool((Jz @ dz >= -1e-6).all())


def test_pref_vector_and_errors() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # no conflict: d = p^T J
    d = UPGrad(pref_vector=torch.tensor([0.2, 0.8]))(J)
    assert torch.allclose(d, torch.tensor([0.2, 0.8], dtype=torch.float64))
    with pytest.raises(ValueError, match="pref_vector must have shape"):
        UPGrad(pref_vector=torch.ones(3))(J)
    with pytest.raises(ValueError, match="non-negative"):
        UPGrad(pref_vector=torch.tensor([1.0, -1.0]))(J)


def test_registry_and_float32() -> None:
    agg = get("upgrad")
    assert isinstance(agg, UPGrad)
    J = torch.randn(4, 7)
    d = agg(J)
    assert d.dtype == torch.float32 and bool(torch.isfinite(d).all())
    assert get("upgrad+tension").base.__class__ is UPGrad


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(), K=controlled_matrices())
def test_expected_structure(J: torch.Tensor, K: torch.Tensor) -> None:
    """On Gaussian matrices, and on any rank, stationarity and scale (10^-8 to 10^8)."""
    assert_expected_structure(UPGrad, J)
    assert_expected_structure(UPGrad, K, weights_atol=1e-10 * float(K.norm(dim=1).sum()))


@settings(max_examples=25, deadline=None)
@given(J=cancelling_row_matrices(), K=strongly_stationary_matrices())
def test_zero_at_strong_stationarity(J: torch.Tensor, K: torch.Tensor) -> None:
    """v^T J = 0 for a v > 0: the dual cone {x : J x >= 0} is the null space of J, onto which
    every row projects to 0."""
    assert_zero_direction(UPGrad, J, rtol=1e-7)
    assert_zero_direction(UPGrad, K, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(J=non_strongly_stationary_matrices(), K=common_direction_matrices())
def test_nonzero_off_strong_stationarity(J: torch.Tensor, K: torch.Tensor) -> None:
    """The weights are at least p > 0, so d = w^T J = 0 only when J is strongly stationary:
    d != 0 on strictly weakly stationary matrices and where the rows share a descent direction."""
    assert_nonzero_direction(UPGrad, J)
    assert_nonzero_direction(UPGrad, K)


# --- float32 rounding: the order of the tasks ---------------------------------------------------

FLOAT32_SHAPES = ((4, 3), (9, 11), (20, 10), (20, 100))


@pytest.mark.parametrize("shape", FLOAT32_SHAPES)
@pytest.mark.parametrize("seed", range(4))
def test_float32_permutation_invariant_to_rounding(shape: tuple[int, int], seed: int) -> None:
    """float32 Gaussian J (20 x 10: rank-deficient, large cancelling multipliers): permuting the
    rows moves d by at most 5e-7 (TorchJD's own gap on these inputs; it was 3e-6 when G, the
    multipliers' sum and w^T J were float32 steps).  G and w^T J are now accumulated in float64."""
    J = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    assert permutation_gap(UPGrad, J, perms=4, seed=seed) <= 5e-7


@pytest.mark.parametrize("shape", FLOAT32_SHAPES)
def test_float32_matches_torchjd(shape: tuple[int, int]) -> None:
    """Our float32 d against TorchJD's in float64 on the same J, its projector unregularised
    (``torchjd_reference``: the same dual problem and scale, p = 1/T), to 2e-7 times the largest
    row norm.  Conventions: TorchJD's defaults normalise G and add 1e-4 to its diagonal, a
    regularised problem; on these inputs that moves d by ~1e-3, and by up to 0.26 on the
    20 x 10 ones whose rows' hull holds 0 (there the exact d is 0), so it is not compared."""
    for seed in range(3):
        J = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        d = UPGrad()(J)
        ref = torchjd_reference("UPGrad", J.double())
        assert float((d.double() - ref).abs().max()) <= 2e-7 * scale_of(J)
