"""ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024) recomputed by
hand in float64 numpy over several calls (zero rows included), against the authors' code's
update as LibMTL ships it (loss weights summing to T: ours times T) and TorchJD 0.18's
``ExcessMTLWeighting`` (which already steps on the first call's unscaled estimates: ours times
``exp(eta E^(0))``, renormalised); then its properties: weights on the simplex, uniform at the
first call, more weight to the task further from convergence, permutation invariance over steps,
scale invariance (exact with ``eps = 0``), finite on degenerate inputs, state and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.excessmtl import ExcessMTL

from .._properties import (
    assert_close,
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_permutation_invariant,
    assert_state_dict_roundtrip,
    scale_of,
)
from ..strategies import DEGENERATE_MATRICES, gaussian_matrices, jacobians


def excess_reference(Js: list[np.ndarray], eta: float, eps: float,
                     warmup: int = 0) -> list[np.ndarray]:
    """The weights of each call from eqs. 6-9 and the scale processing, task by task; during
    ``warmup`` calls the weights stay and the baselines are the estimates' means."""
    T, D = Js[0].shape
    S = np.zeros((T, D))
    base = [None] * T
    seen: list[list[float]] = [[] for _ in range(T)]
    logw = np.log(np.full(T, 1.0 / T))
    out = []
    for k, J in enumerate(Js):
        r = np.zeros(T)
        for i in range(T):
            S[i] += J[i] ** 2
            h = np.sqrt(S[i] + eps)
            E = sum(J[i, j] ** 2 / h[j] for j in range(D) if h[j] > 0)
            if k < warmup:
                seen[i].append(E)
                continue
            if base[i] is None and seen[i] and np.mean(seen[i]) > 0:
                base[i] = np.mean(seen[i])
            if base[i] is None and E > 0:
                base[i] = E
            r[i] = E / base[i] if base[i] is not None else 0.0
        logw = logw + eta * r
        logw -= logw.max()
        w = np.exp(logw) / np.exp(logw).sum()
        with np.errstate(divide="ignore"):  # a weight may underflow to 0
            logw = np.log(w)
        out.append(w)
    return out


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 6), D=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       eta=st.floats(1e-3, 3.0), eps=st.sampled_from([0.0, 1e-7, 1e-2]),
       zero_first=st.booleans(), warmup=st.sampled_from([0, 0, 1, 3]))
def test_matches_hand_computed_algorithm(T: int, D: int, seed: int, eta: float, eps: float,
                                         zero_first: bool, warmup: int) -> None:
    rng = np.random.default_rng(seed)
    Js = [rng.standard_normal((T, D)) * 10 ** rng.uniform(-2, 2) for _ in range(5)]
    if zero_first:
        Js[0][0] = 0.0  # task 0 has no baseline until its gradient is not 0
    Js[2][-1] = 0.0
    Js[3][:, 0] = 0.0  # a column that stays 0 for some tasks
    ref = excess_reference(Js, eta, eps, warmup)
    agg = ExcessMTL(robust_step_size=eta, eps=eps, warmup=warmup)
    for k, J in enumerate(Js):
        d = agg(torch.tensor(J))
        assert np.abs(agg.weights.numpy() - ref[k]).max() <= 1e-12, (k, agg.weights, ref[k])
        assert np.abs(d.numpy() - ref[k] @ J).max() <= 1e-12 * (1 + np.abs(J).sum())


def libmtl_excessmtl(Js: list[np.ndarray], eta: float) -> list[np.ndarray]:
    """The authors' update as LibMTL ships it: weights start at 1 (summing to T), the first call
    records the baseline without updating, later ones multiply by exp(eta E / E^(0)) and
    renormalise to sum T."""
    T = Js[0].shape[0]
    weight, grad_sum, initial = np.ones(T), np.zeros_like(Js[0]), None
    out = []
    for J in Js:
        grad_sum += J**2
        w = np.array([(J[i] / np.sqrt(grad_sum[i] + 1e-7)) @ J[i] for i in range(T)])
        if initial is None:
            initial = w
        else:
            weight = weight * np.exp(w / initial * eta)
            weight = weight / weight.sum() * T
        out.append(weight.copy())
    return out


