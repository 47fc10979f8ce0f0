"""PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1)
against a literal float64 implementation on the rows of J, against TorchJD 0.18 and, for two
tasks, against UPGrad (Quinton and Rey 2024); then its properties: two tasks never conflict,
expected structure, positive homogeneity and linearity under scaling (with the same draws: the
projection onto the normal plane of ``g_j`` does not depend on the norm of ``g_j``), invariance to
the order of two tasks, a non-zero direction when the tasks share a descent direction."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators.pcgrad import PCGrad, pcgrad_weights
from torch_mtlgrad.aggregators.upgrad import UPGrad

from .._properties import (
    assert_close,
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_linear_under_scaling,
    assert_non_conflicting,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import (
    DEGENERATE_MATRICES,
    POSITIVE_SCALES,
    common_direction_matrices,
    controlled_matrices,
    gaussian_matrices,
    jacobians,
)


def orders(T: int, seed: int) -> list[list[int]]:
    """The visiting orders PCGrad(seed=seed) draws: randperm(T) once per task, in task order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(T, generator=g).tolist() for _ in range(T)]


def pcgrad_reference(J: torch.Tensor, perms: list[list[int]]) -> torch.Tensor:
    """Algorithm 1 on vectors: project g_i^PC onto the normal plane of each conflicting g_j."""
    out = torch.zeros(J.shape[1], dtype=torch.float64)
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in perms[i]:
            if j == i:
                continue
            dot = g @ J[j]
            if dot < 0:
                g = g - dot / (J[j] @ J[j]) * J[j]
        out += g
    return out


@settings(max_examples=40, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=7, min_log_scale=-6, max_log_scale=6),
       seed=st.integers(0, 2**31 - 1))
def test_matches_literal_algorithm(J: torch.Tensor, seed: int) -> None:
    d = PCGrad(seed=seed)(J)
    ref = pcgrad_reference(J, orders(J.shape[0], seed))
    scale = float(J.norm(dim=1).sum())
    assert float((d - ref).norm()) <= 1e-9 * scale, (d, ref)


@settings(max_examples=40, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=2, min_log_scale=-6, max_log_scale=6))
def test_two_tasks_never_conflict(J: torch.Tensor) -> None:
    """With two tasks, g_t . d >= 0 for both (each g_i^PC is orthogonal to the other g_j)."""
    d = PCGrad(seed=0)(J)
    # 0.5e-9 ||g_t|| (||d|| + max ||g||) <= 1e-9 ||g_t|| (||g_1|| + ||g_2||): ||d|| <= the sum.
    assert_non_conflicting(d, J, rtol=0.5e-9)
    # Order plays no role for two tasks.
    assert torch.equal(d, PCGrad(order="fixed")(J))


def test_closed_form_two_tasks_and_no_conflict() -> None:
    J = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=torch.float64)
    g1, g2 = J
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    agg = PCGrad(seed=0)
    assert torch.allclose(agg(J), p1 + p2)
    assert int(agg.diagnostics["conflicts"]) == 2
    # No conflict: the plain sum, nothing projected.
    J2 = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.5]])
    assert torch.equal(agg(J2), J2.sum(0)) and int(agg.diagnostics["conflicts"]) == 0


def test_fixed_order_and_weights_function() -> None:
    torch.manual_seed(0)
    J = torch.randn(5, 4, dtype=torch.float64)
    T = J.shape[0]
    d = PCGrad(order="fixed")(J)
    assert torch.allclose(d, pcgrad_reference(J, [list(range(T))] * T))
    w = pcgrad_weights(J @ J.T, torch.arange(T).expand(T, T))
    assert torch.allclose(w @ J, d)
    with pytest.raises(ValueError, match="order must be"):
        PCGrad(order="sorted")  # type: ignore[arg-type]


