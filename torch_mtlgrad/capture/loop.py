"""The per-task loop: one ``autograd.grad`` per task, each row of ``J`` filled as it comes.

On CUDA each row is written by one launch of the fused row kernel (copy + cast + non-finite
count + per-parameter squared norms, :func:`~torch_mtlgrad.capture._kernels.fill_row_fused`),
elsewhere by one multi-tensor copy.  No host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._kernels import RowStats, fill_row_fused
from .compiled import through_compiled
from .layout import FlatLayout

__all__ = ["Acc", "accumulate", "capture_loop", "wanted_stats"]

Acc = list[Tensor | None]


def accumulate(acc: Acc, grads: Sequence[Tensor | None], reduce_batch: bool = False) -> None:
    """``acc[i] += grads[i]`` (``None`` is no gradient); ``reduce_batch`` first sums a batched
    gradient over its leading task dimension."""
    for i, g in enumerate(grads):
        if g is None:
            continue
        if reduce_batch:
            g = g.sum(0)
        acc[i] = g if acc[i] is None else acc[i] + g


def wanted_stats(stats: RowStats | None) -> dict[str, bool]:
    """Which row statistics to compute: those ``stats`` has buffers for."""
    return {"norms": stats is not None and stats.sq_norms is not None,
            "check": stats is not None and stats.nonfinite is not None}


@through_compiled
def capture_loop(losses: Sequence[Tensor], layout: FlatLayout, specific: Sequence[Tensor], J: Tensor,
                 retain_graph: bool = False,
                 stats: RowStats | None = None) -> tuple[Acc, list[int]]:
    """Row ``t`` of ``J`` <- gradient of ``losses[t]``; returns (summed specific grads, zero-row tasks).

    Example:
        >>> lin = torch.nn.Linear(2, 1); x = torch.randn(4, 2)
        >>> losses = [lin(x).sum(), (2 * lin(x)).sum()]
        >>> J = torch.empty(2, 3)
        >>> acc, zero = capture_loop(losses, FlatLayout(list(lin.parameters())), [], J)
        >>> torch.allclose(J[1], 2 * J[0]), zero
        (True, [])
    """
    shared = layout.params
    inputs = [*shared, *specific]
    n = len(shared)
    acc: Acc = [None] * len(specific)
    zero_rows = []
    T = len(losses)
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss.reshape(()), inputs, retain_graph=retain_graph or t < T - 1,
                                    allow_unused=True)
        if all(g is None for g in grads[:n]):
            zero_rows.append(t)
        fill_row_fused(layout, J[t], grads[:n], out=None if stats is None else stats.row(t),
                       **wanted_stats(stats))
        accumulate(acc, grads[n:])
    return acc, zero_rows
