"""Mean, Sum, MinNorm, Central and Tensioned (MGDA: Sener and Koltun 2018; central direction and tensioners: the task-tensioner paper, eq. 3-8) against float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import Central, Mean, MinNorm, Sum, Tensioned, available, get
from torch_mtlgrad.aggregators._solvers import min_norm_weights

from ..strategies import jacobians
from ._properties import (
    assert_expected_structure,
    assert_linear_under_scaling,
    assert_non_conflicting,
    assert_non_zero,
    assert_permutation_invariant,
    assert_strongly_stationary,
    matrices,
    non_strongly_stationary_matrices,
    strongly_stationary_matrices,
)


def test_mean_and_sum() -> None:
    J = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.0, 1.0]])
    assert torch.allclose(Sum()(J), J.sum(0))
    assert torch.allclose(Mean()(J), J.mean(0))
    assert Mean().gramian_only is False


@settings(max_examples=60, deadline=None)
@given(jacobians(max_tasks=6, min_log_scale=-4, max_log_scale=4))
def test_min_norm_direction_is_in_hull_and_minimal(J: torch.Tensor) -> None:
    agg = MinNorm()
    d = agg(J)
    w = agg.weights
    assert w is not None and bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-9
    assert torch.allclose(d, w @ J)
    # Minimal among the vertices and the mean (cheap necessary check; cvxpy check in test_solvers).
    cands = torch.cat([J, J.mean(0, keepdim=True)])
    assert float(d.norm()) <= float(cands.norm(dim=1).min()) * (1 + 1e-9) + 1e-12 * float(J.norm(dim=1).max())
    # Common descent: g_t . d >= ||d||^2 for every task (KKT of the min-norm point).
    assert bool((J @ d >= (d @ d) * (1 - 1e-7) - 1e-12 * float(J.norm()) ** 2).all())


def test_min_norm_normalizations() -> None:
    J = torch.tensor([[2.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    losses = torch.tensor([0.5, 4.0], dtype=torch.float64)
    for mode, s in [("none", [1.0, 1.0]), ("l2", [2.0, 10.0]), ("loss", [0.5, 4.0]),
                    ("loss+", [1.0, 40.0])]:
        agg = MinNorm(normalization=mode)  # type: ignore[arg-type]
        d = agg(J, losses)
        scales = torch.tensor(s, dtype=torch.float64)
        Js = J / scales[:, None]
        ref = MinNorm()(Js)  # the min-norm point of the scaled rows
        assert torch.allclose(d, ref), (mode, d, ref)
    with pytest.raises(ValueError, match="needs the loss values"):
        MinNorm(normalization="loss")(J)
    with pytest.raises(ValueError, match="normalization must be one of"):
        MinNorm(normalization="bad")  # type: ignore[arg-type]
    # A zero row with l2 normalisation does not divide by zero.
    d = MinNorm(normalization="l2")(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert bool(torch.isfinite(d).all())


@settings(max_examples=80, deadline=None)
@given(jacobians(max_tasks=7))
def test_central_is_convex_combination_with_equalised_angles(J: torch.Tensor) -> None:
    agg = Central()
    v = agg(J)
    c = agg.weights
    assert c is not None and bool((c >= 0).all()) and abs(float(c.sum()) - 1) < 1e-9
    assert torch.allclose(v, c @ J, rtol=1e-9, atol=1e-12 * float(J.abs().max()))
    # Reference: eq. 3-4 in float64 on explicit unit vectors.
    norms = J.norm(dim=1)
    nz = norms > 0
    if not bool(nz.any()):
        assert bool((v == 0).all())
        return
    U = J[nz] / norms[nz, None]
    m = U.shape[0]
    # T = 2 on unit vectors: k* = (1/2, 1/2) (the bisector); otherwise the exact solver.
    kw = min_norm_weights(U @ U.T, "active-set") if m > 2 else torch.full((m,), 1 / m, dtype=J.dtype)
    gamma = 1 / (kw / norms[nz]).sum()
    ref = gamma * (kw @ U)
    assert torch.allclose(v, ref, rtol=1e-6, atol=1e-9 * float(norms.max()))


@settings(max_examples=60, deadline=None)
@given(jacobians(min_tasks=2, max_tasks=2, kinds=("random", "colinear", "orthogonal")))
def test_central_two_tasks_is_bisector(J: torch.Tensor) -> None:
    g1, g2 = J
    n1, n2 = g1.norm(), g2.norm()
    ref = (g1 * n2 + g2 * n1) / (n1 + n2)
    assert torch.allclose(Central()(J), ref, rtol=1e-9, atol=1e-12 * float(n1 + n2))


def test_central_zero_rows() -> None:
    J = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(Central()(J), J[1])
    assert bool((Central()(torch.zeros(3, 4)) == 0).all())


# --- Tensioner -----------------------------------------------------------------------------


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
    norms = J.norm(dim=1)
    tol = 1e-7 * norms * (d.norm() + norms.max())
    assert bool((J @ d >= -tol).all()), (J @ d, tol)
    assert bool(torch.isfinite(d).all())
    # The weights describe the direction.
    assert agg.weights is not None
    assert torch.allclose(agg.weights @ J, d, rtol=1e-6, atol=1e-9 * float(norms.max() + d.norm()))


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
    for bad in [dict(alpha=1.5), dict(window=0), dict(feasibility="x"), dict(scale="x")]:
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


def test_registry() -> None:
    names = available()
    for n in ["mean", "sum", "mgda", "central", "mean+tension", "central+tension"]:
        assert n in names
    assert isinstance(get("MGDA"), MinNorm)
    t = get("mgda+tension", alpha=0.5, window=3, normalization="l2")
    assert isinstance(t, Tensioned) and t.alpha == 0.5 and t.base.normalization == "l2"
    with pytest.raises(ValueError, match="unknown aggregator"):
        get("nope")
    with pytest.raises(TypeError):
        get(3)  # type: ignore[arg-type]


def test_aggregator_input_checks() -> None:
    with pytest.raises(ValueError, match="shape \\[T, D\\]"):
        Mean()(torch.ones(3))
    with pytest.raises(ValueError, match="no rows"):
        Mean()(torch.ones(0, 3))
    with pytest.raises(TypeError, match="floating-point"):
        Mean()(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="losses must have shape \\[2\\]"):
        Mean()(torch.ones(2, 3), torch.ones(3))
    # Half-precision input is aggregated in float32 and cast back.
    J = torch.randn(3, 6).to(torch.bfloat16)
    d = Central()(J)
    assert d.dtype == torch.bfloat16
    assert torch.allclose(d.float(), Central()(J.float()).to(torch.bfloat16).float())


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


# Shared properties (tests/aggregators/_properties.py): Mean and Sum are linear and
# permutation invariant but conflicting; MGDA (MinNorm) and Central are also non-conflicting and
# zero exactly at strongly stationary matrices.
PROPERTY = settings(max_examples=25, deadline=None)
CORE = {"mean": Mean, "sum": Sum, "mgda": MinNorm, "central": Central}
CONE = ["mgda", "central"]


@pytest.mark.parametrize("name", sorted(CORE))
@PROPERTY
@given(J=matrices(rank=None))
def test_property_expected_structure(name: str, J: torch.Tensor) -> None:
    assert_expected_structure(CORE[name], J)


@pytest.mark.parametrize("name", sorted(CORE))
@PROPERTY
@given(J=matrices(min_dim=2))  # D = 1: equal unit rows make Central's min-norm weights non-unique
def test_property_permutation_invariant(name: str, J: torch.Tensor) -> None:
    assert_permutation_invariant(CORE[name], J)


@pytest.mark.parametrize("name", sorted(CORE))
@PROPERTY
@given(J=matrices())
def test_property_linear_under_scaling(name: str, J: torch.Tensor) -> None:
    assert_linear_under_scaling(CORE[name], J)


@pytest.mark.parametrize("name", sorted(CORE))
@PROPERTY
@given(J=non_strongly_stationary_matrices())
def test_property_non_zero_off_stationary(name: str, J: torch.Tensor) -> None:
    assert_non_zero(CORE[name], J)


@pytest.mark.parametrize("name", CONE)
@PROPERTY
@given(J=matrices(min_tasks=2))
def test_property_non_conflicting(name: str, J: torch.Tensor) -> None:
    assert_non_conflicting(CORE[name], J)


@pytest.mark.parametrize("name", CONE)
@PROPERTY
@given(J=matrices(min_tasks=3, rank=2))
def test_property_non_conflicting_rank_deficient(name: str, J: torch.Tensor) -> None:
    assert_non_conflicting(CORE[name], J)


@pytest.mark.parametrize("name", CONE)
@PROPERTY
@given(J=strongly_stationary_matrices())
def test_property_zero_on_strongly_stationary(name: str, J: torch.Tensor) -> None:
    assert_strongly_stationary(CORE[name], J)
