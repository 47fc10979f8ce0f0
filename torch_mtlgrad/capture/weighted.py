"""The loss-only route: for methods whose direction is ``w^T J`` with weights that read only the
loss values (or nothing), ``w^T J`` is the gradient of ``sum_t w_t L_t``, so one ordinary
backward pass serves the step and ``J`` is never built.

Task-specific parameters still get the plain sum of their task gradients: with weights other
than one they take a second, cheap backward of ``sum_t L_t`` restricted to them (autograd then
walks only the heads' part of the graph).  With unit weights (the ``"sum"`` method) the one pass
is ``sum(losses)`` itself, the same graph as ``sum(losses).backward()``: the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .layout import FlatLayout
from .loop import Acc

__all__ = ["capture_weighted"]


def capture_weighted(losses: Sequence[Tensor], weights: Sequence[Tensor] | None, layout: FlatLayout,
                     specific: Sequence[Tensor], retain_graph: bool,
                     scale: Callable[[Tensor], Tensor] | None = None) -> tuple[Acc, Acc]:
    """The new gradients of the shared parameters (of ``sum_t weights[t] * losses[t]``) and of
    the task-specific ones (of ``sum_t losses[t]``); ``weights=None``: unit weights, one pass.
    ``None`` marks a parameter no loss reaches.  ``scale``: GradScaler's ``scale``, applied to
    the sums as in the plain recipe ``scaler.scale(sum(losses)).backward()``.

    Example:
        >>> lin = torch.nn.Linear(2, 1); x = torch.randn(4, 2)
        >>> losses = [lin(x).sum(), (2 * lin(x)).sum()]
        >>> shared, _ = capture_weighted(losses, None, FlatLayout([lin.weight]), [], False)
        >>> ref = torch.autograd.grad(lin(x).sum() * 3, lin.weight)[0]
        >>> torch.allclose(shared[0], ref)
        True
    """
    shared = list(layout.params)
    n = len(shared)
    total = sum(losses)  # the same expression a user writes, so the same graph and bits
    assert isinstance(total, Tensor)
    if scale is not None:
        total = scale(total)
    if weights is None:
        grads = torch.autograd.grad(total, [*shared, *specific], retain_graph=retain_graph,
                                    allow_unused=True)
        return list(grads[:n]), list(grads[n:])
    weighted = sum(w * loss for w, loss in zip(weights, losses))
    assert isinstance(weighted, Tensor)
    if scale is not None:
        weighted = scale(weighted)
    g_shared = torch.autograd.grad(weighted, shared, retain_graph=retain_graph or bool(specific),
                                   allow_unused=True)
    g_specific: tuple[Tensor | None, ...] = ()
    if specific:
        g_specific = torch.autograd.grad(total, list(specific), retain_graph=retain_graph,
                                         allow_unused=True)
    return list(g_shared), list(g_specific)
