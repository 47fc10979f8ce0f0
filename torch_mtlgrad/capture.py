"""Capturing the task Jacobian ``J`` ([T, D]) of the shared parameters, three ways.

* :func:`capture_loop`: one ``autograd.grad`` per task; each row filled with one multi-tensor copy.
* :func:`capture_batched`: one batched backward over the whole graph (``is_grads_batched``, i.e.
  vmap over the task dimension), in chunks of ``chunk_size`` tasks.
* :func:`capture_feature`: the tasks' gradients with respect to the shared features ``z`` first
  (cheap: only the heads), then one batched vector-Jacobian product through the encoder.  Exact
  when the losses depend on the shared parameters only through ``z``.

and, for the representation-gradient mode, :func:`feature_gradients` (the ``[T, F]`` matrix of
gradients with respect to ``z``) and :func:`encoder_vjp` (one backward through the encoder).

All of them give the same ``J`` as the loop (tested); task-specific tensors get the sum of their
task gradients, returned as ``acc``.  No function here synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._flat import FlatLayout

__all__ = ["capture_loop", "capture_batched", "capture_feature", "feature_gradients", "encoder_vjp",
           "chunks"]

Acc = list[Tensor | None]


def _accumulate(acc: Acc, grads: Sequence[Tensor | None], reduce_batch: bool = False) -> None:
    for i, g in enumerate(grads):
        if g is None:
            continue
        if reduce_batch:
            g = g.sum(0)
        acc[i] = g if acc[i] is None else acc[i] + g


def chunks(T: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(T)`` in pieces of at most ``chunk_size``."""
    size = T if chunk_size is None else max(1, int(chunk_size))
    return [(a, min(T, a + size)) for a in range(0, T, size)]


def capture_loop(losses: Sequence[Tensor], layout: FlatLayout, specific: Sequence[Tensor], J: Tensor,
                 retain_graph: bool = False) -> tuple[Acc, list[int]]:
    """Row ``t`` of ``J`` <- gradient of ``losses[t]``; returns (summed specific grads, zero-row tasks)."""
    shared = layout.params
    inputs = [*shared, *specific]
    n = len(shared)
    acc: Acc = [None] * len(specific)
    zero_rows = []
    T = len(losses)
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss.reshape(()), inputs, retain_graph=retain_graph or t < T - 1,
                                    allow_unused=True)
        if len(layout.fill_row(J[t], grads[:n])) == n:
            zero_rows.append(t)
        _accumulate(acc, grads[n:])
    return acc, zero_rows


def _selector(a: int, b: int, T: int, like: Tensor) -> Tensor:
    eye = torch.zeros(b - a, T, dtype=like.dtype, device=like.device)
    eye[:, a:b] = torch.eye(b - a, dtype=like.dtype, device=like.device)
    return eye


def _write_columns(layout: FlatLayout, J: Tensor, a: int, b: int, grads: Sequence[Tensor | None]) -> None:
    """Rows ``a:b`` of ``J`` <- batched per-parameter gradients ``[b - a, *shape]``."""
    dst, src = [], []
    for i, g in enumerate(grads):
        s, e = layout.param_range(i)
        block = J[a:b, s:e]
        if g is None:
            block.zero_()
        else:
            dst.append(block)
            src.append(g.reshape(b - a, e - s))
    if dst:
        torch._foreach_copy_(dst, src)


def capture_batched(losses: Sequence[Tensor], layout: FlatLayout, specific: Sequence[Tensor], J: Tensor,
                    retain_graph: bool = False, chunk_size: int | None = None) -> Acc:
    """All rows of ``J`` from batched backward passes (one per chunk of tasks)."""
    L = torch.stack([loss.reshape(()) for loss in losses])
    T = L.shape[0]
    shared = layout.params
    inputs = [*shared, *specific]
    n = len(shared)
    acc: Acc = [None] * len(specific)
    parts = chunks(T, chunk_size)
    for k, (a, b) in enumerate(parts):
        grads = torch.autograd.grad(L, inputs, grad_outputs=_selector(a, b, T, L), is_grads_batched=True,
                                    retain_graph=retain_graph or k < len(parts) - 1, allow_unused=True)
        _write_columns(layout, J, a, b, grads[:n])
        _accumulate(acc, grads[n:], reduce_batch=True)
    return acc


def feature_gradients(losses: Sequence[Tensor], features: Tensor, specific: Sequence[Tensor],
                      dtype: torch.dtype) -> tuple[Tensor, Acc]:
    """``Z`` ([T, *features.shape], row t = d loss_t / d features) and the summed specific grads.

    Only the part of the graph above ``features`` (the heads) is traversed; the graph below is kept.
    """
    inputs = [features, *specific]
    acc: Acc = [None] * len(specific)
    Z = torch.empty((len(losses), *features.shape), dtype=dtype, device=features.device)
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss.reshape(()), inputs, retain_graph=True, allow_unused=True)
        if grads[0] is None:
            Z[t].zero_()
        else:
            Z[t].copy_(grads[0])
        _accumulate(acc, grads[1:])
    return Z, acc


def capture_feature(losses: Sequence[Tensor], features: Tensor, layout: FlatLayout,
                    specific: Sequence[Tensor], J: Tensor, retain_graph: bool = False,
                    chunk_size: int | None = None) -> Acc:
    """``J`` through the features: heads per task, then batched VJPs through the encoder."""
    Z, acc = feature_gradients(losses, features, specific, features.dtype)
    T = Z.shape[0]
    parts = chunks(T, chunk_size)
    for k, (a, b) in enumerate(parts):
        grads = torch.autograd.grad(features, layout.params, grad_outputs=Z[a:b], is_grads_batched=True,
                                    retain_graph=retain_graph or k < len(parts) - 1, allow_unused=True)
        _write_columns(layout, J, a, b, grads)
    return acc


def encoder_vjp(features: Tensor, direction: Tensor, layout: FlatLayout, out: Tensor,
                retain_graph: bool = False) -> None:
    """``out`` ([D]) <- gradient of ``<features, direction>`` with respect to the shared parameters."""
    grads = torch.autograd.grad(features, layout.params, grad_outputs=direction.view_as(features).to(features.dtype),
                                retain_graph=retain_graph, allow_unused=True)
    layout.fill_row(out, grads)
