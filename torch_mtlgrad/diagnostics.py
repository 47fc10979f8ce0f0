"""Per-step diagnostics of the task gradients and the combined direction: what users plot.

All functions read ``G = J J^T`` (and ``J d``) and return tensors on the same device, without
synchronising with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["angles_to", "cosine_matrix", "gramian_step_diagnostics", "step_diagnostics"]


def _safe(x: Tensor) -> Tensor:
    return x.clamp_min(torch.finfo(x.dtype).tiny)


def cosine_matrix(G: Tensor) -> Tensor:
    """Pairwise cosines ``G_ij / (||g_i|| ||g_j||)`` from a Gramian ``[..., T, T]`` (batched over
    leading dimensions, e.g. one Gramian per module); 0 where a gradient is zero.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> cosine_matrix(J @ J.T)
        tensor([[1.0000, 0.7071],
                [0.7071, 1.0000]])
    """
    n = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    den = n[..., :, None] * n[..., None, :]
    cos = torch.where(den > 0, G / _safe(den), torch.zeros_like(G))
    return cos.clamp(-1, 1)


def angles_to(Jd: Tensor, norms: Tensor, d_norm: Tensor) -> Tensor:
    """Angles in degrees between each task gradient and a direction ``d``, from ``J d``.

    A zero gradient or a zero direction gives 90 degrees.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); d = torch.tensor([1.0, 1.0])
        >>> angles_to(J @ d, J.norm(dim=1), d.norm())
        tensor([45., 45.])
    """
    cos = Jd / _safe(norms * d_norm)
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def step_diagnostics(J: Tensor, d: Tensor, weights: Tensor | None) -> dict[str, Tensor]:
    """The optimizer's per-step diagnostics: task weights, gradient norms, pairwise cosines,
    each task gradient's angle to the final direction, and the direction's norm."""
    G = J @ J.T
    norms = torch.diagonal(G).clamp_min(0).sqrt()
    d_norm = d.norm()
    out = {
        "grad_norms": norms,
        "cosine": cosine_matrix(G),
        "angle": angles_to(J @ d, norms, d_norm),
        "direction_norm": d_norm,
    }
    if weights is not None:
        out["weights"] = weights
    return out


def gramian_step_diagnostics(G: Tensor, weights: Tensor) -> dict[str, Tensor]:
    """:func:`step_diagnostics` for ``d = w^T J`` from ``G = J J^T`` and ``w`` alone:
    ``J d = G w`` and ``||d||^2 = w^T G w``.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); w = torch.tensor([0.5, 0.5])
        >>> a, b = gramian_step_diagnostics(J @ J.T, w), step_diagnostics(J, w @ J, w)
        >>> all(torch.allclose(a[k], b[k]) for k in b)
        True
    """
    norms = torch.diagonal(G).clamp_min(0).sqrt()
    Gw = G @ weights
    d_norm = (weights @ Gw).clamp_min(0).sqrt()
    return {
        "grad_norms": norms,
        "cosine": cosine_matrix(G),
        "angle": angles_to(Gw, norms, d_norm),
        "direction_norm": d_norm,
        "weights": weights,
    }
