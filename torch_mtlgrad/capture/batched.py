"""One batched backward over the whole graph (over the task dimension), in chunks of tasks.

* :func:`capture_batched`: all rows of ``J`` from batched passes.
* :func:`batched_grad`: the batched vector-Jacobian product both use (and the feature mode).

They give the same ``J`` as the loop up to float rounding (tested).  No host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._kernels import RowStats, fill_rows_fused
from .compiled import explain_batched_failure, through_compiled
from .layout import FlatLayout
from .loop import Acc, accumulate, wanted_stats

__all__ = ["batched_grad", "capture_batched", "chunks", "one_hot_rows",
           "write_rows"]


def chunks(T: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(T)`` in pieces of at most ``chunk_size``.

    Example:
        >>> chunks(5, 2), chunks(3, None)
        ([(0, 2), (2, 4), (4, 5)], [(0, 3)])
    """
    size = T if chunk_size is None else max(1, int(chunk_size))
    return [(a, min(T, a + size)) for a in range(0, T, size)]


def batched_grad(outputs: Tensor, inputs: Sequence[Tensor], grad_outputs: Tensor,
                 retain_graph: bool) -> tuple[Tensor | None, ...]:
    """Gradients of ``<outputs, grad_outputs[k]>`` for every ``k`` (batched along dim 0) with
    respect to ``inputs``; ``None`` for unused inputs.

    Two implementations, chosen by device because each measured the faster one there
    (the documentation's Performance page): on CUDA ``torch.vmap`` over ``autograd.grad`` (as
    TorchJD runs it); elsewhere ``autograd.grad(..., is_grads_batched=True)`` (PyTorch's own
    batching rule per backward op).  Neither runs through a ``torch.compile``'d region: the
    error then says so (:func:`~.compiled.explain_batched_failure`).
    """
    try:
        return _batched_grad(outputs, inputs, grad_outputs, retain_graph)
    except (RuntimeError, NotImplementedError) as err:
        raise explain_batched_failure(err, outputs) from err


def _batched_grad(outputs: Tensor, inputs: Sequence[Tensor], grad_outputs: Tensor,
                  retain_graph: bool) -> tuple[Tensor | None, ...]:
    if grad_outputs.device.type != "cuda":
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                                    allow_unused=True, is_grads_batched=True)
        return tuple(grads)
    unused: list[int] = []

    def vjp(go: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(outputs, inputs, go, retain_graph=retain_graph,
                                    allow_unused=True)
        unused[:] = [i for i, g in enumerate(grads) if g is None]
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))

    out = torch.vmap(vjp)(grad_outputs)
    return tuple(None if i in unused else g for i, g in enumerate(out))


def one_hot_rows(a: int, b: int, T: int, like: Tensor) -> Tensor:
    """Rows ``a:b`` of the ``T x T`` identity (the batched pass's grad_outputs for tasks a..b-1)."""
    eye = torch.zeros(b - a, T, dtype=like.dtype, device=like.device)
    eye[:, a:b] = torch.eye(b - a, dtype=like.dtype, device=like.device)
    return eye


def write_rows(layout: FlatLayout, J: Tensor, a: int, b: int, grads: Sequence[Tensor | None],
               stats: RowStats | None = None) -> None:
    """Rows ``a:b`` of ``J`` <- batched per-parameter gradients ``[b - a, *shape]``."""
    fill_rows_fused(layout, J[a:b], grads, out=None if stats is None else stats.rows(a, b),
                    **wanted_stats(stats))


@through_compiled
def capture_batched(losses: Sequence[Tensor], layout: FlatLayout, specific: Sequence[Tensor], J: Tensor,
                    retain_graph: bool = False, chunk_size: int | None = None,
                    stats: RowStats | None = None) -> Acc:
    """All rows of ``J`` from batched backward passes (one per chunk of tasks); returns the
    summed task-specific gradients."""
    L = torch.stack([loss.reshape(()) for loss in losses])
    T = L.shape[0]
    shared = layout.params
    inputs = [*shared, *specific]
    n = len(shared)
    acc: Acc = [None] * len(specific)
    parts = chunks(T, chunk_size)
    for k, (a, b) in enumerate(parts):
        grads = batched_grad(L, inputs, one_hot_rows(a, b, T, L), retain_graph or k < len(parts) - 1)
        write_rows(layout, J, a, b, grads[:n], stats)
        accumulate(acc, grads[n:], reduce_batch=True)
    return acc
