"""The Gramian path's math: ``G`` and ``d = w^T J`` from per-parameter gradient blocks, without
``J``.

A batched backward pass yields, for each shared parameter ``i``, the block ``J_i`` (``[T, n_i]``,
the columns of ``J`` that belong to it).  Then ``G = J J^T = sum_i J_i J_i^T`` and the direction's
part for parameter ``i`` is ``w^T J_i``: an aggregator whose direction is ``w^T J`` with weights
read from ``G`` (or from the losses only) never needs ``J`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["block_matrices", "block_row_norms", "gramian_of_blocks", "weighted_blocks"]


def block_matrices(blocks: Sequence[Tensor | None], num_tasks: int,
                   dtype: torch.dtype) -> list[Tensor | None]:
    """Each block ``[T, *shape]`` as a ``[T, n_i]`` matrix in ``dtype`` (``None`` stays)."""
    return [None if g is None else g.reshape(num_tasks, -1).to(dtype) for g in blocks]


def gramian_of_blocks(mats: Sequence[Tensor | None], num_tasks: int, dtype: torch.dtype,
                      device: torch.device) -> Tensor:
    """``G = sum_i J_i J_i^T`` (``[T, T]``).

    Example:
        >>> J = torch.randn(3, 5)
        >>> G = gramian_of_blocks([J[:, :2], None, J[:, 2:]], 3, J.dtype, J.device)
        >>> torch.allclose(G, J @ J.T)
        True
    """
    G = torch.zeros(num_tasks, num_tasks, dtype=dtype, device=device)
    for m in mats:
        if m is not None:
            G.addmm_(m, m.T)
    return G


def weighted_blocks(w: Tensor, mats: Sequence[Tensor | None], outs: Sequence[Tensor]) -> None:
    """``outs[i] <- w^T J_i`` (zeros where a block is ``None``), written in place: the direction
    ``d = w^T J`` parameter by parameter, with no ``[D]`` temporary.

    Example:
        >>> J = torch.randn(2, 3); w = torch.tensor([0.5, 2.0]); d = torch.empty(3)
        >>> weighted_blocks(w, [J[:, :1], J[:, 1:]], [d[:1], d[1:]])
        >>> torch.allclose(d, w @ J)
        True
    """
    for m, out in zip(mats, outs):
        if m is None:
            out.zero_()
        else:
            torch.mm(w[None], m, out=out[None])


def block_row_norms(mats: Sequence[Tensor | None], num_tasks: int, dtype: torch.dtype,
                    device: torch.device) -> Tensor:
    """``[T, P]``: the norm of each task's gradient of each parameter."""
    return torch.stack([torch.zeros(num_tasks, dtype=dtype, device=device) if m is None
                        else m.norm(dim=1) for m in mats], dim=1)
