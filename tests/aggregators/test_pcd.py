"""PCD (Varam and AlHajri, *Not All Objectives Are Born Equal: Priority-Constrained Descent for
Hierarchical Multi-Objective Optimization*, TMLR 2026): against a float64 NumPy re-derivation
over several calls (the bias-corrected moving average of the squared norms by hand, the QP
solved by enumerating the active sets on the rows, as the authors' reference does, and the
two-task closed form), against TorchJD 0.18's PCD over sequences of calls; the paper's claims
(each secondary task gets its fraction tau of normalised progress, scale invariance of the
secondary rows, the primary's norm); the special cases (zero primary, infeasible constraints,
unchecked NaN), state and resume, absent tasks, the input checks; the shared properties:
expected structure, Gramian-only, invariance under permutations of the secondary tasks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.pcd import PCD

from .._properties import (
    assert_close,
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_permutation_invariant,
    assert_state_dict_roundtrip,
)
from ..strategies import DEGENERATE_MATRICES, gaussian_matrices


def project_by_enumeration(gt: np.ndarray, tau: np.ndarray) -> np.ndarray | None:
    """argmin_d ||d - gt_0||^2 s.t. gt_j . d >= tau_j ||gt_j||^2 (j >= 1), by trying every set
    of active constraints (equalities, multipliers >= 0, the others satisfied) and keeping the
    closest point; None when no set gives a feasible point."""
    T = gt.shape[0]
    b = tau * np.sum(gt[1:] ** 2, axis=1)
    best, best_dist = None, np.inf
    for r in range(T):
        for A in itertools.combinations(range(1, T), r):
            A = list(A)
            mu = np.zeros(T - 1)
            if A:
                GA = gt[A] @ gt[A].T
                rhs = b[[a - 1 for a in A]] - gt[A] @ gt[0]
                sol, *_ = np.linalg.lstsq(GA, rhs, rcond=1e-12)
                if np.any(sol < -1e-12) or not np.allclose(GA @ sol, rhs, atol=1e-9):
                    continue
                mu[[a - 1 for a in A]] = sol
            d = gt[0] + mu @ gt[1:]
            if np.all(gt[1:] @ d >= b - 1e-9 * (1 + np.abs(b))):
                dist = float(np.sum((d - gt[0]) ** 2))
                if dist < best_dist - 1e-12:
                    best, best_dist = d, dist
    return best


class Reference:
    """PCD's update re-derived on J in float64: EMA of ||g_i||^2 with bias correction, scales,
    the projection, the rescaling to ||g_1||."""

    def __init__(self, tau: float, beta: float, eps: float) -> None:
        self.tau, self.beta, self.eps = tau, beta, eps
        self.v: np.ndarray | None = None
        self.k = 0

    def __call__(self, J: np.ndarray) -> np.ndarray:
        T = J.shape[0]
        sq = np.sum(J**2, axis=1)
        self.v = (np.zeros(T) if self.v is None else self.v) * self.beta + (1 - self.beta) * sq
        self.k += 1
        s = 1.0 / np.sqrt(self.v / (1 - self.beta**self.k) + self.eps)
        gt = J * s[:, None]
        if sq[0] == 0:
            return np.zeros(J.shape[1])
        d = project_by_enumeration(gt, np.full(T - 1, self.tau))
        d = gt[0] if d is None else d
        if np.linalg.norm(d) <= 1e-7 * np.linalg.norm(gt[0]):  # d~ = 0 (up to rounding): 0
            return np.zeros(J.shape[1])
        return d * math.sqrt(sq[0]) / np.linalg.norm(d)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 5), D=st.integers(1, 6), tau=st.sampled_from([0.0, 0.02, 0.3, 1.0]),
       beta=st.sampled_from([0.0, 0.5, 0.999]), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_over_calls(T: int, D: int, tau: float, beta: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 3, size=(T, 1))
    agg, ref = PCD(tau=tau, beta=beta), Reference(tau, beta, 1e-8)
    for _ in range(4):
        J = rng.standard_normal((T, D)) * scale * rng.uniform(0.5, 2.0)
        d = agg(torch.tensor(J)).numpy()
        e = ref(J)
        assert np.allclose(d, e, rtol=1e-7, atol=1e-9 * np.linalg.norm(J[0])), (d, e)


def test_more_secondary_tasks_than_dimensions() -> None:
    """T - 1 > D: dependent secondary gradients (a singular G~_ss, where the plain dual's linear
    term leaves its range) and, often, infeasible constraints; against the enumeration."""
    rng = np.random.default_rng(0)
    infeasible = 0
    for _ in range(150):
        T, D = int(rng.integers(4, 7)), int(rng.integers(1, 4))
        tau = float(rng.choice([0.0, 0.02, 0.3]))
        J = rng.standard_normal((T, D)) * 10.0 ** rng.uniform(-2, 2, size=(T, 1))
        agg = PCD(tau=tau)
        d = agg(torch.tensor(J)).numpy()
        e = Reference(tau, 0.999, 1e-8)(J)
        infeasible += float(agg.diagnostics["feasible"]) == 0
        assert np.allclose(d, e, rtol=1e-8, atol=1e-10 * np.linalg.norm(J[0])), (J, tau, d, e)
    assert infeasible > 10  # both branches ran


@settings(max_examples=30, deadline=None)
@given(J=gaussian_matrices(min_tasks=2, max_tasks=2, max_dim=6, min_dim=2), tau=st.floats(0.0, 1.0))
def test_two_tasks_closed_form(J: torch.Tensor, tau: float) -> None:
    """d~ = g~_1 + max(0, tau - g~_2^T g~_1 / ||g~_2||^2) g~_2 (first call: v^_i = ||g_i||^2)."""
    agg = PCD(tau=tau, eps=0.0)
    d = agg(J)
    gt = J / J.norm(dim=1, keepdim=True)
    mu = max(0.0, tau - float(gt[1] @ gt[0]))
    dt = gt[0] + mu * gt[1]
    assert_close(d, dt * J[0].norm() / dt.norm(), rtol=1e-10, atol=1e-12 * float(J[0].norm()))
    assert abs(float(agg.diagnostics["mu"][1]) - mu) <= 1e-10 and agg.diagnostics["mu"][0] == 0


def test_against_torchjd() -> None:
    """TorchJD 0.18's PCD: the same rule, defaults and special cases; equal over sequences of
    calls at fixed T (TorchJD keeps one step count for all tasks: the same as ours while every
    task is present)."""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    worst = {torch.float32: 0.0, torch.float64: 0.0}
    for T in (1, 2, 3, 4, 6):
        for dtype in (torch.float64, torch.float32):
            for tau in (0.0, 0.02, 0.5):
                ours, theirs = PCD(tau=tau), tj.PCD(tau=tau)
                scale = torch.exp(2 * torch.randn(T, 1, generator=gen, dtype=torch.float64))
                for _ in range(6):
                    J = (torch.randn(T, 7, generator=gen, dtype=torch.float64) * scale).to(dtype)
                    a, b = ours(J), theirs(J)
                    err = float((a - b).norm() / b.norm())
                    worst[dtype] = max(worst[dtype], err)
    assert worst[torch.float64] < 1e-12 and worst[torch.float32] < 1e-4, worst
    # Infeasible constraints: both drop them.
    J = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -2.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(PCD()(J), tj.PCD()(J))


@settings(max_examples=30, deadline=None)
@given(J=gaussian_matrices(min_tasks=2, max_tasks=6, max_dim=8), tau=st.floats(0.01, 1.0))
def test_secondary_progress_guaranteed(J: torch.Tensor, tau: float) -> None:
    """Where the constraints are feasible: g~_j^T d~ >= tau ||g~_j||^2 for every secondary task
    (d~ = d s_1 / w_1, the unscaled direction), so no secondary loss rises to first order."""
    agg = PCD(tau=tau)
    d = agg(J)
    if float(agg.diagnostics["feasible"]) == 0:
        assert_close(d, J[0], rtol=1e-12, atol=0)
        return
    s = agg.diagnostics["scales"]
    dt = d * s[0] / agg.weights[0]
    gt = J * s[:, None]
    lhs, rhs = gt[1:] @ dt, tau * (gt[1:] ** 2).sum(dim=1)
    assert bool((lhs >= rhs - 1e-9 * (1 + rhs)).all()), (lhs, rhs)
    assert bool((J[1:] @ d > 0).all())
    assert abs(float(d.norm()) - float(J[0].norm())) <= 1e-10 * float(J[0].norm())


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(min_tasks=2, max_tasks=5, max_dim=6),
       log_c=st.lists(st.floats(-4, 4), min_size=5, max_size=5))
def test_scale_invariance(J: torch.Tensor, log_c: list[float]) -> None:
    """Rows multiplied by constants at every call (eps = 0): secondary factors change nothing,
    the primary's scales the result by its factor."""
    c = 10.0 ** torch.tensor(log_c[: J.shape[0]], dtype=torch.float64)
    a, b = PCD(eps=0.0, beta=0.9), PCD(eps=0.0, beta=0.9)
    for k in range(3):
        Jk = J * (1.0 + 0.3 * k)
        da, db = a(Jk), b(Jk * c[:, None])
        assert_close(db, c[0] * da, rtol=1e-9, atol=1e-12 * float(c[0] * da.norm()), norm=True)