def test_random_order_changes_between_calls() -> None:
    """Fresh orders every call (T >= 3 conflicts depend on the order)."""
    J = torch.tensor([[1.0, 0.0, 0.0], [-0.9, 1.0, 0.0], [-0.5, -1.0, 1.0]], dtype=torch.float64)
    agg = PCGrad(seed=0)
    outs = {tuple(agg(J).tolist()) for _ in range(30)}
    assert len(outs) > 1


def test_against_torchjd() -> None:
    """TorchJD 0.18's PCGrad is Algorithm 1 on the Gramian with the sum of the projected
    gradients, drawing randperm(T) per task from the global generator: identical draws."""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    for T in (2, 3, 5, 9):
        J = torch.randn(T, 12, dtype=torch.float64, generator=gen)
        J[-1] = -0.5 * J[0] + 0.1 * J[-1]  # make conflicts likely
        torch.manual_seed(123)
        ref = tj.PCGrad()(J)
        assert torch.allclose(PCGrad(seed=123)(J), ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(J=controlled_matrices(min_tasks=2, max_tasks=2, max_dim=10))
def test_two_tasks_is_twice_upgrad(J: torch.Tensor) -> None:
    """For two tasks, each g_i^PC is the projection of g_i onto the dual cone {x : J x >= 0}:
    PCGrad sums the projections, UPGrad (Quinton and Rey 2024) averages them."""
    assert_close(PCGrad(seed=0)(J), 2 * UPGrad()(J), atol=1e-9 * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, max_dim=10, min_log_scale=-6, max_log_scale=6),
       seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_expected_structure(J: torch.Tensor, seed: int, K: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        assert_expected_structure(PCGrad(seed=seed), J.to(dtype))
    assert_expected_structure(PCGrad(seed=0), K)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: PCGrad(seed=0), DEGENERATE_MATRICES)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=5, max_dim=8, min_log_scale=-3, max_log_scale=3),
       log_s=st.floats(-6, 6), seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_positively_homogeneous(J: torch.Tensor, log_s: float, seed: int, K: torch.Tensor) -> None:
    """d(s J) = s d(J) for s > 0, with the same draws."""
    assert_positively_homogeneous(lambda: PCGrad(seed=seed), J, 10.0**log_s, rtol=1e-8,
                                  atol=1e-8 * float(J.norm(dim=1).sum()), norm=True)
    assert_positively_homogeneous(lambda: PCGrad(seed=0), K, POSITIVE_SCALES,
                                  atol=1e-9 * scale_of(K))


@settings(max_examples=20, deadline=None)
@given(J=controlled_matrices(max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float], seed: int) -> None:
    """PCGrad(diag(c) J) = sum_i c_i g_i^PC(J): the signs of g_i^PC . g_j and the projections
    onto the normal planes do not change when rows are scaled by c > 0."""
    T = J.shape[0]
    assert_linear_under_scaling(lambda: PCGrad(seed=seed), J, torch.tensor(c1[:T], dtype=J.dtype),
                                torch.tensor(c2[:T], dtype=J.dtype), atol=1e-9 * 20 * scale_of(J))


@settings(max_examples=20, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       seed=st.integers(0, 2**31 - 1), perm_seed=st.integers(0, 2**31 - 1))
def test_permutation_invariant_two_tasks(J: torch.Tensor, seed: int, perm_seed: int) -> None:
    """For two tasks the visiting order plays no role: swapping them swaps the weights."""
    J = J[:2]
    perm = torch.randperm(2, generator=torch.Generator().manual_seed(perm_seed))
    rtol = 1e-9
    a, b = assert_permutation_invariant(lambda: PCGrad(seed=seed), J, perm, rtol=rtol,
                                        atol=rtol * float(J.norm(dim=1).sum()), norm=True)
    wa, wb = a.weights[perm], b.weights
    assert_close(wa, wb, rtol=1e-6, atol=1e-9 * float(wa.abs().max() + 1))


@settings(max_examples=25, deadline=None)
@given(common_direction_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor) -> None:
    """The rows share a descent direction (0 is not in their hull): d != 0."""
    assert_nonzero_direction(PCGrad(seed=0), J)
