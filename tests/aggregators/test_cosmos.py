"""COSMOS (Ruchte and Grabocka, *Scalable Pareto Front Approximation for Deep Multi-Objective
Learning*, ICDM 2021): the weights are the gradient of r . L - lambda cos(r, L) at the drawn
preference, checked against torch.autograd of the authors' form of the loss (the linear term
minus lamda times torch's cosine_similarity) and finite differences in float64; the draws are
Dirichlet(alpha) (moments over many draws, the seed, the generator); the preference drawn
beforehand for the network is the one the call uses (restricted and renormalised for absent
tasks); then its properties: expected structure, linearity under scaling of J, without the
penalty the weights are r itself (a convex combination, non-zero off strong stationarity);
state, validation and the loss-only route."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.cosmos import COSMOS

from .._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_nonzero_direction,
    scale_of,
)
from ..strategies import controlled_matrices, jacobians, non_strongly_stationary_matrices
from ._loss_weighting import (
    autograd_gradient,
    finite_difference_gradient,
    max_loss_route_difference,
)

VALUES = st.lists(st.floats(0.01, 10.0), min_size=8, max_size=8)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 8), L=VALUES, lamda=st.floats(0, 10), alpha=st.floats(0.2, 5),
       seed=st.integers(0, 2**31 - 1))
def test_weights_are_the_gradient_of_the_cosmos_loss(T: int, L: list[float], lamda: float,
                                                     alpha: float, seed: int) -> None:
    Lt = torch.tensor(L[:T], dtype=torch.float64)
    agg = COSMOS(alpha=alpha, lamda=lamda, seed=seed)
    agg(torch.eye(T, dtype=torch.float64), Lt)
    r = agg.diagnostics["preference"]
    assert agg.preference is r and abs(float(r.sum()) - 1) < 1e-12 and bool((r >= 0).all())

    def authors(x: torch.Tensor) -> torch.Tensor:
        return (r * x).sum() - lamda * torch.nn.functional.cosine_similarity(x, r, dim=0)

    torch.testing.assert_close(agg.weights, autograd_gradient(authors, Lt), rtol=1e-9,
                               atol=1e-12 * (1 + lamda))
    torch.testing.assert_close(agg.weights, finite_difference_gradient(authors, Lt), rtol=1e-5,
                               atol=1e-6 * (1 + lamda))
    cos = torch.nn.functional.cosine_similarity(Lt, r, dim=0)
    torch.testing.assert_close(agg.diagnostics["cosine"], cos, rtol=1e-12, atol=1e-12)


def _draws(agg: COSMOS, n: int) -> torch.Tensor:
    """The preferences of ``n`` calls on three tasks."""
    J, L = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    out = []
    for _ in range(n):
        agg(J, L)
        assert agg.preference is not None
        out.append(agg.preference)
    return torch.stack(out)


def test_draws_are_dirichlet() -> None:
    """Mean alpha_t / A and variance alpha_t (A - alpha_t) / (A^2 (A + 1)), A = sum alpha."""
    alpha = torch.tensor([0.5, 1.2, 3.0], dtype=torch.float64)
    agg = COSMOS(alpha=alpha, seed=0)
    r = _draws(agg, 4000)
    A = float(alpha.sum())
    mean = alpha / A
    var = alpha * (A - alpha) / (A**2 * (A + 1))
    torch.testing.assert_close(r.mean(0), mean, rtol=0, atol=0.01)
    torch.testing.assert_close(r.var(0), var, rtol=0.1, atol=0)
    # The authors' default alpha = 1.2 for every task: symmetric, mean 1 / T.
    agg = COSMOS(seed=1)
    r = _draws(agg, 2000)
    torch.testing.assert_close(r.mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0,
                               atol=0.015)


def test_seed_generator_and_resume() -> None:
    J, L = torch.eye(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    a, b, c = COSMOS(seed=7), COSMOS(seed=7), COSMOS(seed=8)
    outs = [(a(J, L), b(J, L), c(J, L)) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y, _ in outs)
    assert not all(torch.equal(x, z) for x, _, z in outs)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(COSMOS(generator=g1)(J, L), COSMOS(generator=g2)(J, L))
    torch.manual_seed(11)
    p = COSMOS()
    torch.manual_seed(11)
    assert torch.equal(p(J, L), COSMOS()(J, L))
    with pytest.raises(ValueError, match="either generator or seed"):
        COSMOS(generator=torch.Generator(), seed=1)
    # Resume with a pending preference: the same next steps, bit for bit.
    a.next_preference(3)
    state = copy.deepcopy(a.state_dict())
    expected = [a(J, L) for _ in range(3)]
    fresh = COSMOS(seed=99)
    fresh.load_state_dict(state)
    assert all(torch.equal(x, fresh(J, L)) for x in expected)
    a.reset()
    again = COSMOS(seed=7)
    assert torch.equal(a(J, L), again(J, L))


def test_the_preference_drawn_for_the_network_is_the_one_used() -> None:
    J, L = torch.eye(4, dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    agg = COSMOS(seed=0)
    r = agg.next_preference(4)
    assert torch.equal(agg.next_preference(4), r)  # drawn once per step
    agg(J, L)
    assert torch.equal(agg.preference, r)
    r2 = agg.next_preference(4)
    assert not torch.equal(r2, r)
    # Absent tasks: the pending preference restricted to the present ones, renormalised.
    mask = [True, False, True, True]
    out = agg.aggregate(J[mask][:, mask], L[mask], present=mask)
    part = r2[[0, 2, 3]]
    torch.testing.assert_close(agg.preference, part / part.sum(), rtol=1e-15, atol=0)
    assert float(out.weights[1]) == 0.0
    # A pending preference for another number of tasks is an error that changes nothing.
    agg.next_preference(4)
    before = copy.deepcopy(agg.state_dict())
    with pytest.raises(ValueError, match="pending preference .* has 4 entries but the call has 2"):
        agg(torch.eye(2), torch.ones(2))
    assert torch.equal(agg.state_dict()["pending"], before["pending"])
    with pytest.raises(ValueError, match="already pending"):
        agg.next_preference(3)
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        COSMOS().next_preference(0)


@settings(max_examples=20, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), K=controlled_matrices(),
       L=VALUES)
def test_expected_structure(J: torch.Tensor, K: torch.Tensor, L: list[float]) -> None:
    for M in (J, K):
        agg = COSMOS(seed=0)
        for _ in range(2):
            assert_expected_structure(agg, M, torch.tensor(L[:M.shape[0]], dtype=M.dtype))


@settings(max_examples=20, deadline=None)
@given(J=controlled_matrices(max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6), L=VALUES)
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float],
                              L: list[float]) -> None:
    """Same seed, same losses: the same draws and weights, so the direction is linear in c."""
    T = J.shape[0]
    Lt = torch.tensor(L[:T], dtype=J.dtype)
    c1_, c2_ = torch.tensor(c1[:T], dtype=J.dtype), torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(lambda: COSMOS(seed=5), [(J, Lt)] * 3, c1_, c2_,
                                atol=1e-12 * 20 * 4 * T * scale_of(J))


@settings(max_examples=20, deadline=None)
@given(non_strongly_stationary_matrices(), VALUES)
def test_without_the_penalty_the_weights_are_the_preference(J: torch.Tensor,
                                                            L: list[float]) -> None:
    agg = COSMOS(lamda=0.0, seed=2)
    d = assert_nonzero_direction(agg, J, torch.tensor(L[:J.shape[0]], dtype=J.dtype))
    assert torch.equal(agg.weights, agg.preference) and abs(float(agg.weights.sum()) - 1) < 1e-12
    assert float(d.norm()) <= float(J.norm(dim=1).max()) * (1 + 1e-12)


def test_zero_losses_validation_and_registry() -> None:
    agg = COSMOS(seed=0)
    w = agg(torch.eye(2), torch.zeros(2))  # cos(r, 0) undefined: its gradient taken as 0
    assert torch.equal(w, agg.preference) and float(agg.diagnostics["cosine"]) == 0.0
    with pytest.raises(ValueError, match="lamda must be a non-negative"):
        COSMOS(lamda=-1.0)
    with pytest.raises(ValueError, match="alpha must be positive"):
        COSMOS(alpha=0.0)
    with pytest.raises(ValueError, match="alpha has 2 entries but the call has 3"):
        COSMOS(alpha=[1.0, 2.0], seed=0)(torch.eye(3), torch.ones(3))
    with pytest.raises(ValueError, match="needs the loss values"):
        COSMOS(seed=0)(torch.eye(2))
    with pytest.raises(ValueError, match="pending"):
        COSMOS(seed=0).load_state_dict({**COSMOS(seed=0).state_dict(), "pending": 3})
    c = get("cosmos", seed=1)
    assert isinstance(c, COSMOS) and c.reads == "losses" and COSMOS.random and COSMOS.stateful
    assert repr(COSMOS(alpha=[0.5, 1.0])) == "COSMOS(alpha=[0.5, 1.0], lamda=2.0)"
    with pytest.raises(ValueError, match="tension"):
        get("cosmos+tension")


def test_loss_only_route_equals_the_jacobian_route() -> None:
    assert max_loss_route_difference(lambda: COSMOS(seed=4), sync=True) < 1e-10
