"""Target update (Algorithm 1): EC(Pi) equals the scheduled value wherever Pi stays in range."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from torch_mtlgrad.mpps.ec import distribution_ec, neuron_ec
from torch_mtlgrad.mpps.target import update_target

EPS = 0.01


def reference(phi: np.ndarray, c_i: float, eps: float, per: str) -> tuple[np.ndarray, np.ndarray]:
    """Float64 loop version of Algorithm 1; returns (clipped Pi, unclipped Pi)."""
    n, t = phi.shape
    ec = np.array([1 - (row.sum() - row.max()) / (t - 1) for row in phi])
    raw = np.empty_like(phi)
    for i in range(n):
        c = ec[i] if per == "neuron" else ec.mean()
        raw[i] = 1 - (c_i / c) * (1 - phi[i])
    return np.clip(raw, eps, 1 - eps), raw


def phis(lo: float = EPS, hi: float = 1 - EPS) -> st.SearchStrategy[np.ndarray]:
    return st.tuples(st.integers(1, 15), st.integers(2, 5)).flatmap(
        lambda s: arrays(np.float64, s, elements=st.floats(lo, hi))
    )


def guests_in_range(raw: np.ndarray, phi: np.ndarray, eps: float) -> np.ndarray:
    own = phi.argmax(1)
    mask = np.ones_like(raw, dtype=bool)
    mask[np.arange(len(own)), own] = False
    inside = (raw >= eps - 1e-12) & (raw <= 1 - eps + 1e-12)
    return np.where(mask, inside, True).all(1)


@pytest.mark.parametrize("per", ["neuron", "distribution"])
@settings(max_examples=60, deadline=None)
@given(phi=phis(), c_i=st.floats(0.0, 1.0))
def test_target_matches_reference_and_hits_ec_where_in_range(
    phi: np.ndarray, c_i: float, per: str
) -> None:
    if np.all(neuron_ec(torch.from_numpy(phi)).numpy() < 1e-9):
        return  # C = 0: covered by the guard test
    (pi,) = update_target([torch.from_numpy(phi)], c_i, EPS, per)  # type: ignore[arg-type]
    ref, raw = reference(phi, c_i, EPS, per)
    np.testing.assert_allclose(pi.numpy(), ref, atol=1e-9)
    assert bool((pi >= EPS).all()) and bool((pi <= 1 - EPS).all())
    ok = guests_in_range(raw, phi, EPS)
    ec = neuron_ec(pi).numpy()
    if per == "neuron":
        np.testing.assert_allclose(ec[ok], c_i, atol=1e-9)  # every unclipped neuron hits C_i
    if ok.all():
        assert abs(distribution_ec([pi]).item() - c_i) < 1e-9


@settings(max_examples=60, deadline=None)
@given(
    data=st.tuples(st.integers(1, 12), st.integers(2, 5)).flatmap(
        lambda s: st.tuples(
            arrays(np.float64, s, elements=st.floats(EPS, 0.8)),  # guests' values
            st.lists(st.integers(0, s[1] - 1), min_size=s[0], max_size=s[0]),  # owners
            st.floats(0.3, 1.0),  # C_i as a fraction of C
        )
    ),
    per=st.sampled_from(["neuron", "distribution"]),
)
def test_ec_of_target_is_exact_when_no_guest_leaves_range(data: tuple, per: str) -> None:
    """Guests in [eps, 0.8] and k = C_i / C in [0.3, 1]: 1 - k(1 - v) stays in [eps, 0.94]."""
    guests, own, frac = data
    phi = guests.copy()
    phi[np.arange(len(own)), own] = 0.95  # a clear owner above every guest
    c = neuron_ec(torch.from_numpy(phi))
    layers = (
        [torch.from_numpy(phi[:5]), torch.from_numpy(phi[5:])]
        if len(phi) > 5
        else [torch.from_numpy(phi)]
    )
    c_all = distribution_ec(layers).item()
    c_i = frac * (float(c.min()) if per == "neuron" else c_all)
    pis = update_target(layers, c_i, EPS, per)  # type: ignore[arg-type]
    assert abs(distribution_ec(pis).item() - c_i) < 1e-9
    if per == "neuron":
        assert torch.allclose(
            torch.cat([neuron_ec(p) for p in pis]),
            torch.full((len(phi),), c_i, dtype=torch.float64),
            atol=1e-9,
        )
    for p, pi in zip(layers, pis):
        assert torch.equal(p.argmax(1), pi.argmax(1))  # ownership is kept


@pytest.mark.parametrize("per", ["neuron", "distribution"])
@pytest.mark.parametrize("c_i", [0.0, 0.3, 0.75])
def test_guard_c_zero(per: str, c_i: float) -> None:
    phi = torch.ones(6, 3, dtype=torch.float64)  # every task uses every neuron fully: C = 0
    (pi,) = update_target([phi], c_i, EPS, per)  # type: ignore[arg-type]
    assert bool(torch.isfinite(pi).all())
    assert torch.allclose(
        pi[:, 0], torch.full((6,), 1 - EPS, dtype=torch.float64)
    )  # owner (ties: task 0)
    assert torch.allclose(
        pi[:, 1:], torch.full((6, 2), min(max(1 - c_i, EPS), 1 - EPS), dtype=torch.float64)
    )
    if EPS <= 1 - c_i <= 1 - EPS:
        assert abs(distribution_ec([pi]).item() - c_i) < 1e-12


def test_guard_only_touches_dead_neurons() -> None:
    phi = torch.tensor([[1.0, 1.0], [0.9, 0.2]], dtype=torch.float64)
    (pi,) = update_target([phi], 0.5, EPS, "neuron")
    assert torch.allclose(pi[0], torch.tensor([1 - EPS, 0.5], dtype=torch.float64))
    c = 1 - 0.2
    assert torch.allclose(
        pi[1],
        torch.tensor([min(1 - 0.5 / c * 0.1, 1 - EPS), 1 - 0.5 / c * 0.8], dtype=torch.float64),
    )


def test_update_target_bad_input() -> None:
    phi = torch.rand(3, 2)
    with pytest.raises(TypeError, match="sequence"):
        update_target(phi, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheduled_ec"):
        update_target([phi], 1.5)
    with pytest.raises(ValueError, match="per"):
        update_target([phi], 0.5, per="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        update_target([phi], 0.5, eps=0.0)
    with pytest.raises(ValueError, match="at least one"):
        update_target([], 0.5)
