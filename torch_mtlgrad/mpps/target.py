"""Target-distribution update of MPPS (Algorithm 1, last two lines; problem (4)).

At the end of each course the target ``Pi`` is rebuilt from the learnt ``Phi`` by rescaling its
remaining capacity so that its exclusive capacity equals the scheduler's value ``C_i``::

    C  <- EC(Phi)                       (with the (T - 1) normalisation of paper section 3.3)
    Pi <- 1 - (C_i / C) (1 - Phi)       then clipped to [eps, 1 - eps].

Why this hits ``C_i``: for ``k = C_i / C > 0`` the map ``v -> 1 - k (1 - v)`` is increasing, so a
neuron keeps its owner, and its EC is ``mean_guests(1 - Pi_g) = k mean_guests(1 - Phi_g) =
k EC(Phi)``.  Hence ``EC(Pi) = C_i`` exactly wherever no guest entry of ``Pi`` had to be clipped
(clipping the owner entry to ``1 - eps`` never changes the EC, since the owner stays the maximum).
Guest entries leave ``[eps, 1 - eps]`` (and are clipped, so ``EC(Pi) != C_i``) when ``C_i > C``,
i.e. when ``Phi`` drifted below the scheduled EC, or when ``C_i`` is so close to 0 or 1 that
``eps`` itself is out of reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .ec import _check_phi, neuron_ec

__all__ = ["update_target"]

Granularity = Literal["neuron", "distribution"]


def _rescale(phi: Tensor, c: Tensor, c_target: float) -> Tensor:
    """``1 - (c_target / c)(1 - phi)`` where ``c > tiny``; the guard (see update_target) elsewhere."""
    tiny = torch.finfo(phi.dtype).eps
    dead = c <= tiny  # no exclusive capacity left to rescale
    k = c_target / torch.where(dead, torch.ones_like(c), c)
    pi = 1.0 - k.unsqueeze(-1) * (1.0 - phi)
    if bool(dead.any()):
        # Guard C = 0: every guest already uses the neuron fully, so 1 - Phi is 0 on the guests and
        # no rescaling can produce EC C_i.  Spread C_i evenly instead: the owner keeps the neuron
        # (Pi = 1, clipped to 1 - eps) and every guest gets Pi = 1 - C_i, whose EC is C_i.
        onehot = torch.nn.functional.one_hot(phi.argmax(-1), phi.shape[-1]).to(torch.bool)
        even = torch.where(onehot, torch.ones_like(phi), torch.full_like(phi, 1.0 - c_target))
        pi = torch.where(dead.unsqueeze(-1), even, pi)
    return pi


def update_target(
    phis: Sequence[Tensor],
    scheduled_ec: float,
    eps: float = 0.01,
    per: Granularity = "neuron",
) -> list[Tensor]:
    """New target ``Pi`` for every layer from the learnt ``Phi`` (Algorithm 1; problem (4)).

    Args:
        phis: per layer, the ``[N_l, T]`` probabilities ``Phi`` after the course.
        scheduled_ec: ``C_i`` in ``[0, 1]``, the EC the next course's target must have.
        eps: the clip range ``[eps, 1 - eps]`` of ``Pi`` (the initialisation's ``eps``).
        per: ``"neuron"`` (default, Algorithm 1 literally: ``C`` is each neuron's own EC, so every
            unclipped neuron of ``Pi`` has EC exactly ``C_i``) or ``"distribution"`` (``C`` is the
            EC of the whole distribution, one factor for all neurons, so the relative exclusivity
            of neurons is kept and the *mean* EC is ``C_i``).

    Guard ``C = 0`` (checked as ``C <= finfo.eps``): with ``per="neuron"`` a neuron that every
    task uses fully gets its owner at ``1 - eps`` and every guest at ``1 - C_i``; with
    ``per="distribution"`` the same is done for all neurons when the whole distribution has
    ``C = 0``.  This gives EC ``C_i`` (when ``1 - C_i`` is in range) instead of dividing by zero.

    Returns:
        per layer, ``Pi`` in ``[eps, 1 - eps]``, same shapes, dtypes and devices, no gradient.

    Example:
        >>> from torch_mtlgrad.mpps.masks import exclusive_phi
        >>> from torch_mtlgrad.mpps.ec import distribution_ec
        >>> phi = torch.tensor([[0.9, 0.3, 0.2], [0.1, 0.95, 0.4]])
        >>> pi = update_target([phi], 0.5)
        >>> round(distribution_ec(pi).item(), 6)
        0.5
    """
    if isinstance(phis, Tensor):
        raise TypeError(
            "phis must be a sequence of per-layer tensors; wrap a single tensor in a list"
        )
    if len(phis) == 0:
        raise ValueError("update_target needs at least one layer")
    for i, p in enumerate(phis):
        _check_phi(p, f"phis[{i}]")
        if p.dim() != 2:
            raise ValueError(f"phis[{i}] must have shape [N, T], got {tuple(p.shape)}")
    c_target = float(scheduled_ec)
    if not (0.0 <= c_target <= 1.0):
        raise ValueError(f"scheduled_ec must lie in [0, 1], got {scheduled_ec!r}")
    if not (0.0 < float(eps) < 0.5):
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
    if per not in ("neuron", "distribution"):
        raise ValueError(f"per must be 'neuron' or 'distribution', got {per!r}")
    out: list[Tensor] = []
    with torch.no_grad():
        if per == "distribution":
            c_all = torch.cat([neuron_ec(p.detach()).reshape(-1) for p in phis]).mean()
        for p in phis:
            p = p.detach()
            if per == "neuron":
                c = neuron_ec(p)
            else:
                c = c_all.expand(p.shape[0])
            out.append(_rescale(p, c, c_target).clamp(float(eps), 1.0 - float(eps)))
    return out