def test_special_cases() -> None:
    # No active constraint: d = g_1.
    J = torch.tensor([[1.0, 0.5], [1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(PCD()(J), J[0], rtol=1e-15)
    # A zero primary gradient: d = 0 (the averages still move).
    agg = PCD()
    assert torch.equal(agg(torch.tensor([[0.0, 0.0], [1.0, 2.0]])), torch.zeros(2))
    assert agg.task_steps.tolist() == [1, 1] and float(agg.sq_norm_ema[1]) > 0
    # One task: its gradient.
    assert torch.allclose(PCD()(torch.tensor([[3.0, -4.0]])), torch.tensor([3.0, -4.0]))
    # Infeasible: opposite secondaries with tau > 0 -> g_1; with tau = 0 they are feasible.
    J = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, -3.0, 0.0]], dtype=torch.float64)
    agg = PCD(tau=0.1)
    assert torch.equal(agg(J), J[0]) and float(agg.diagnostics["feasible"]) == 0
    agg = PCD(tau=0.0)
    d = agg(J)
    assert float(agg.diagnostics["feasible"]) == 1
    assert torch.allclose(d, torch.tensor([math.sqrt(2), 0.0, 0.0], dtype=J.dtype), atol=1e-12)
    # An unchecked NaN: NaN weights, the averages untouched.
    agg = PCD()
    agg(torch.randn(2, 3, dtype=torch.float64))
    before = agg.state_dict()
    out = agg.aggregate(torch.tensor([[float("nan"), 0.0, 0.0], [1.0, 0.0, 0.0]]),
                        check_finite=False)
    assert bool(out.weights.isnan().all())
    assert all(torch.equal(before[k], agg.state_dict()[k]) for k in before)


