"""GradVac (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
Massively Multilingual Models", ICLR 2021, Algorithm 1) against a literal float64 implementation on
the rows of J over several steps (the EMA state carried), and against TorchJD 0.18; then its
properties, with the same draws: expected structure, positive homogeneity and linearity under
scaling (the cosines do not read the norms), invariance to the order of two tasks on the first
call, a non-zero direction when the tasks share a descent direction."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators.gradvac import GradVac
from torch_mtlgrad.aggregators.pcgrad import PCGrad

from .._properties import (
    assert_close,
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_linear_under_scaling,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import (
    DEGENERATE_MATRICES,
    POSITIVE_SCALES,
    common_direction_matrices,
    full_rank_matrices,
    gaussian_matrices,
    jacobians,
)

EPS = torch.finfo(torch.float64).eps


class Reference:
    """Algorithm 1 on vectors, with the same visiting orders as GradVac(seed=seed)."""

    def __init__(self, T: int, beta: float, seed: int) -> None:
        self.phi_hat = [[0.0] * T for _ in range(T)]
        self.beta = beta
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, J: torch.Tensor) -> torch.Tensor:
        T = J.shape[0]
        out = torch.zeros(J.shape[1], dtype=torch.float64)
        for i in range(T):
            others = [j for j in range(T) if j != i]
            order = [others[k] for k in torch.randperm(T - 1, generator=self.gen).tolist()]
            g = J[i].clone()
            mass = float(J[i].norm())  # sum_k |C_ik| ||g_k||: the size of g's rounding error
            for j in order:
                ni, nj = float(g.norm()), float(J[j].norm())
                if ni <= 10 * EPS**0.5 * mass or nj == 0.0:
                    continue  # no cosine with a (numerically) zero gradient: skipped
                phi = max(-1.0, min(1.0, float(g @ J[j]) / (ni * nj)))
                tgt = self.phi_hat[i][j]
                if phi < tgt:
                    coef = ni * (tgt * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - tgt**2)) / (
                        nj * math.sqrt(1 - tgt**2))
                    g = g + coef * J[j]
                    mass += abs(coef) * nj
                self.phi_hat[i][j] = (1 - self.beta) * tgt + self.beta * phi
            out += g
        return out


@settings(max_examples=30, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, min_log_scale=-6, max_log_scale=6,
                   kinds=("random", "low_rank", "rank1", "duplicate", "colinear", "opposite",
                          "zero_row", "orthogonal")),
       seed=st.integers(0, 2**31 - 1), beta=st.sampled_from([1e-2, 0.3, 0.9]))
def test_matches_literal_algorithm_over_steps(J: torch.Tensor, seed: int, beta: float) -> None:
    # (beta = 1 with colinear rows makes a target exactly 1, where the paper's correction divides
    # by sqrt(1 - phi_hat^2) = 0: see test_target_of_one_stays_finite.)
    agg, ref = GradVac(beta=beta, seed=seed), Reference(J.shape[0], beta, seed)
    rot = torch.linspace(1.0, 0.5, J.shape[1], dtype=torch.float64)
    for step in range(3):
        Jk = J * rot**step  # gradients that change between steps
        d, r = agg(Jk), ref(Jk)
        scale = float(Jk.norm(dim=1).sum())
        assert float((d - r).norm()) <= 1e-7 * scale, (step, d, r)
    phi_hat = agg.state_dict()["phi_hat"]
    assert torch.allclose(phi_hat, torch.tensor(ref.phi_hat, dtype=torch.float64), atol=1e-9)


def test_correction_reaches_the_target_cosine() -> None:
    """When phi < phi_hat the corrected g_i^PC has cosine exactly phi_hat with g_j."""
    J = torch.tensor([[1.0, 0.2, 0.0], [-0.3, 1.0, 0.5]], dtype=torch.float64)
    target = torch.tensor([[0.0, 0.6], [0.6, 0.0]], dtype=torch.float64)
    agg = GradVac(beta=0.0, seed=0)
    agg.load_state_dict({**agg.state_dict(), "phi_hat": target})
    agg(J)
    w = agg.weights
    assert w is not None
    # Two tasks: g_1^PC = g_1 + c12 g_2 and g_2^PC = g_2 + c21 g_1, so w = (1 + c21, 1 + c12).
    c12, c21 = float(w[1]) - 1, float(w[0]) - 1
    assert c12 > 0 and c21 > 0  # cos(g_1, g_2) ~ 0.1 < 0.6: both corrected
    for gpc, other in ((J[0] + c12 * J[1], J[1]), (J[1] + c21 * J[0], J[0])):
        cos = float(gpc @ other / (gpc.norm() * other.norm()))
        assert abs(cos - 0.6) < 1e-12
    # beta = 0: the targets never move.
    assert torch.equal(agg.state_dict()["phi_hat"], target)


def test_first_call_is_pcgrad_for_two_tasks() -> None:
    """phi_hat starts at 0: the first correction removes the conflict exactly as PCGrad does."""
    J = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(GradVac(seed=0)(J), PCGrad(seed=0)(J))


def test_ema_and_reset_and_task_count() -> None:
    J = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # cos = 1/sqrt(2)
    agg = GradVac(beta=0.5, seed=0)
    agg(J)
    agg(J)
    c = 1 / math.sqrt(2)
    # phi_hat = 0.5 * (0.5 * c) + 0.5 * c after two calls (no correction: phi >= target).
    expect = 0.75 * c
    assert torch.allclose(agg.state_dict()["phi_hat"],
                          torch.tensor([[0.0, expect], [expect, 0.0]], dtype=torch.float64))
    assert torch.equal(agg(J), J.sum(0))
    with pytest.raises(ValueError, match="tracking 2 tasks"):
        agg(torch.ones(3, 2))
    agg.reset()
    assert agg.state_dict()["phi_hat"] is None
    assert agg(torch.ones(3, 2)).shape == (2,)
    with pytest.raises(ValueError, match="beta must be in"):
        GradVac(beta=1.5)
    with pytest.raises(ValueError, match="eps must be"):
        GradVac(eps=-1.0)
    with pytest.raises(ValueError, match="square"):
        agg.load_state_dict({**agg.state_dict(), "phi_hat": torch.zeros(2, 3)})


def test_target_of_one_stays_finite() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    agg = GradVac(seed=0)
    agg.load_state_dict({**agg.state_dict(), "phi_hat": torch.ones(2, 2, dtype=torch.float64)})
    d = agg(J)
    assert bool(torch.isfinite(d).all())


def test_against_torchjd() -> None:
    """TorchJD 0.18's GradVac is Algorithm 1 on the Gramian; it adds eps = 1e-8 to the cosine's
    and the correction's denominators (we do not), and draws randperm(T - 1) per task from the
    global generator, like us.  Agreement to ~1e-8 over several steps on generic inputs."""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    for T in (2, 3, 6):
        Js = [torch.randn(T, 10, dtype=torch.float64, generator=gen) for _ in range(5)]
        ref_agg, ours = tj.GradVac(beta=0.3), GradVac(beta=0.3, seed=7)
        torch.manual_seed(7)
        for J in Js:
            a, b = ref_agg(J), ours(J)
            assert torch.allclose(a, b, rtol=1e-7, atol=1e-7 * float(a.abs().max())), (T, a, b)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, max_dim=10, min_log_scale=-6, max_log_scale=6),
       seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_expected_structure(J: torch.Tensor, seed: int, K: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        assert_expected_structure(GradVac(beta=0.3, seed=seed), J.to(dtype))
    assert_expected_structure(GradVac(seed=0), K)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: GradVac(beta=0.3, seed=0), DEGENERATE_MATRICES)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=5, max_dim=8, min_log_scale=-3, max_log_scale=3),
       log_s=st.floats(-6, 6), seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_positively_homogeneous(J: torch.Tensor, log_s: float, seed: int, K: torch.Tensor) -> None:
    """d(s J) = s d(J) for s > 0 with the same draws (the corrections read cosines and norm
    ratios)."""
    assert_positively_homogeneous(lambda: GradVac(beta=0.3, seed=seed), J, 10.0**log_s, rtol=1e-8,
                                  atol=1e-8 * float(J.norm(dim=1).sum()), norm=True)
    assert_positively_homogeneous(lambda: GradVac(seed=0), K, POSITIVE_SCALES,
                                  atol=1e-9 * scale_of(K))


@settings(max_examples=20, deadline=None)
@given(J=full_rank_matrices(max_tasks=5, min_dim=5, max_dim=8, min_log_scale=-3,
                              max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float], seed: int) -> None:
    """GradVac(diag(c) J) = sum_i c_i g_i^PC(J) over several steps: the cosines and the EMA
    targets do not change when rows are scaled, and each correction of g_i scales with c_i.
    (Independent rows: with colinear ones a corrected g_i cancels to rounding, where the
    choice to skip it is not scale-free.)"""
    T = J.shape[0]
    rot = torch.linspace(1.0, 0.5, J.shape[1], dtype=J.dtype)
    steps = [J * rot**k for k in range(3)]  # gradients that change between steps
    c1_, c2_ = torch.tensor(c1[:T], dtype=J.dtype), torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(lambda: GradVac(beta=0.3, seed=seed), steps, c1_, c2_,
                                atol=1e-9 * 20 * scale_of(J))


@settings(max_examples=20, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       seed=st.integers(0, 2**31 - 1), perm_seed=st.integers(0, 2**31 - 1))
def test_permutation_invariant_two_tasks(J: torch.Tensor, seed: int, perm_seed: int) -> None:
    """On the first call (targets 0, as PCGrad) the order of two tasks plays no role."""
    J = J[:2]
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    a, b = assert_permutation_invariant(lambda: GradVac(beta=0.3, seed=seed), J, perm, rtol=1e-9,
                                        atol=1e-9 * float(J.norm(dim=1).sum()), norm=True)
    wa, wb = a.weights[perm], b.weights  # the same weights, reordered
    assert_close(wa, wb, rtol=1e-6, atol=1e-9 * float(wa.abs().max() + 1))


@settings(max_examples=25, deadline=None)
@given(common_direction_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor) -> None:
    """The rows share a descent direction (0 is not in their hull): d != 0."""
    assert_nonzero_direction(GradVac(seed=0), J)
