"""MoCo (Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably
Convergent Approach", ICLR 2023, Algorithm 1) recomputed by hand in float64 numpy over several
steps; then its properties: expected structure on hard inputs over several calls, permutation
invariance over steps (lambda permuted with the tasks), a non-zero direction when the tasks share
a descent direction (lambda is on the simplex), convergence to MGDA's weights for a fixed J;
state and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.moco import MoCo

from .._properties import (
    assert_expected_structure,
    assert_nonzero_direction,
    assert_permutation_invariant,
    scale_of,
)
from ..strategies import (
    common_direction_matrices,
    gaussian_matrices,
    jacobians,
)


def simplex_projection_bisection(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex: max(v - theta, 0) with sum 1, theta by bisection
    (a different algorithm from the library's sort-based one)."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0)


def moco_reference(Js: list[np.ndarray], losses: list[np.ndarray] | None, beta: float,
                   beta_sigma: float, gamma: float, gamma_sigma: float, rho: float,
                   bound: float | None) -> list[np.ndarray]:
    T, D = Js[0].shape
    y = np.zeros((T, D))
    lam = np.full(T, 1.0 / T)
    out = []
    for k, J in enumerate(Js, start=1):
        h = J.copy()
        if losses is not None:
            n = np.linalg.norm(J, axis=1)
            safe = np.where(n > 0, n, 1)[:, None]
            h = np.where(n[:, None] > 0, J / safe * losses[k - 1][:, None], 0.0)
        y = y - beta / k**beta_sigma * (y - h)
        if bound is not None:
            ny = np.linalg.norm(y, axis=1)
            y = y * np.where(ny > bound, bound / np.where(ny > 0, ny, 1), 1.0)[:, None]
        A = y @ y.T + rho * np.eye(T)
        lam = simplex_projection_bisection(lam - gamma / k**gamma_sigma * A @ lam)
        out.append(lam @ y)
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31 - 1),
       st.floats(0.05, 1.0), st.floats(0.0, 1.0), st.floats(0.01, 1.0), st.floats(0.0, 1.0),
       st.floats(0.0, 1.0), st.booleans(), st.sampled_from([None, 0.5, 3.0]))
def test_matches_hand_computed_algorithm(T: int, D: int, seed: int, beta: float,
                                         beta_sigma: float, gamma: float, gamma_sigma: float,
                                         rho: float, with_loss: bool, bound: float | None) -> None:
    rng = np.random.default_rng(seed)
    Js = [rng.standard_normal((T, D)) for _ in range(6)]
    Js[2][0] = 0.0  # a zero row on the way
    losses = [rng.uniform(0.1, 3.0, size=T) for _ in range(6)] if with_loss else None
    agg = MoCo(beta=beta, beta_sigma=beta_sigma, gamma=gamma, gamma_sigma=gamma_sigma, rho=rho,
               normalize="loss" if with_loss else "none", bound=bound)
    ref = moco_reference(Js, losses, beta, beta_sigma, gamma, gamma_sigma, rho, bound)
    for k, J in enumerate(Js):
        L = torch.tensor(losses[k]) if losses is not None else None
        d = agg(torch.tensor(J), L)
        assert np.abs(d.numpy() - ref[k]).max() <= 1e-10 * (1 + np.abs(ref[k]).max())
        lam = agg.diagnostics["lambda"]
        assert bool((lam >= 0).all()) and abs(float(lam.sum()) - 1) < 1e-12


@settings(max_examples=60, deadline=None)
@given(J=jacobians(max_tasks=8, min_log_scale=-3, max_log_scale=3),
       rnd=st.randoms(use_true_random=False), K=gaussian_matrices())
def test_permutation_equivariant_over_steps(J: torch.Tensor, rnd, K: torch.Tensor) -> None:
    perm = list(range(J.shape[0]))
    rnd.shuffle(perm)
    s = scale_of(J)
    # The lambda step is gamma_k (Y Y^T) lambda: its rounding grows with s^2 (Algorithm 1 is not
    # scale-invariant; normalize="loss" is the scale-free variant).
    tol = 1e-12 * (1 + s * s)
    steps = [J * (1 + 0.1 * step) for step in range(4)]
    assert_permutation_invariant(MoCo, steps, perm, atol=tol * s,
                                 weights=lambda agg: agg.diagnostics["lambda"], weights_atol=tol)
    assert_permutation_invariant(MoCo, K, 3, atol=1e-9 * scale_of(K))  # first call, Gaussian


@settings(max_examples=60, deadline=None)
@given(J=jacobians(max_tasks=8, min_log_scale=-6, max_log_scale=6), normalize=st.booleans(),
       K=gaussian_matrices())
def test_finite_on_hard_inputs(J: torch.Tensor, normalize: bool, K: torch.Tensor) -> None:
    """The expected structure on hard inputs over three calls, lambda on the simplex; and on a
    Gaussian matrix."""
    agg = MoCo(normalize="loss" if normalize else "none")
    L = torch.linspace(0.5, 2.0, J.shape[0], dtype=J.dtype)
    for _ in range(3):
        assert_expected_structure(agg, J, L)
        lam = agg.diagnostics["lambda"]
        assert bool(torch.isfinite(lam).all())
        assert bool((lam >= 0).all()) and abs(float(lam.sum()) - 1) < 1e-9
    assert_expected_structure(MoCo, K)


@settings(max_examples=25, deadline=None)
@given(common_direction_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor) -> None:
    """d = lambda^T y with lambda on the simplex and, on the first call, y = beta J: d != 0 when
    0 is not in the rows' hull."""
    assert_nonzero_direction(MoCo, J)