def test_state_resume_reset_and_absent_primary() -> None:
    for split in (1, 3):
        assert_state_dict_roundtrip(lambda: PCD(tau=0.3, beta=0.9), seed=split, steps=6,
                                    split=split)
    agg = PCD(beta=0.5)
    J = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = agg(J)
    agg(2 * J)
    agg.reset()
    assert torch.equal(agg(J), first)
    # Task 0 absent: the first present task is this call's primary; task 0's average stays.
    agg = PCD(tau=0.4)
    agg(J)
    ema0 = agg.sq_norm_ema[0].clone()
    out = agg.aggregate(J[1:], present=[False, True, True])
    fresh = PCD(tau=0.4)
    fresh.load_state_dict({"sq_norm_ema": first_ema(J[1:]),
                           "task_steps": torch.ones(2, dtype=torch.int64)})
    assert torch.equal(agg.sq_norm_ema[0], ema0) and agg.task_steps.tolist() == [1, 2, 2]
    assert out.weights[0] == 0
    assert_close(out.direction, fresh(J[1:]), rtol=1e-12, atol=0)
    assert_close(out.direction.norm(), J[1].norm(), rtol=1e-12)


def first_ema(J: torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    """The average after one call on J: (1 - beta) ||g_i||^2."""
    return (1 - beta) * (J**2).sum(dim=1)


def test_input_checks() -> None:
    for kw in ({"tau": -0.1}, {"tau": 1.5}, {"tau": [0.1, 2.0]}, {"tau": [[0.1]]},
               {"beta": 1.0}, {"beta": -0.1}, {"eps": -1.0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            PCD(**kw)
    J = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"2 values of tau .* J has 4 rows"):
        PCD(tau=[0.1, 0.2])(torch.randn(4, 4))
    agg = PCD()
    agg(J)
    state = agg.state_dict()
    with pytest.raises(ValueError, match="tracks the gradient norms of 3 tasks, got 2 rows"):
        agg(J[:2])
    assert all(torch.equal(state[k], agg.state_dict()[k]) for k in state)  # unchanged
    with pytest.raises(ValueError, match="unknown keys"):
        agg.load_state_dict({"ema": 1})
    with pytest.raises(ValueError, match="both"):
        agg.load_state_dict({"sq_norm_ema": torch.ones(3), "task_steps": None})
    with pytest.raises(ValueError, match="tau has 1 values"):
        PCD(tau=[0.1]).load_state_dict(state)
    assert repr(get("pcd", tau=[0.1, 0.2])) == "PCD(tau=[0.1, 0.2], beta=0.999, eps=1e-08)"
    assert get("pcd").reads == "gramian" and PCD.gramian_only and PCD.stateful


@settings(max_examples=20, deadline=None)
@given(J=gaussian_matrices(min_tasks=1, max_tasks=6, max_dim=8))
def test_expected_structure_and_gramian_only(J: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        assert_expected_structure(PCD(), J.to(dtype))
    a, b = PCD(), PCD()
    a(J)
    assert_close(b.aggregate_gramian(J @ J.T).weights, a.weights, rtol=1e-12, atol=0)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: PCD(), DEGENERATE_MATRICES)


@settings(max_examples=20, deadline=None)
@given(J=gaussian_matrices(min_tasks=3, max_tasks=6, max_dim=8), seed=st.integers(0, 999),
       taus=st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5))
def test_invariant_under_permutations_of_the_secondaries(J: torch.Tensor, seed: int,
                                                           taus: list[float]) -> None:
    T = J.shape[0]
    rest = torch.randperm(T - 1, generator=torch.Generator().manual_seed(seed)) + 1
    perm = torch.cat([torch.zeros(1, dtype=torch.long), rest])
    steps = [J * (1 + 0.5 * k) for k in range(3)]
    tol = 1e-9 * float(J[0].norm())
    assert_permutation_invariant(lambda: PCD(beta=0.9), steps, perm, atol=tol, norm=True)
    tau = taus[: T - 1]
    assert_permutation_invariant(lambda: PCD(tau=tau), steps, perm, atol=tol, norm=True,
                                 permuted=lambda: PCD(tau=[tau[int(i) - 1] for i in rest]))
