"""Checks shared by the loss-based weightings' tests (DWA, FAMO, GradNorm)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def check_scale_free_and_permutation_equivariant(make: Callable[[], Any], J: torch.Tensor,
                                                 log_loss: float, rnd) -> None:
    """Four steps of three fresh weightings from ``make``: the outputs are finite, permuting the
    tasks leaves the direction unchanged, and scaling every loss by 10**log_loss changes no
    weight."""
    T = J.shape[0]
    perm = list(range(T))
    rnd.shuffle(perm)
    a, b, c = make(), make(), make()
    for step in range(4):
        L = torch.linspace(1.0, 3.0, T, dtype=J.dtype) ** (-step) + 0.1 * step
        da, db = a(J, L), b(J[perm], L[perm])
        c(J, L * 10.0**log_loss)
        assert bool(torch.isfinite(da).all())
        assert torch.allclose(da, db, rtol=1e-12, atol=1e-12 * float(J.abs().max()))
        assert torch.allclose(a.weights, c.weights, rtol=1e-9)


def check_state_dict_roundtrip(make: Callable[[], Any], seed: int, steps: int,
                               split: int) -> tuple[Any, Any]:
    """Run ``split`` of ``steps`` random (J [3, 4], L [3]) steps, load the state into a fresh
    weighting, and check both give identical outputs on the rest; returns the two weightings."""
    rng = np.random.default_rng(seed)
    data = [(torch.tensor(rng.standard_normal((3, 4))), torch.tensor(rng.uniform(0.1, 2, 3)))
            for _ in range(steps)]
    a = make()
    for J, L in data[:split]:
        a(J, L)
    b = make()
    b.load_state_dict(a.state_dict())
    for J, L in data[split:]:
        assert torch.equal(a(J, L), b(J, L))
    return a, b
