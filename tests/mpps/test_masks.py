"""Mask families: exclusive init, KL (vs torch.distributions), log-probs, sample statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.distributions import Bernoulli, Normal
from torch.distributions import kl_divergence as td_kl

from torch_mtlgrad.mpps.masks import (
    bernoulli_log_prob,
    exclusive_phi,
    gaussian_scale,
    kl_bernoulli,
    kl_divergence,
    kl_gaussian,
    logit,
    owners,
    sample_masks,
)

probs = st.floats(0.001, 0.999, allow_nan=False)
prob_lists = st.lists(st.tuples(probs, probs), min_size=1, max_size=20)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), t=st.integers(2, 7), eps=st.floats(0.001, 0.2))
def test_exclusive_phi_partitions_layer(n: int, t: int, eps: float) -> None:
    phi = exclusive_phi(n, t, eps, dtype=torch.float64)
    assert phi.shape == (n, t)
    own = owners(phi)
    # each neuron: owner at 1 - eps, every guest at eps
    assert torch.allclose(phi.max(-1).values, torch.full((n,), 1 - eps, dtype=torch.float64))
    assert torch.allclose(
        (phi.sum(-1) - phi.max(-1).values), torch.full((n,), (t - 1) * eps, dtype=torch.float64)
    )
    # contiguous parts of equal size (within one), in task order
    assert bool((own[1:] >= own[:-1]).all())
    counts = torch.bincount(own, minlength=t)
    if n >= t:
        assert int(counts.max() - counts.min()) <= 1
    else:
        assert int(counts.max()) <= 1


def test_exclusive_phi_bad_input() -> None:
    with pytest.raises(ValueError, match="num_tasks"):
        exclusive_phi(4, 1)
    with pytest.raises(ValueError, match="eps"):
        exclusive_phi(4, 2, eps=0.6)
    with pytest.raises(ValueError, match="num_neurons"):
        exclusive_phi(0, 2)


@settings(max_examples=40, deadline=None)
@given(pairs=prob_lists)
def test_kl_bernoulli_matches_torch_distributions(pairs: list[tuple[float, float]]) -> None:
    q = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    p = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    ref = td_kl(Bernoulli(probs=q, validate_args=False), Bernoulli(probs=p, validate_args=False))
    assert torch.allclose(kl_bernoulli(logit(q), logit(p)), ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(
        kl_divergence("bernoulli", logit(q), logit(p)), ref, rtol=1e-9, atol=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(pairs=prob_lists)
def test_kl_gaussian_matches_torch_distributions(pairs: list[tuple[float, float]]) -> None:
    q = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    p = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    rq, rp = torch.sqrt((1 - q) / q), torch.sqrt((1 - p) / p)  # r(v) of the paper, directly
    ref = td_kl(
        Normal(torch.ones_like(q), rq, validate_args=False),
        Normal(torch.ones_like(p), rp, validate_args=False),
    )
    assert torch.allclose(kl_gaussian(logit(q), logit(p)), ref, rtol=1e-8, atol=1e-10)
    assert torch.allclose(kl_divergence("gaussian", logit(q), logit(p)), ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("family", ["bernoulli", "gaussian"])
@settings(max_examples=40, deadline=None)
@given(a=st.floats(-8, 8), b=st.floats(-8, 8))
@example(a=1e-09, b=0.0)  # rounding once gave -5.5e-17 here (Bernoulli)
def test_kl_zero_iff_distributions_match(family: str, a: float, b: float) -> None:
    qa = torch.tensor([a], dtype=torch.float64)
    pb = torch.tensor([b], dtype=torch.float64)
    assert kl_divergence(family, qa, qa).item() == 0.0
    kl = kl_divergence(family, qa, pb).item()
    assert kl >= 0.0
    if abs(a - b) >= 1e-3:
        assert kl > 0.0
    else:
        assert kl < 1e-5


@settings(max_examples=30, deadline=None)
@given(ps=st.lists(probs, min_size=1, max_size=10))
def test_bernoulli_log_prob_matches_torch(ps: list[float]) -> None:
    p = torch.tensor(ps, dtype=torch.float64)
    for m in (torch.zeros_like(p), torch.ones_like(p)):
        ref = Bernoulli(probs=p, validate_args=False).log_prob(m)
        assert torch.allclose(bernoulli_log_prob(m, logit(p)), ref, rtol=1e-9, atol=1e-12)


def test_bernoulli_score_is_m_minus_phi() -> None:
    a = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    (g,) = torch.autograd.grad(bernoulli_log_prob(m, a).sum(), a)
    assert torch.allclose(g, m - torch.sigmoid(a.detach()))


def test_gaussian_scale_is_r_of_phi() -> None:
    p = torch.linspace(0.01, 0.99, 17, dtype=torch.float64)
    assert torch.allclose(gaussian_scale(logit(p)), torch.sqrt((1 - p) / p))


def _many_draws(phi: torch.Tensor, is_owner: torch.Tensor, family: str, k: int) -> torch.Tensor:
    """k draws per neuron in one call: the neurons repeated k times."""
    g = torch.Generator().manual_seed(1234)
    m = sample_masks(logit(phi).repeat(k), is_owner.repeat(k), family, g)  # type: ignore[arg-type]
    return m.reshape(k, -1)


def test_bernoulli_mask_statistics_match_phi() -> None:
    phi = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.4], dtype=torch.float64)
    is_owner = torch.tensor([False] * 7 + [True])
    k = 40000
    m = _many_draws(phi, is_owner, "bernoulli", k)
    assert bool(((m == 0) | (m == 1)).all())
    assert bool((m[:, 7] == 1).all())  # the owner always uses its neuron
    mean = m[:, :7].mean(0)
    se = torch.sqrt(phi[:7] * (1 - phi[:7]) / k)
    assert bool(((mean - phi[:7]).abs() <= 5 * se + 1e-12).all()), (mean, phi)


def test_gaussian_mask_statistics_match_r_squared() -> None:
    phi = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95, 0.3], dtype=torch.float64)
    is_owner = torch.tensor([False] * 5 + [True])
    k = 40000
    m = _many_draws(phi, is_owner, "gaussian", k)
    assert bool((m[:, 5] == 1).all())
    r2 = (1 - phi[:5]) / phi[:5]
    mean, var = m[:, :5].mean(0), m[:, :5].var(0)
    assert bool(((mean - 1).abs() <= 5 * torch.sqrt(r2 / k)).all()), mean
    # var of the sample variance of a normal: 2 sigma^4 / (k - 1)
    assert bool(((var - r2).abs() <= 5 * r2 * math.sqrt(2 / (k - 1))).all()), (var, r2)


def test_gaussian_mask_is_reparameterised() -> None:
    a = torch.tensor([0.2, -1.0, 1.5], dtype=torch.float64, requires_grad=True)
    g1 = torch.Generator().manual_seed(7)
    m = sample_masks(a, torch.zeros(3, dtype=torch.bool), "gaussian", g1)
    z = torch.randn(3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.allclose(m, 1 + torch.exp(-a.detach() / 2) * z)
    (g,) = torch.autograd.grad(m.sum(), a)
    assert torch.allclose(g, -0.5 * torch.exp(-a.detach() / 2) * z)


def test_sample_masks_bad_input() -> None:
    with pytest.raises(ValueError, match="family"):
        sample_masks(torch.zeros(3), torch.zeros(3, dtype=torch.bool), "uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        sample_masks(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.bool), "bernoulli")