def test_against_the_authors_update() -> None:
    """Ours = theirs / T (their weights sum to T: "excessmtl*T" is theirs)."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for T in (2, 3, 6):
        Js = [rng.standard_normal((T, 9)) * (1 + 0.3 * k) for k in range(8)]
        agg = ExcessMTL(robust_step_size=0.5)
        for J, theirs in zip(Js, libmtl_excessmtl(Js, 0.5)):
            agg(torch.tensor(J))
            diff = float(np.abs(T * agg.weights.numpy() - theirs).max())
            worst = max(worst, diff)
            assert diff <= 1e-12, (T, diff)
    J = torch.tensor(Js[0])
    assert_close(get("excessmtl*T")(J), 6 * get("excessmtl")(J), rtol=1e-15)
    print(f"ExcessMTL vs the authors' update: largest weight difference {worst:.3g}")


def test_against_torchjd() -> None:
    """TorchJD 0.18 steps on the first call's raw estimates E^(0) too: its weights are ours times
    exp(eta E^(0)), renormalised, at every call; it divides by E^(0) + 1e-7 (negligible for
    the estimates of about 1e3 used here)."""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for T in (2, 4, 7):
        eta = 1e-3
        ours, theirs = ExcessMTL(robust_step_size=eta), tj.ExcessMTLWeighting(eta)
        first = None
        for k in range(6):
            J = torch.randn(T, 10, generator=gen, dtype=torch.float64) * (1 + 0.5 * k) * 1e3
            ours(J)
            w_tj = theirs(J)
            if first is None:
                first = ours.diagnostics["excess_risk"].clone()
            mapped = ours.weights * torch.exp(eta * first)
            mapped = mapped / mapped.sum()
            diff = float((mapped - w_tj).abs().max())
            worst = max(worst, diff)
            assert diff <= 1e-12, (T, k, diff)
    # With a warmup both take the warmup's mean estimates as the baselines: the same weights.
    for T, n in ((3, 1), (5, 4)):
        ours, theirs = ExcessMTL(robust_step_size=0.5, warmup=n), tj.ExcessMTLWeighting(0.5, n)
        for k in range(n + 4):
            J = torch.randn(T, 10, generator=gen, dtype=torch.float64) * (1 + 0.5 * k) * 1e4
            ours(J)
            diff = float((ours.weights - theirs(J)).abs().max())
            worst = max(worst, diff)
            assert diff <= 1e-10, (T, n, k, diff)  # their E^(0) + 1e-7
    print(f"ExcessMTL vs TorchJD (mapped): largest weight difference {worst:.3g}")


def test_more_weight_to_the_task_further_from_convergence() -> None:
    """Task 1's gradient shrinks (it converges), task 0's does not: task 0's weight grows at every
    call; the first call is uniform."""
    rng = np.random.default_rng(1)
    g0, g1 = rng.standard_normal(6), 3.0 * rng.standard_normal(6)
    agg = ExcessMTL(robust_step_size=1.0)
    prev = None
    for k in range(10):
        J = torch.tensor(np.stack([g0, 0.7**k * g1]))
        agg(J)
        w = agg.weights
        if prev is None:
            assert_close(w, torch.full((2,), 0.5, dtype=torch.float64), rtol=1e-15)
        else:
            assert float(w[0]) > float(prev[0]), (k, w, prev)
        prev = w


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=8, max_dim=10, min_log_scale=-6, max_log_scale=6),
       K=gaussian_matrices())
def test_simplex_weights_on_hard_inputs(J: torch.Tensor, K: torch.Tensor) -> None:
    agg = ExcessMTL(robust_step_size=1.0)
    for k, dtype in enumerate((torch.float64, torch.float32, torch.float64)):
        out = assert_expected_structure(agg, J.to(dtype) * (1 + k))
        w = out.weights.double()
        assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) <= 1e-6
        alpha = agg.alpha.double()
        assert abs(float(alpha.sum()) - 1) <= 1e-6
    assert_expected_structure(ExcessMTL(), K)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: ExcessMTL(robust_step_size=1.0),
                                         DEGENERATE_MATRICES)
    assert_finite_on_degenerate_matrices(lambda T: ExcessMTL(eps=0.0), DEGENERATE_MATRICES)


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(min_tasks=2, max_tasks=6, max_dim=8), perm_seed=st.integers(0, 2**31 - 1))
def test_permutation_invariant_over_steps(J: torch.Tensor, perm_seed: int) -> None:
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    steps = [J * (1 + 0.2 * k) + 0.1 * k * J.roll(1, 0) for k in range(4)]
    assert_permutation_invariant(lambda: ExcessMTL(robust_step_size=1.0), steps, perm,
                                 atol=1e-12 * scale_of(J), weights=lambda a: a.weights,
                                 weights_atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(min_tasks=1, max_tasks=6, max_dim=8, min_log_scale=-3,
                           max_log_scale=3), log_c=st.floats(-6, 6))
def test_scale_invariant_with_eps_zero(J: torch.Tensor, log_c: float) -> None:
    """E scales like c and is divided by its first value: with eps = 0, d(c J) = c d(J) at every
    call (the default eps = 1e-7 breaks this only for gradients of about 1e-3.5 and below)."""
    c = 10.0**log_c
    a, b = ExcessMTL(robust_step_size=1.0, eps=0.0), ExcessMTL(robust_step_size=1.0, eps=0.0)
    for k in range(4):
        Jk = J * (1 + 0.3 * k) + 0.2 * k * J.roll(1, 0)
        d, dc = a(Jk), b(c * Jk)
        assert_close(b.weights, a.weights, rtol=1e-12, atol=1e-15)
        assert_close(dc, c * d, rtol=1e-12, atol=1e-13 * c * scale_of(Jk), norm=True)


def test_state_and_validation() -> None:
    assert_state_dict_roundtrip(lambda: ExcessMTL(robust_step_size=1.0), seed=2, steps=8, split=3)
    agg = ExcessMTL()
    J = torch.randn(3, 4, dtype=torch.float64)
    agg(J)
    with pytest.raises(ValueError, match=r"accumulating a \[3, 4\] Jacobian, got \[3, 5\]"):
        agg(torch.randn(3, 5, dtype=torch.float64))
    agg.reset()
    assert agg.state_dict() == {"sq_grad_sum": None, "baseline": None, "alpha": None,
                                "warmup_sum": None, "warmup_count": None, "step": 0}
    assert torch.equal(agg(J), ExcessMTL()(J))
    with pytest.raises(ValueError, match="unknown keys"):
        ExcessMTL().load_state_dict({"weights": torch.ones(3)})
    with pytest.raises(ValueError, match="all of"):
        ExcessMTL().load_state_dict({"alpha": torch.ones(3) / 3})
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        ExcessMTL().load_state_dict({"sq_grad_sum": torch.ones(3), "baseline": torch.ones(3),
                                     "alpha": torch.ones(3)})
    for kw, msg in (({"robust_step_size": 0.0}, "robust_step_size must be"),
                    ({"robust_step_size": float("nan")}, "robust_step_size must be"),
                    ({"eps": -1.0}, "eps must be"), ({"eps": True}, "eps must be"),
                    ({"warmup": -1}, "warmup must be"), ({"warmup": 1.5}, "warmup must be")):
        with pytest.raises(ValueError, match=msg):
            ExcessMTL(**kw)
    for name in ("excessmtl", "excess-mtl", "Excess_MTL"):
        assert isinstance(get(name), ExcessMTL)
    agg = get("excessmtl")
    assert (agg.robust_step_size, agg.eps, agg.warmup) == (1e-2, 1e-7, 0)
    assert agg.reads == "jacobian" and agg.stateful and not agg.random



def test_warmup_baselines_with_absent_tasks() -> None:
    """During the warmup the weights stay uniform over the present tasks; each baseline is the
    mean of the task's estimates over the warmup calls it was present in."""
    gen = torch.Generator().manual_seed(4)
    J1, J2, J3 = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    agg = ExcessMTL(robust_step_size=1.0, warmup=2)
    out = agg.aggregate(J1[[0, 2]], present=[True, False, True])
    assert_close(out.weights, torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64), rtol=1e-15)
    e1 = agg.diagnostics["excess_risk"].clone()  # tasks 0 and 2
    out = agg.aggregate(J2)
    assert_close(out.weights, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=1e-15)
    e2 = agg.diagnostics["excess_risk"].clone()
    assert torch.equal(agg.warmup_count, torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64))
    agg.aggregate(J3)  # the first call after the warmup: the baselines are the means
    expected = torch.stack([(e1[0] + e2[0]) / 2, e2[1], (e1[1] + e2[2]) / 2])
    assert_close(agg.baseline, expected, rtol=1e-15)
    assert_close(agg.diagnostics["ratio"], agg.diagnostics["excess_risk"] / expected, rtol=1e-15)
