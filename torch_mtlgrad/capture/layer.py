"""GradNorm's route: the task gradients' norms at one shared layer only, then one weighted
backward (:mod:`.weighted`).

GradNorm (Chen et al., ICML 2018) reads ``||w_i grad_W L_i||`` at the last shared layer ``W``.
Each task's gradient of ``W`` alone is one small backward pass through the heads and that layer
(autograd walks only the part of the graph between the loss and ``W``), so the step costs ``T``
such passes plus one ordinary backward instead of ``T`` full ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .layout import FlatLayout

__all__ = ["layer_norms", "layer_params"]


def layer_params(layout: FlatLayout, columns: tuple[int, int]) -> list[Tensor] | None:
    """The shared parameters whose columns of ``J`` are exactly ``columns`` (``(start, end)``),
    or ``None`` when the range does not cover whole parameters.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> layout = FlatLayout([lin.weight, lin.bias])
        >>> [tuple(p.shape) for p in layer_params(layout, (0, 8))], layer_params(layout, (0, 5))
        ([(2, 3), (2,)], None)
    """
    start, end = columns
    chosen = [p for p, o, n in zip(layout.params, layout.offsets, layout.numels)
              if o >= start and o + n <= end]
    covered = sum(p.numel() for p in chosen)
    if not chosen or covered != end - start:
        return None
    return chosen


def layer_norms(losses: Sequence[Tensor], params: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``||grad_W L_t||`` for each loss (``[T]``, in ``dtype``), by one backward per task
    restricted to ``params``; the graph is kept for the weighted backward that follows."""
    out = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        sq = [g.to(dtype).square().sum() for g in grads if g is not None]
        out.append(torch.stack(sq).sum() if sq else torch.zeros((), dtype=dtype,
                                                                   device=loss.device))
    return torch.stack(out).sqrt()
