"""RLW (Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
Learning", TMLR 2022; by default with the distribution of Yue et al., AAAI 2023, eq. 3:
w ~ U[0,1]^T normalised to sum 1) against the draws recomputed from the seed, its distribution,
the shared RandomSource, and TorchJD 0.18's Random (the softmax-of-normal variant); then its
properties, with the same draws: expected structure, positive homogeneity, linearity under
scaling (the weights do not read J), and, the weights being positive, a non-zero direction off
strong stationarity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators.rlw import RLW, RandomSource

from .._properties import (
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_linear_under_scaling,
    assert_nonzero_direction,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import (
    DEGENERATE_MATRICES,
    POSITIVE_SCALES,
    common_direction_matrices,
    controlled_matrices,
    gaussian_matrices,
    jacobians,
    non_strongly_stationary_matrices,
)


@settings(max_examples=30, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=8, min_log_scale=-6, max_log_scale=6),
       seed=st.integers(0, 2**31 - 1), dist=st.sampled_from(["uniform", "normal"]))
def test_weights_are_the_seeded_draws(J: torch.Tensor, seed: int, dist: str) -> None:
    T = J.shape[0]
    agg = RLW(dist, seed=seed)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        d = agg(J)
        if dist == "uniform":
            u = torch.rand(T, generator=g, dtype=J.dtype)
            w = u / u.sum()
        else:
            w = torch.softmax(torch.randn(T, generator=g, dtype=J.dtype), dim=0)
        assert agg.weights is not None
        assert torch.allclose(agg.weights, w, rtol=1e-15, atol=0)
        assert bool((agg.weights > 0).all()) and abs(float(agg.weights.sum()) - 1) < 1e-12
        assert torch.allclose(d, w @ J, rtol=1e-12, atol=1e-12 * float(J.abs().sum()))


def test_uniform_distribution_moments() -> None:
    """For T = 2 the first weight u1 / (u1 + u2) is symmetric about 1/2, and
    P(w1 <= t) = t / (2 (1 - t)) for t <= 1/2."""
    agg = RLW(seed=0)
    J = torch.eye(2, dtype=torch.float64)
    w1 = torch.stack([agg(J)[0] for _ in range(4000)])
    assert abs(float(w1.mean()) - 0.5) < 0.015
    # P(w1 <= 1/4) = (1/4) / (2 * 3/4) = 1/6
    assert abs(float((w1 <= 0.25).to(torch.float64).mean()) - 1 / 6) < 0.02


def test_random_source() -> None:
    src = RandomSource(seed=3)
    a = src.rand(4, dtype=torch.float64, device=torch.device("cpu"))
    state = src.state_dict()
    b = src.rand(4, dtype=torch.float64, device=torch.device("cpu"))
    src.load_state_dict(state)
    assert torch.equal(src.rand(4, dtype=torch.float64, device=torch.device("cpu")), b)
    src.reset()
    assert torch.equal(src.rand(4, dtype=torch.float64, device=torch.device("cpu")), a)
    assert src.randperm(5).sort().values.tolist() == list(range(5))
    with pytest.raises(TypeError, match="torch.Generator"):
        RandomSource(generator=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generator state is for a 'cuda'"):
        src.load_state_dict({"rng_state": state["rng_state"], "rng_device": "cuda"})
    with pytest.raises(ValueError, match="distribution must be"):
        RLW("dirichlet")  # type: ignore[arg-type]


def test_needs_neither_J_nor_G() -> None:
    """The weights do not depend on J: the same seed gives the same weights for any J."""
    a, b = RLW(seed=1), RLW(seed=1)
    a(torch.randn(3, 5))
    b(torch.zeros(3, 2))
    assert torch.equal(a.weights, b.weights)


def test_against_torchjd_random() -> None:
    """TorchJD 0.18's Random draws softmax(randn(T)) from the global generator, in the matrix's
    dtype: our distribution="normal" with the same seed gives the same weights."""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    for T in (1, 2, 5, 12):
        for dtype in (torch.float32, torch.float64):
            J = torch.randn(T, 7, generator=gen).to(dtype)
            torch.manual_seed(21)
            ref = tj.Random()(J)
            ours = RLW("normal", seed=21)(J)
            assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6), (T, dtype)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, max_dim=10, min_log_scale=-6, max_log_scale=6),
       seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_expected_structure(J: torch.Tensor, seed: int, K: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        assert_expected_structure(RLW(seed=seed), J.to(dtype))
    assert_expected_structure(RLW(seed=0), K)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: RLW(seed=0), DEGENERATE_MATRICES)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=5, max_dim=8, min_log_scale=-3, max_log_scale=3),
       log_s=st.floats(-6, 6), seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_positively_homogeneous(J: torch.Tensor, log_s: float, seed: int, K: torch.Tensor) -> None:
    """d(s J) = s d(J) for s > 0 with the same draws."""
    assert_positively_homogeneous(lambda: RLW(seed=seed), J, 10.0**log_s, rtol=1e-8,
                                  atol=1e-8 * float(J.norm(dim=1).sum()), norm=True)
    assert_positively_homogeneous(lambda: RLW(seed=0), K, POSITIVE_SCALES,
                                  atol=1e-9 * scale_of(K))


@settings(max_examples=20, deadline=None)
@given(J=controlled_matrices(max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       c1=st.lists(st.floats(0.1, 10), min_size=6, max_size=6),
       c2=st.lists(st.floats(0.1, 10), min_size=6, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_linear_under_scaling(J: torch.Tensor, c1: list[float], c2: list[float], seed: int) -> None:
    """The weights do not read J: RLW(diag(c) J) = sum_t w_t c_t g_t, linear in c (same draws)."""
    T = J.shape[0]
    c1_, c2_ = torch.tensor(c1[:T], dtype=J.dtype), torch.tensor(c2[:T], dtype=J.dtype)
    assert_linear_under_scaling(lambda: RLW(seed=seed), J, c1_, c2_, atol=1e-12 * 20 * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(non_strongly_stationary_matrices(max_tasks=6, max_dim=8))
def test_nonzero_off_strong_stationarity(J: torch.Tensor) -> None:
    """The weights are positive: sum_t w_t g_t = 0 with w > 0 only when J is strongly stationary."""
    assert_nonzero_direction(RLW(seed=0), J)


@settings(max_examples=25, deadline=None)
@given(common_direction_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor) -> None:
    """The rows share a descent direction (0 is not in their hull): d != 0."""
    assert_nonzero_direction(RLW(seed=0), J)
