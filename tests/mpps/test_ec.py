"""Exclusive capacity: bounds, extremes, references, share matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from torch_mtlgrad.mpps.ec import distribution_ec, layer_ec, neuron_ec, task_shares
from torch_mtlgrad.mpps.masks import exclusive_phi


def phi_arrays(max_n: int = 12, max_t: int = 6) -> st.SearchStrategy[np.ndarray]:
    return st.tuples(st.integers(1, max_n), st.integers(2, max_t)).flatmap(
        lambda s: arrays(np.float64, s, elements=st.floats(0.0, 1.0))
    )


def ec_reference(phi: np.ndarray) -> np.ndarray:
    """1 - mean usage by the T - 1 guests: sort each neuron descending, drop the owner."""
    s = -np.sort(-phi, axis=1)
    return 1.0 - s[:, 1:].mean(axis=1)


@settings(max_examples=60, deadline=None)
@given(phi=phi_arrays())
def test_neuron_ec_bounds_and_reference(phi: np.ndarray) -> None:
    ec = neuron_ec(torch.from_numpy(phi))
    assert bool((ec >= -1e-12).all()) and bool((ec <= 1 + 1e-12).all())
    np.testing.assert_allclose(ec.numpy(), ec_reference(phi), rtol=0, atol=1e-12)
    assert abs(layer_ec(torch.from_numpy(phi)).item() - ec_reference(phi).mean()) < 1e-12


@settings(max_examples=40, deadline=None)
@given(phi=phi_arrays(), seed=st.integers(0, 1000))
def test_ec_is_invariant_to_task_order(phi: np.ndarray, seed: int) -> None:
    perm = np.random.default_rng(seed).permutation(phi.shape[1])
    a, b = neuron_ec(torch.from_numpy(phi)), neuron_ec(torch.from_numpy(phi[:, perm].copy()))
    assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("t", [2, 3, 5])
def test_ec_extremes(t: int) -> None:
    onehot = torch.eye(t, dtype=torch.float64).repeat(3, 1)  # each neuron used by one task only
    assert torch.equal(neuron_ec(onehot), torch.ones(3 * t, dtype=torch.float64))
    full = torch.ones(4, t, dtype=torch.float64)  # hard parameter sharing
    assert torch.equal(neuron_ec(full), torch.zeros(4, dtype=torch.float64))
    assert abs(layer_ec(exclusive_phi(10, t, 0.01, torch.float64)).item() - 0.99) < 1e-12
    # uniform usage v by everyone gives 1 - v
    assert torch.allclose(
        neuron_ec(torch.full((2, t), 0.3, dtype=torch.float64)),
        torch.full((2,), 0.7, dtype=torch.float64),
    )


@settings(max_examples=30, deadline=None)
@given(a=phi_arrays(max_t=3), b=phi_arrays(max_t=3))
def test_distribution_ec_weights_every_neuron_once(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        b = np.resize(b, (b.shape[0], a.shape[1]))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ref = np.concatenate([ec_reference(a), ec_reference(b)]).mean()
    assert abs(distribution_ec([ta, tb]).item() - ref) < 1e-12
    assert abs(distribution_ec(ta).item() - ec_reference(a).mean()) < 1e-12


@settings(max_examples=40, deadline=None)
@given(phi=phi_arrays())
def test_task_shares_reference(phi: np.ndarray) -> None:
    s = task_shares(torch.from_numpy(phi)).numpy()
    own = phi.argmax(1)
    for o in range(phi.shape[1]):
        rows = phi[own == o]
        if len(rows) == 0:
            assert np.isnan(s[o]).all()
        else:
            np.testing.assert_allclose(s[o], rows.mean(0), atol=1e-12)


def test_ec_bad_input() -> None:
    with pytest.raises(ValueError, match="T >= 2"):
        neuron_ec(torch.ones(3, 1))
    with pytest.raises(TypeError):
        neuron_ec(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one"):
        distribution_ec([])
