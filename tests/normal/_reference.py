"""Independent float64 references for the NORMAL tests (written from the equations, not the library)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mlp_fc(seq: torch.nn.Sequential, z: Tensor, slope: float) -> Tensor:
    """FC -> LeakyReLU -> FC from the weights of ``seq``, in float64, by hand."""
    W1, b1 = seq[0].weight.detach().double(), seq[0].bias.detach().double()
    W2, b2 = seq[2].weight.detach().double(), seq[2].bias.detach().double()
    h = z @ W1.T + b1
    h = torch.where(h >= 0, h, slope * h)
    return h @ W2.T + b2


def heavy_ball_euler(block, z0: Tensor, p: float, h: float, slope: float = 0.01):
    """(z(p), q(p)) by explicit Euler for eq. (5): ceil(|p|/h) steps, full steps of size h then
    the remainder, backwards in time for p < 0.  float64; returns tensors without graph."""
    gamma = 1.0 / (1.0 + math.exp(-float(block.omega.detach())))
    xi = block.xi
    z = z0.detach().double()
    q = mlp_fc(block.u, z, slope)
    sign = 1.0 if p >= 0 else -1.0
    remaining = abs(p)
    while remaining > 1e-12:
        s = min(h, remaining)
        if remaining - s < 1e-12 * max(1.0, abs(p)):  # last (partial) step
            s = remaining
        dq = -gamma * q + mlp_fc(block.g, z, slope) + xi * z
        z, q = z - sign * s * q, q + sign * s * dq
        remaining -= s
    return z, q
