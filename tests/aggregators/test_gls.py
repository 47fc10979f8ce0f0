"""GLS (Chennupati et al., *MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
Strategy for Multi-Task Learning*, CVPRW 2019): the weights are the gradient of the geometric
mean ``(prod_t L_t)^{1/T}``, checked against torch.autograd of LibMTL's form of the loss
(``pow(prod(L), 1/T)``) and finite differences in float64; then its properties: invariance
to the scale of the losses, permutation invariance, expected structure, linearity under
scaling of J, a non-zero direction off strong stationarity (positive weights); validation and
the loss-only route."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.gls import GLS

from .._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_loss_scale_free,
    assert_nonzero_direction,
    assert_permutation_invariant,
    scale_of,
)
from ..strategies import controlled_matrices, jacobians, non_strongly_stationary_matrices
from ._loss_weighting import (
    autograd_gradient,
    finite_difference_gradient,
    max_loss_route_difference,
)

LOSSES = st.lists(st.floats(-3, 3), min_size=8, max_size=8)  # log10 of the losses


def _losses(logs: list[float], T: int) -> torch.Tensor:
    return 10.0 ** torch.tensor(logs[:T], dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 8), logs=LOSSES)
def test_weights_are_the_gradient_of_the_geometric_mean(T: int, logs: list[float]) -> None:
    L = _losses(logs, T)
    agg = GLS()
    agg(torch.eye(T, dtype=torch.float64), L)
    # LibMTL's GLS: loss = torch.pow(losses.prod(), 1 / T), then backward.
    ref = autograd_gradient(lambda x: torch.pow(x.prod(), 1.0 / T), L)
    torch.testing.assert_close(agg.weights, ref, rtol=1e-12, atol=0)
    fd = finite_difference_gradient(lambda x: torch.pow(x.prod(), 1.0 / T), L)
    torch.testing.assert_close(agg.weights, fd, rtol=1e-6, atol=0)
    geo = float(torch.exp(L.log().mean()))
    assert abs(float(agg.diagnostics["objective"]) - geo) <= 1e-12 * geo


def test_hand_example_and_float32() -> None:
    L = torch.tensor([4.0, 1.0, 2.0])
    agg = GLS()
    d = agg(torch.eye(3), L)
    F = 2.0  # (4 * 1 * 2)^(1/3)
    torch.testing.assert_close(d, F / (3 * L), rtol=1e-6, atol=0)
    assert d.dtype == torch.float32
    # Many tiny losses: the product underflows in float32, exp(mean(log L)) does not.
    tiny = torch.full((40,), 1e-3)
    w = GLS()(torch.eye(40), tiny)
    torch.testing.assert_close(w, torch.full((40,), 1 / 40), rtol=1e-5, atol=0)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), logs=LOSSES,
       factor=st.floats(1e-4, 1e4), rnd=st.randoms(use_true_random=False))
def test_loss_scale_free_and_permutation_invariant(J: torch.Tensor, logs: list[float],
                                                   factor: float, rnd) -> None:
    T = J.shape[0]
    L = _losses(logs, T)
    assert_loss_scale_free(GLS, [(J, L), (J, L.flip(0))], factor, rtol=1e-12)
    perm = list(range(T))
    rnd.shuffle(perm)
    assert_permutation_invariant(GLS, [(J, L)], perm, rtol=1e-12,
                                 atol=1e-12 * T * scale_of(J), weights=lambda a: a.weights,
                                 weights_rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(max_tasks=6, min_log_scale=-6, max_log_scale=6), K=controlled_matrices(),
       logs=LOSSES)
def test_expected_structure(J: torch.Tensor, K: torch.Tensor, logs: list[float]) -> None:
    for M in (J, K):
        assert_expected_structure(GLS(), M, _losses(logs, M.shape[0]).to(M.dtype))


@settings(max_examples=20, deadline=None)
@given(J=controlled_matrices(max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6), logs=LOSSES)
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float],
                              logs: list[float]) -> None:
    """The weights read the losses only: with the same losses the direction is linear in the
    row scaling of J."""
    T = J.shape[0]
    L = _losses(logs, T).to(J.dtype)
    c1_, c2_ = torch.tensor(c1[:T], dtype=J.dtype), torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(GLS, [(J, L)], c1_, c2_,
                                atol=1e-12 * 20 * T * scale_of(J) * float(L.max() / L.min()))


@settings(max_examples=20, deadline=None)
@given(non_strongly_stationary_matrices(), LOSSES)
def test_nonzero_off_strong_stationarity(J: torch.Tensor, logs: list[float]) -> None:
    assert_nonzero_direction(GLS(), J, _losses(logs, J.shape[0]).to(J.dtype))


def test_validation_and_registry() -> None:
    J = torch.eye(3)
    with pytest.raises(ValueError, match="needs the loss values"):
        GLS()(J)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"task 1 has loss {bad}.*positive losses.*None"):
            GLS()(J, torch.tensor([1.0, bad, 2.0]))
    with pytest.raises(ValueError, match="task 2 has loss 0.0"):
        GLS().aggregate(J[:2], torch.tensor([1.0, 0.0]), present=[True, False, True])
    unchecked = GLS(validate=False)(J, torch.tensor([1.0, 0.0, 2.0]))  # arithmetic: inf/NaN
    assert not bool(torch.isfinite(unchecked).all())
    agg = get("gls")
    assert isinstance(agg, GLS) and agg.reads == "losses" and not GLS.stateful
    with pytest.raises(ValueError, match="tension"):
        get("gls+tension")
    assert repr(agg) == "GLS(validate=True)"


def test_loss_only_route_equals_the_jacobian_route() -> None:
    assert max_loss_route_difference(GLS) < 1e-10
