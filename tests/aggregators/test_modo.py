"""MoDo (Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning:
Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023): the lambda update recomputed
by hand in float64 numpy over several steps, and TorchJD 0.18's ``MoDoWeighting`` on the same
Gramians (symmetric ``J J^T`` and the paper's two-batch ``J_1 J_2^T``); then its properties:
expected structure on hard inputs over several calls, weights on the simplex, permutation
invariance over steps, convergence to MGDA's weights for a fixed ``J`` (``rho = 0``); state and
validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators._solvers import min_norm_weights
from torch_mtlgrad.aggregators.modo import MoDo

from .._properties import (
    assert_expected_structure,
    assert_permutation_invariant,
    assert_state_dict_roundtrip,
)
from ..strategies import gaussian_matrices, jacobians
from .test_moco import simplex_projection_bisection


def modo_reference(Gs: list[np.ndarray], gamma: float, rho: float) -> list[np.ndarray]:
    """The paper's update written out: lambda <- Pi(lambda - gamma (G lambda + rho lambda))."""
    T = Gs[0].shape[0]
    lam = np.full(T, 1.0 / T)
    out = []
    for G in Gs:
        lam = simplex_projection_bisection(lam - gamma * (G @ lam + rho * lam))
        out.append(lam.copy())
    return out


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31 - 1), st.floats(0.001, 2.0),
       st.floats(0.0, 1.0))
def test_matches_hand_computed_update(T: int, D: int, seed: int, gamma: float, rho: float) -> None:
    rng = np.random.default_rng(seed)
    Js = [rng.standard_normal((T, D)) for _ in range(6)]
    Js[2][0] = 0.0  # a zero row on the way
    agg = MoDo(gamma=gamma, rho=rho)
    expected = modo_reference([J @ J.T for J in Js], gamma, rho)
    for J, lam in zip(Js, expected):
        out = agg.aggregate(torch.tensor(J))
        np.testing.assert_allclose(out.weights.numpy(), lam, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out.direction.numpy(), lam @ J, rtol=1e-9,
                                   atol=1e-12 * max(1.0, np.abs(J).max()))


@settings(max_examples=12, deadline=None)
@given(st.integers(2, 6), st.integers(1, 8), st.integers(0, 2**31 - 1),
       st.sampled_from([(0.1, 0.1), (1e-3, 0.1), (0.5, 0.0)]), st.booleans())
def test_matches_torchjd(T: int, D: int, seed: int, params: tuple[float, float],
                         two_batches: bool) -> None:
    """Ours on ``J`` (or ``aggregate_gramian`` on ``J_1 J_2^T``) equals TorchJD's
    ``MoDoWeighting`` on the same ``G``, step after step, with the same defaults."""
    tj = pytest.importorskip("torchjd.aggregation")
    gamma, rho = params
    rng = np.random.default_rng(seed)
    ours = MoDo(gamma=gamma, rho=rho) if params != (0.1, 0.1) else get("modo")
    theirs = tj.MoDoWeighting(gamma=gamma, rho=rho)
    for _ in range(8):
        J1 = torch.tensor(rng.standard_normal((T, D)))
        G = J1 @ torch.tensor(rng.standard_normal((T, D))).T if two_batches else J1 @ J1.T
        w = (ours.aggregate_gramian(G) if two_batches else ours.aggregate(J1)).weights
        torch.testing.assert_close(w, theirs(G), rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(jacobians(min_tasks=1, max_tasks=6, max_dim=8, min_log_scale=-6, max_log_scale=6))
def test_expected_structure_and_simplex_weights(J: torch.Tensor) -> None:
    agg = MoDo()
    for k in range(3):
        out = assert_expected_structure(agg, J * (1 + k))
        w = out.weights
        assert bool((w >= 0).all()) and abs(float(w.sum()) - 1.0) < 1e-12, w


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 6))
def test_permutation_invariant_over_steps(seed: int, T: int) -> None:
    rng = np.random.default_rng(seed)
    steps = [torch.tensor(rng.standard_normal((T, 5))) for _ in range(4)]
    assert_permutation_invariant(MoDo(gamma=0.3), steps, perms=2, rtol=1e-10, atol=1e-12,
                                 weights=lambda a: a.weights, weights_rtol=1e-10,
                                 weights_atol=1e-12, seed=seed)


@settings(max_examples=5, deadline=None)
@given(gaussian_matrices(min_tasks=2, max_tasks=4, min_dim=2, max_dim=8, min_log_scale=0,
                         max_log_scale=0))
def test_converges_to_mgda_weights_for_a_fixed_jacobian(J: torch.Tensor) -> None:
    """With ``rho = 0`` and a step below ``1 / ||G||``, repeated calls on one ``J`` (here its
    ``G``) are projected gradient descent on MGDA's problem: ``||lambda^T J||^2`` reaches the
    min-norm value."""
    G = J @ J.T
    agg = MoDo(gamma=0.9 / float(torch.linalg.matrix_norm(G, ord=2)), rho=0.0)
    for _ in range(2000):
        agg.aggregate_gramian(G, check_finite=False)
    w_star = min_norm_weights(G)
    best, got = float(w_star @ G @ w_star), float(agg.weights @ G @ agg.weights)
    assert got <= best + 1e-6 * float(G.diagonal().max()), (got, best)


def test_state_resume_and_reset() -> None:
    assert_state_dict_roundtrip(MoDo, seed=0, steps=8, split=3)
    agg = MoDo(gamma=0.3)
    rng = np.random.default_rng(1)
    Js = [torch.tensor(rng.standard_normal((3, 4))) for _ in range(4)]
    first = [agg(J) for J in Js]
    state = copy.deepcopy(agg.state_dict())
    assert set(state) == {"lambda"} and abs(float(state["lambda"].sum()) - 1) < 1e-12
    agg.reset()
    assert all(torch.equal(a, agg(J)) for a, J in zip(first, Js))
    assert MoDo.stateful and MoDo.gramian_only and not MoDo.random and not MoDo.needs_losses
    assert get("modo").reads == "gramian"


def test_validation() -> None:
    for bad in (0.0, -1.0, True, "0.1"):
        with pytest.raises(ValueError, match="gamma must be a positive number"):
            MoDo(gamma=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rho must be a non-negative number"):
        MoDo(rho=-0.1)
    agg = MoDo()
    agg(torch.eye(3))
    before = agg.state_dict()["lambda"].clone()
    with pytest.raises(ValueError, match="holds weights for 3 tasks, got 2"):
        agg(torch.eye(2))
    assert torch.equal(agg.state_dict()["lambda"], before)
    with pytest.raises(ValueError, match="unknown keys"):
        agg.load_state_dict({"lam": None})
    with pytest.raises(ValueError, match=r"'lambda' must be a \[T\] tensor"):
        agg.load_state_dict({"lambda": torch.ones(2, 2)})
    assert repr(get("modo", gamma=0.5)) == "MoDo(gamma=0.5, rho=0.1)"
