"""Task tensioners (Nakamura, Grassi and Wolf, *Leveraging convergence behavior to balance
conflicting tasks in multi-task learning*, arXiv:2204.06698, 2022, eq. 5-8) against a float64
step-by-step reference; non-conflicting (the feasibility step) and weighted for any number of
tasks; permutation invariant over steps; alpha = 0 gives the base direction exactly; warm-up,
errors and state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import Central, Tensioned, get

from .._properties import (
    assert_non_conflicting,
    assert_permutation_invariant,
    assert_weighted,
    scale_of,
)
from ..strategies import (
    gaussian_matrices,
    jacobians,
)


def reference_tension(Js: list[np.ndarray], losses: list[np.ndarray], base, alpha: float,
                      window: int, feasibility: str) -> list[np.ndarray]:
    """Eq. 5-8 step by step with explicit vectors (float64), with the segment fix for the feasibility of the tensioned direction."""
    hist: list[np.ndarray] = []
    out = []
    for J, L in zip(Js, losses):
        v = base(torch.tensor(J)).numpy()
        hist.append(np.linalg.norm(J, axis=1))
        if len(hist) <= window or alpha == 0:
            out.append(v)
            continue
        zeta_t = np.mean(hist[-window:], axis=0)
        zeta_p = np.mean(hist[-window - 1:-1], axis=0)
        delta = zeta_t / zeta_p + np.log10(L)
        c = np.maximum(alpha / (1 + np.exp(-delta * math.e + math.e)) + 1 - alpha, 0)
        vn = v.copy()
        for m in range(J.shape[0]):
            diff = J[m] - v
            n = np.linalg.norm(diff)
            if n > 1e-12 * (np.linalg.norm(J[m]) + np.linalg.norm(v)):
                vn = vn + c[m] * diff / n
        if feasibility == "segment":
            for m in range(J.shape[0]):
                g = J[m]
                b = g @ vn
                if b < 0:
                    s = (g @ g) / (g @ g - b)
                    vn = g + s * (vn - g)
        out.append(vn)
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["mgda", "central"]),
       st.floats(0.05, 1.0), st.integers(1, 4))
def test_tension_two_tasks_matches_reference(seed: int, base_name: str, alpha: float,
                                             window: int) -> None:
    rng = np.random.default_rng(seed)
    steps = window + 6
    Js = [rng.standard_normal((2, 5)) * np.array([[1.0], [rng.uniform(0.1, 20)]]) for _ in range(steps)]
    Ls = [rng.uniform(0.01, 5, size=2) for _ in range(steps)]
    agg = get(f"{base_name}+tension", alpha=alpha, window=window, feasibility="segment")
    base = get(base_name)
    ref = reference_tension(Js, Ls, base, alpha, window, "segment")
    for J, L, r in zip(Js, Ls, ref):
        d = agg(torch.tensor(J), torch.tensor(L)).numpy()
        assert np.allclose(d, r, rtol=1e-9, atol=1e-10), (d, r)
        assert np.all(J @ d >= -1e-9 * np.linalg.norm(J, axis=1) * np.linalg.norm(d))


@settings(max_examples=40, deadline=None)
@given(jacobians(min_tasks=2, max_tasks=8, min_log_scale=-4, max_log_scale=4),
       st.sampled_from(["project", "segment"]), st.sampled_from(["mean", "mgda", "central"]),
       st.sampled_from(["unit", "relative"]))
def test_tension_feasible_for_any_number_of_tasks(J: torch.Tensor, feasibility: str, base: str,
                                                  scale: str) -> None:
    agg = get(f"{base}+tension", window=1, feasibility=feasibility, scale=scale, alpha=1.0)
    losses = torch.linspace(0.05, 50, J.shape[0], dtype=torch.float64)
    agg(J * 0.5, losses)  # fill the window
    agg(J * 0.7, losses)
    d = agg(J, losses)
    assert agg.diagnostics["tensioned"].item() == 1.0
    assert_non_conflicting(d, J, rtol=1e-7)
    # The weights describe the direction.
    assert_weighted(agg, J, d, rtol=1e-6, atol=1e-9 * float(J.norm(dim=1).max() + d.norm()))


@settings(max_examples=30, deadline=None)
@given(jacobians(max_tasks=6, min_log_scale=-3, max_log_scale=3), st.sampled_from(["mgda", "central", "mean"]))
def test_alpha_zero_gives_base_exactly(J: torch.Tensor, base: str) -> None:
    agg = get(f"{base}+tension", alpha=0.0, window=1)
    ref = get(base)
    losses = torch.ones(J.shape[0], dtype=torch.float64)
    for k in range(4):
        assert torch.equal(agg(J * (k + 1), losses), ref(J * (k + 1)))


def test_tension_warmup_and_first_tensioned_call() -> None:
    torch.manual_seed(0)
    agg = Tensioned(Central(), window=10)
    losses = torch.tensor([0.5, 2.0])
    for call in range(1, 13):
        J = torch.randn(2, 4) * torch.tensor([[1.0], [10.0]])
        agg(J, losses)
        assert agg.diagnostics["tensioned"].item() == float(call >= 11), call
    assert torch.isfinite(agg.diagnostics["delta"]).all()
    assert set(agg.diagnostics) >= {"c", "delta", "angle", "angle_base"}


def test_tension_errors_leave_state_untouched() -> None:
    agg = Tensioned(Central(), window=2)
    J = torch.randn(3, 4)
    agg(J, torch.ones(3))
    before = agg.state_dict()
    with pytest.raises(ValueError, match="task 1 has loss"):
        agg(J, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="needs the loss values"):
        agg(J)
    with pytest.raises(ValueError, match="tracking 3 tasks"):
        agg(torch.randn(2, 4), torch.ones(2))
    after = agg.state_dict()
    assert after["count"] == before["count"] and torch.equal(after["history"], before["history"])
    # loss_term=False accepts any losses, and none.
    free = Tensioned(Central(), window=1, loss_term=False)
    for _ in range(3):
        assert torch.isfinite(free(J)).all()
    for bad in [{"alpha": 1.5}, {"window": 0}, {"feasibility": "x"}, {"scale": "x"}]:
        with pytest.raises(ValueError):
            Tensioned(Central(), **bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Tensioned("central")  # type: ignore[arg-type]


def test_tension_state_dict_resumes_identically() -> None:
    torch.manual_seed(1)
    Js = [torch.randn(3, 5) for _ in range(8)]
    L = torch.tensor([0.3, 1.0, 3.0])
    a = get("central+tension", window=3)
    outs = [a(J, L) for J in Js]
    b = get("central+tension", window=3)
    for J in Js[:4]:
        b(J, L)
    c = get("central+tension", window=3)
    c.load_state_dict(b.state_dict())
    for J, ref in zip(Js[4:], outs[4:]):
        assert torch.equal(c(J, L), ref)
    c.reset()
    assert c.count == 0 and c.history is None


def test_tension_rejects_corrupt_state() -> None:
    agg = Tensioned(Central(), window=2)
    good = torch.ones(3, 2)
    for bad, msg in [({"history": torch.full((3, 2), float("nan")), "count": 3}, "non-finite"),
                     ({"history": -good, "count": 3}, "negative"),
                     ({"history": good, "count": -1}, "non-negative integer"),
                     ({"history": torch.ones(4, 2), "count": 3}, "shape"),
                     ({"history": [1, 2], "count": 3}, "must be a tensor")]:
        with pytest.raises(ValueError, match=msg):
            agg.load_state_dict(bad)
        assert agg.history is None and agg.count == 0


@settings(max_examples=20, deadline=None)
@given(J=gaussian_matrices(min_dim=2), base=st.sampled_from(["mean", "mgda", "central"]))
def test_permutation_invariant_over_steps(J: torch.Tensor, base: str) -> None:
    """Eq. 5-8 treat the tasks alike: reordering the rows and the losses reorders the history
    and the tensions, not the direction.  (With feasibility="project"; "segment" repairs the
    conflicts row after row, in the order of the tasks.)"""
    L = torch.linspace(0.1, 10.0, J.shape[0], dtype=J.dtype)
    steps = [(J * (1 + 0.2 * k), L) for k in range(4)]
    assert_permutation_invariant(lambda: get(f"{base}+tension", window=1, alpha=1.0,
                                             feasibility="project"),
                                 steps, 2, atol=3e-9 * scale_of(J))
