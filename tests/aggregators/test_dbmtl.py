"""DB-MTL (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing for Multi-Task
Learning", arXiv 2023): the paper's update recomputed by hand in float64 numpy over several steps,
and LibMTL's ``DB_MTL`` re-derived in float64 on a small model (its log-loss gradients taken by
autograd of ``log(L + 1e-8)``, its ``1e-8`` in the rescaling); then its properties: loss-scale
invariance (the logarithm), every tracked gradient rescaled to the largest norm, positive
homogeneity, permutation invariance over steps, expected structure on hard inputs, the scale on
equal rows; state and validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.dbmtl import DBMTL

from .._properties import (
    assert_close,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    assert_state_dict_roundtrip,
)
from ..strategies import jacobians


def dbmtl_reference(Js: list[np.ndarray], losses: list[np.ndarray], beta: float,
                    beta_sigma: float, eps: float) -> list[tuple[np.ndarray, float]]:
    """The paper's equations: m_k = beta_k m_{k-1} + (1 - beta_k) g / (L + eps), d = sum_t
    (max_s ||m_s|| / ||m_t||) m_t (a zero m_t contributes nothing); with ``T max_s ||m_s||``,
    the scale of the sum (whose terms may cancel)."""
    m = np.zeros_like(Js[0])
    out = []
    for k, (J, L) in enumerate(zip(Js, losses), start=1):
        b = beta / k**beta_sigma
        m = b * m + (1 - b) * J / (L + eps)[:, None]
        n = np.sqrt((m * m).sum(axis=1))
        d = np.zeros(J.shape[1])
        for t in range(len(n)):
            if n[t] > 0:
                d += n.max() / n[t] * m[t]
        out.append((d, len(n) * n.max()))
    return out


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31 - 1), st.floats(0.0, 0.99),
       st.floats(0.0, 1.0), st.sampled_from([0.0, 1e-8, 0.1]))
def test_matches_hand_computed_update(T: int, D: int, seed: int, beta: float,
                                      beta_sigma: float, eps: float) -> None:
    rng = np.random.default_rng(seed)
    Js = [rng.standard_normal((T, D)) * 10 ** rng.uniform(-2, 2) for _ in range(6)]
    Js[2][0] = 0.0  # a zero row on the way
    Ls = [rng.uniform(0.05, 5.0, T) for _ in range(6)]
    agg = DBMTL(beta=beta, beta_sigma=beta_sigma, eps=eps)
    for J, L, (d, scale) in zip(Js, Ls, dbmtl_reference(Js, Ls, beta, beta_sigma, eps)):
        got = agg(torch.tensor(J), torch.tensor(L)).numpy()
        np.testing.assert_allclose(got, d, rtol=1e-10, atol=1e-13 * scale)


def libmtl_dbmtl(grads_fn, steps: int, beta: float,
                 beta_sigma: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """LibMTL's ``DB_MTL.backward`` re-derived in float64: the gradients of ``log(L + 1e-8)``,
    ``buffer = grads + beta / step**beta_sigma * (buffer - grads)`` from a zero buffer,
    ``alpha = max(u) / (u + 1e-8)``, ``sum_i alpha_i buffer_i`` (with the norms ``u``)."""
    buffer, out = None, []
    for step in range(1, steps + 1):
        grads = grads_fn(step - 1)
        buffer = torch.zeros_like(grads) if buffer is None else buffer
        buffer = grads + beta / step**beta_sigma * (buffer - grads)
        u = buffer.norm(dim=-1)
        alpha = u.max() / (u + 1e-8)
        out.append((sum(alpha[i] * buffer[i] for i in range(grads.shape[0])), u))
    return out


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 5), st.integers(1, 6), st.integers(0, 2**31 - 1),
       st.sampled_from([(0.9, 0.0), (0.5, 0.5), (0.0, 0.0)]))
def test_matches_libmtl_on_a_model(T: int, D: int, seed: int, params: tuple[float, float]) -> None:
    """Losses ``L_t = (a_t . x - b_t)^2 + c_t`` of shared parameters ``x`` at a few points:
    LibMTL's direction from autograd of ``log(L_t + 1e-8)``; ours from ``J`` and ``L``.  The
    rescaling's ``1e-8`` is the only difference: term ``t`` moves by ``max_s ||m_s|| 1e-8 /
    ||m_t||`` (to first order), whatever the direction, a sum of such terms, cancels to."""
    beta, beta_sigma = params
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(T, D, generator=gen, dtype=torch.float64)
    b = torch.randn(T, generator=gen, dtype=torch.float64)
    c = torch.rand(T, generator=gen, dtype=torch.float64) * 0.5
    xs = [torch.randn(D, generator=gen, dtype=torch.float64) for _ in range(6)]

    def losses_at(x: torch.Tensor) -> torch.Tensor:
        return (A @ x - b) ** 2 + c

    def jac(f, x: torch.Tensor) -> torch.Tensor:
        return torch.autograd.functional.jacobian(f, x)

    expected = libmtl_dbmtl(lambda i: jac(lambda x: torch.log(losses_at(x) + 1e-8), xs[i]),
                            len(xs), beta, beta_sigma)
    ours = get("db-mtl", beta=beta, beta_sigma=beta_sigma) if params != (0.9, 0.0) \
        else get("dbmtl")
    for x, (d, u) in zip(xs, expected):
        got = ours(jac(losses_at, x), losses_at(x).detach())
        bound = float(u.max() * (1e-8 / u).sum())
        assert_close(got, d, atol=1.01 * bound + 1e-13 * T * float(u.max()), norm=True)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_loss_scale_invariance(T: int, seed: int) -> None:
    """Multiplying task t's loss by ``c_t`` multiplies its gradient by ``c_t`` and changes no
    direction (``log(c L) = log c + log L``; ``eps = 0``)."""
    rng = np.random.default_rng(seed)
    c = torch.tensor(10 ** rng.uniform(-3, 3, T))
    a, b = DBMTL(eps=0.0), DBMTL(eps=0.0)
    for _ in range(4):
        J = torch.tensor(rng.standard_normal((T, 5)))
        L = torch.tensor(rng.uniform(0.1, 3.0, T))
        assert_close(b(J * c[:, None], L * c), a(J, L), rtol=1e-12, atol=0, norm=True)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_every_tracked_gradient_gets_the_largest_norm(T: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    agg = DBMTL(beta=0.5)
    for _ in range(3):
        J = torch.tensor(rng.standard_normal((T, 4)))
        agg(J, torch.tensor(rng.uniform(0.1, 3.0, T)))
        parts = (agg.diagnostics["alpha"][:, None] * agg.m).norm(dim=1)
        torch.testing.assert_close(parts, agg.m.norm(dim=1).max().expand(T), rtol=1e-13,
                                   atol=0)


@settings(max_examples=20, deadline=None)
@given(jacobians(min_tasks=1, max_tasks=6, max_dim=8, min_log_scale=-6, max_log_scale=6),
       st.floats(0.01, 100.0))
def test_structure_and_homogeneity(J: torch.Tensor, c: float) -> None:
    T = J.shape[0]
    L = torch.linspace(0.2, 2.0, T, dtype=torch.float64)
    agg = DBMTL()
    for k in range(3):
        out = agg.aggregate(J * (1 + k), L)
        assert out.weights is None and out.direction.shape == (J.shape[1],)
        assert bool(torch.isfinite(out.direction).all())
    if not bool(J.any()):
        assert bool((out.direction == 0).all())
    assert_positively_homogeneous(DBMTL(), J, c, rtol=1e-12, atol=1e-300, norm=True, losses=L)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 5))
def test_permutation_invariant_over_steps(seed: int, T: int) -> None:
    rng = np.random.default_rng(seed)
    steps = [(torch.tensor(rng.standard_normal((T, 5))), torch.tensor(rng.uniform(0.1, 3, T)))
             for _ in range(4)]
    assert_permutation_invariant(DBMTL(beta=0.6), steps, perms=2, rtol=1e-11, atol=1e-12,
                                 weights=lambda a: a.diagnostics["alpha"], weights_rtol=1e-11,
                                 weights_atol=1e-12, seed=seed)


def test_equal_rows_scale() -> None:
    """``T`` equal rows ``g``: ``T (1 - beta) g / min_t L_t`` at the first call (the
    ``"unnormalised"`` convention)."""
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    L = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    d = DBMTL(eps=0.0)(g.expand(3, -1).clone(), L)
    torch.testing.assert_close(d, 3 * 0.1 * g / 0.5, rtol=1e-14, atol=0)


def test_state_resume_and_reset() -> None:
    assert_state_dict_roundtrip(DBMTL, seed=0, steps=8, split=3)
    assert_state_dict_roundtrip(lambda: DBMTL(beta=0.5, beta_sigma=0.5), seed=1, steps=8,
                                split=5)
    agg = DBMTL()
    rng = np.random.default_rng(2)
    data = [(torch.tensor(rng.standard_normal((3, 4))), torch.tensor(rng.uniform(0.1, 2, 3)))
            for _ in range(4)]
    first = [agg(J, L) for J, L in data]
    state = copy.deepcopy(agg.state_dict())
    assert set(state) == {"k", "m"} and state["k"] == 4 and state["m"].shape == (3, 4)
    agg.reset()
    assert all(torch.equal(a, agg(J, L)) for a, (J, L) in zip(first, data))
    assert DBMTL.stateful and DBMTL.needs_losses and not DBMTL.random
    assert get("dbmtl").reads == "jacobian" and not get("dbmtl").runs_on_features


def test_validation() -> None:
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
        DBMTL(beta=1.5)
    for name in ("beta_sigma", "eps"):
        with pytest.raises(ValueError, match=f"{name} must be a non-negative number"):
            DBMTL(**{name: -1.0})
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    agg = DBMTL()
    with pytest.raises(ValueError, match="needs the loss values"):
        agg(J)
    agg(J, torch.ones(3, dtype=torch.float64))
    before = copy.deepcopy(agg.state_dict())
    with pytest.raises(ValueError, match=r"task 2 has loss -0\.5: DB-MTL takes log\(L \+ eps\)"):
        agg(J, torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"task 3 has loss -0\.5"):  # named among all tasks
        DBMTL().aggregate(J[:2], torch.tensor([1.0, -0.5]), present=[True, False, False, True])
    with pytest.raises(ValueError, match=r"tracking a \[3, 2\] Jacobian, got \[2, 2\]"):
        agg(J[:2], torch.ones(2, dtype=torch.float64))
    after = agg.state_dict()
    assert after["k"] == before["k"] and torch.equal(after["m"], before["m"])
    # A zero loss is fine with the default eps, an error with eps = 0.
    assert bool(torch.isfinite(DBMTL()(J, torch.tensor([1.0, 0.0, 1.0]))).all())
    with pytest.raises(ValueError, match="task 1 has loss 0.0"):
        DBMTL(eps=0.0)(J, torch.tensor([1.0, 0.0, 1.0]))
    DBMTL(validate=False)(J, torch.tensor([1.0, -2.0, 1.0]))  # unchecked: no error
    with pytest.raises(ValueError, match="unknown keys"):
        agg.load_state_dict({"y": None})
    with pytest.raises(ValueError, match=r"'m' must be a \[T, D\] tensor"):
        agg.load_state_dict({"k": 1, "m": torch.ones(3)})
    assert repr(get("db_mtl")) == "DBMTL(beta=0.9, beta_sigma=0.0, eps=1e-08, validate=True)"
