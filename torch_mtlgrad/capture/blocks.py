"""The Gramian path's capture: per-parameter gradient blocks ``[T, *shape]`` of one batched pass,
without writing ``J`` (for aggregators whose direction is ``w^T J`` with weights from ``G``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._kernels import fill_rows_fused
from .batched import batched_grad, one_hot_rows
from .compiled import through_compiled
from .feature import feature_gradients
from .layout import FlatLayout
from .loop import Acc, accumulate

__all__ = ["batched_shared_grads", "jacobian_from_blocks"]


@through_compiled
def batched_shared_grads(losses: Sequence[Tensor], layout: FlatLayout, specific: Sequence[Tensor],
                         features: Tensor | None = None,
                         retain_graph: bool = False) -> tuple[list[Tensor | None], Acc]:
    """Every task's gradient of each shared parameter, batched (``[T, *shape]``, ``None`` if no
    task reaches it), from one batched pass without writing ``J``; and the summed specific grads.

    With ``features`` the pass is the feature mode's (heads per task, then one batched VJP
    through the encoder), else the batched mode's.  The blocks are ``J``'s columns parameter by
    parameter: the Gramian path reads ``G`` and ``d = w^T J`` from them directly.
    """
    T = len(losses)
    n = len(layout.params)
    if features is None:
        L = torch.stack([loss.reshape(()) for loss in losses])
        grads = batched_grad(L, [*layout.params, *specific], one_hot_rows(0, T, T, L), retain_graph)
        acc: Acc = [None] * len(specific)
        accumulate(acc, grads[n:], reduce_batch=True)
        return list(grads[:n]), acc
    Z, acc = feature_gradients(losses, features, specific, features.dtype)
    return list(batched_grad(features, layout.params, Z, retain_graph)), acc


def jacobian_from_blocks(layout: FlatLayout, J: Tensor, blocks: Sequence[Tensor | None]) -> None:
    """``J`` (``[T, D]``) <- the per-parameter blocks, for when the Gramian path needs ``J`` after
    all (to trace a non-finite value)."""
    fill_rows_fused(layout, J, blocks, norms=False, check=False)