def test_tracking_and_convergence_to_min_norm() -> None:
    """With a fixed J, y -> J and lambda approaches MGDA's weights (the paper's point)."""
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    agg = MoCo(beta_sigma=0.0, gamma=0.5, gamma_sigma=0.0)
    for _ in range(400):
        d = agg(J)
    assert torch.allclose(agg.y, J, atol=1e-12)
    assert torch.allclose(agg.diagnostics["lambda"], torch.tensor([0.8, 0.2], dtype=torch.float64),
                          atol=1e-6)
    assert torch.allclose(d, torch.tensor([0.8, 0.4], dtype=torch.float64), atol=1e-6)


def test_zero_rows_and_float32() -> None:
    agg = MoCo()
    d = agg(torch.zeros(3, 4))
    assert torch.equal(d, torch.zeros(4))
    agg = MoCo(normalize="loss")
    d = agg(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([1.0, 2.0]))
    assert d.dtype == torch.float32 and bool(torch.isfinite(d).all())


def test_state_dict_roundtrip_gives_identical_next_output() -> None:
    rng = np.random.default_rng(3)
    Js = [torch.tensor(rng.standard_normal((3, 5))) for _ in range(6)]
    a = MoCo(rho=0.1)
    for J in Js[:3]:
        a(J)
    b = MoCo(rho=0.1)
    b.load_state_dict(a.state_dict())
    for J in Js[3:]:
        assert torch.equal(a(J), b(J))
    a.reset()
    assert a.y is None and a.k == 0


def test_validation() -> None:
    with pytest.raises(ValueError, match="beta"):
        MoCo(beta=0.0)
    with pytest.raises(ValueError, match="normalize"):
        MoCo(normalize="l2")  # type: ignore[arg-type]
    agg = MoCo(normalize="loss")
    with pytest.raises(ValueError, match="needs the loss values"):
        agg(torch.ones(2, 3))
    agg = MoCo()
    agg(torch.ones(2, 3))
    with pytest.raises(ValueError, match="reset"):
        agg(torch.ones(3, 3))
    with pytest.raises(ValueError, match="unknown keys"):
        agg.load_state_dict({"nope": 1})
    assert isinstance(get("moco", gamma=0.2), MoCo)


def test_defaults_constant_tracking_step_and_old_schedule_reachable() -> None:
    """Default beta_k = 0.9 at every step (constant: the paper's two-time-scale analysis keeps
    the tracking step large against a constant model step); the former (LibMTL) schedule
    beta_k = 0.5 / sqrt(k) is MoCo(beta=0.5, beta_sigma=0.5)."""
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    new, old = MoCo(), MoCo(beta=0.5, beta_sigma=0.5)
    for k in range(1, 6):
        new(J)
        old(J)
        assert float(new.diagnostics["beta_k"]) == pytest.approx(0.9)
        assert float(old.diagnostics["beta_k"]) == pytest.approx(0.5 / k**0.5)
        assert float(new.diagnostics["gamma_k"]) == pytest.approx(0.1 / k**0.5)
    # with a constant step y converges to a fixed J geometrically: 1 - 0.1**5
    assert torch.allclose(new.y, (1 - 0.1**5) * J)
    assert new.normalize == "none"
