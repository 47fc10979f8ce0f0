"""PBI (Zhang and Li, *MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition*,
IEEE TEC 2007): the weights are the gradient of ``d1 + theta d2`` in the losses, checked against
torch.autograd of the scalarisation written out here (MOEA/D's form, with ``|d1|``, on losses
above the ideal point) and against finite differences in float64; the subgradient on the ray;
then its properties: invariance to the scale of the losses, permutation invariance (with the
preference permuted), expected structure, linearity under scaling of J; validation and the
loss-only route."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.pbi import PBI

from .._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_loss_scale_free,
    assert_permutation_invariant,
    scale_of,
)
from ..strategies import controlled_matrices, jacobians
from ._loss_weighting import (
    autograd_gradient,
    finite_difference_gradient,
    max_loss_route_difference,
)

VALUES = st.lists(st.floats(0.01, 10.0), min_size=8, max_size=8)


def moead_pbi(L: torch.Tensor, r: torch.Tensor, z: torch.Tensor, theta: float) -> torch.Tensor:
    """MOEA/D's g^pbi: d1 = |(L - z)^T r| / ||r||, d2 = ||L - (z + d1 r / ||r||)||."""
    d1 = torch.abs((L - z) @ r) / torch.linalg.vector_norm(r)
    d2 = torch.linalg.vector_norm(L - (z + d1 * r / torch.linalg.vector_norm(r)))
    return d1 + theta * d2


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 8), L=VALUES, r=VALUES, z=st.lists(st.floats(0, 0.009), min_size=8,
                                                         max_size=8),
       theta=st.floats(0, 20))
def test_weights_are_the_gradient_of_pbi(T: int, L: list[float], r: list[float], z: list[float],
                                         theta: float) -> None:
    Lt, rt, zt = (torch.tensor(v[:T], dtype=torch.float64) for v in (L, r, z))
    agg = PBI(preference=rt, theta=theta, ideal=zt)
    agg(torch.eye(T, dtype=torch.float64), Lt)
    F = lambda x: moead_pbi(x, rt, zt, theta)
    ref = autograd_gradient(F, Lt)
    if T == 1 or float(agg.diagnostics["d2"]) < 1e-6 * float((Lt - zt).norm()):
        return  # on (or at rounding distance of) the ray: see test_on_the_ray
    torch.testing.assert_close(agg.weights, ref, rtol=1e-9, atol=1e-9 * (1 + theta))
    torch.testing.assert_close(agg.weights, finite_difference_gradient(F, Lt), rtol=1e-5,
                               atol=1e-6 * (1 + theta))
    torch.testing.assert_close(agg.diagnostics["objective"], F(Lt), rtol=1e-12, atol=1e-12)


def test_on_the_ray_the_penalty_takes_the_zero_subgradient() -> None:
    r = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for T, L in ((3, 0.7 * r), (1, torch.tensor([2.0], dtype=torch.float64))):
        agg = PBI(preference=r[:T], theta=5.0)
        w = agg(torch.eye(T, dtype=torch.float64), L)
        torch.testing.assert_close(w, r[:T] / r[:T].norm(), rtol=1e-15, atol=0)
        assert float(agg.diagnostics["d2"]) <= 1e-15
    # Float32 rounding off the ray counts as on it.
    w = PBI()(torch.eye(2), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(w, torch.full((2,), 2**-0.5), rtol=1e-6, atol=0)


def test_hand_example() -> None:
    """r = (1, 1), L = (2, 1): d1 = 3 / sqrt 2, the offset (1/2, -1/2), d2 = 1 / sqrt 2."""
    agg = PBI(theta=5.0)
    w = agg(torch.eye(2, dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64))
    s = 2**-0.5
    torch.testing.assert_close(w, torch.tensor([s + 5 * s, s - 5 * s], dtype=torch.float64))
    torch.testing.assert_close(agg.diagnostics["objective"],
                               torch.tensor(3 * s + 5 * s, dtype=torch.float64))
    assert abs(float(w.sum()) - 2**0.5) < 1e-12  # sqrt(T) for the default ray


@settings(max_examples=25, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), L=VALUES, r=VALUES,
       factor=st.floats(1e-4, 1e4), rnd=st.randoms(use_true_random=False))
def test_loss_scale_free_and_permutation_invariant(J: torch.Tensor, L: list[float],
                                                   r: list[float], factor: float, rnd) -> None:
    T = J.shape[0]
    Lt, rt = (torch.tensor(v[:T], dtype=J.dtype) for v in (L, r))
    assert_loss_scale_free(lambda: PBI(preference=rt), [(J, Lt)], factor, rtol=1e-9, atol=1e-9)
    perm = list(range(T))
    rnd.shuffle(perm)
    assert_permutation_invariant(lambda: PBI(preference=rt), [(J, Lt)], perm,
                                 permuted=lambda: PBI(preference=rt[perm]), rtol=1e-9,
                                 atol=1e-9 * T * scale_of(J) * 6, weights=lambda a: a.weights,
                                 weights_rtol=1e-9, weights_atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), K=controlled_matrices(),
       L=VALUES)
def test_expected_structure(J: torch.Tensor, K: torch.Tensor, L: list[float]) -> None:
    for M in (J, K):
        assert_expected_structure(PBI(), M, torch.tensor(L[:M.shape[0]], dtype=M.dtype))


@settings(max_examples=20, deadline=None)
@given(J=controlled_matrices(max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6), L=VALUES)
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float],
                              L: list[float]) -> None:
    T = J.shape[0]
    Lt = torch.tensor(L[:T], dtype=J.dtype)
    c1_, c2_ = torch.tensor(c1[:T], dtype=J.dtype), torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(PBI, [(J, Lt)], c1_, c2_, atol=1e-12 * 20 * 6 * T * scale_of(J))


def test_validation_and_registry() -> None:
    with pytest.raises(ValueError, match="theta must be a non-negative"):
        PBI(theta=-1.0)
    with pytest.raises(ValueError, match="preference must be positive"):
        PBI(preference=[1.0, 0.0])
    with pytest.raises(ValueError, match="ideal must be finite"):
        PBI(ideal=[0.0, float("nan")])
    with pytest.raises(ValueError, match="preference has 2 entries but the call has 3"):
        PBI(preference=[1.0, 2.0])(torch.eye(3), torch.ones(3))
    with pytest.raises(ValueError, match="needs the loss values"):
        PBI()(torch.eye(2))
    agg = get("pbi", theta=2.0)
    assert isinstance(agg, PBI) and agg.reads == "losses" and agg.theta == 2.0
    assert repr(PBI(preference=[1.0, 2.0])) == "PBI(preference=[1.0, 2.0], theta=5.0, ideal=None)"
    with pytest.raises(ValueError, match="tension"):
        get("pbi+tension")
    # Per-task settings are restricted to the present tasks.
    out = PBI(preference=[1.0, 5.0, 2.0]).aggregate(torch.eye(2), torch.tensor([1.0, 2.0]),
                                                    present=[True, False, True])
    ref = PBI(preference=[1.0, 2.0])(torch.eye(2), torch.tensor([1.0, 2.0]))
    assert torch.equal(out.weights[[0, 2]], ref) and float(out.weights[1]) == 0.0


def test_loss_only_route_equals_the_jacobian_route() -> None:
    assert max_loss_route_difference(PBI) < 1e-10
