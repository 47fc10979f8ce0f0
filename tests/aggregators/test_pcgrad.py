"""PCGrad (Yu et al. 2020, Algorithm 1) against a literal float64 implementation on the rows of J
and against TorchJD 0.18; the two-task non-conflict property."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators.pcgrad import PCGrad, pcgrad_weights

from ..strategies import jacobians
from ._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_non_zero,
    matrices,
    non_strongly_stationary_matrices,
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
    norms = J.norm(dim=1)
    assert bool((J @ d >= -1e-9 * norms * norms.sum()).all()), J @ d
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


# Shared properties (tests/aggregators/_properties.py) of PCGrad (seeded).
PROPERTY = settings(max_examples=25, deadline=None)


def _pcgrad():
    return PCGrad(seed=0)


@PROPERTY
@given(matrices())
def test_property_expected_structure(J: torch.Tensor) -> None:
    assert_expected_structure(_pcgrad, J)


@PROPERTY
@given(matrices())
def test_property_linear_under_scaling(J: torch.Tensor) -> None:
    assert_linear_under_scaling(_pcgrad, J)


@PROPERTY
@given(non_strongly_stationary_matrices())
def test_property_non_zero_off_stationary(J: torch.Tensor) -> None:
    assert_non_zero(_pcgrad, J)
