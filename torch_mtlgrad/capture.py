"""Capturing the task Jacobian ``J`` ([T, D]) of the shared parameters, three ways.

* :func:`capture_loop`: one ``autograd.grad`` per task; each row filled by one launch of the fused
  row kernel on CUDA (copy + cast + non-finite count + per-parameter squared norms,
  :func:`~torch_mtlgrad._kernels.fill_row_fused`), one multi-tensor copy elsewhere.
* :func:`capture_batched`: one batched backward over the whole graph (``torch.vmap`` over
  ``autograd.grad``, over the task dimension), in chunks of ``chunk_size`` tasks.
* :func:`capture_feature`: the tasks' gradients with respect to the shared features ``z`` first
  (cheap: only the heads), then one batched vector-Jacobian product through the encoder.  Exact
  when the losses depend on the shared parameters only through ``z``.

and :func:`batched_shared_grads`, the batched pass's per-parameter gradient blocks without ``J``
(the optimizer's Gramian path for weighting aggregators), and, for the representation-gradient
mode, :func:`feature_gradients` (the ``[T, F]`` matrix of
gradients with respect to ``z``) and :func:`encoder_vjp` (one backward through the encoder).

All of them give the same ``J`` as the loop (tested); task-specific tensors get the sum of their
task gradients, returned as ``acc``.  Given ``stats`` (:class:`~torch_mtlgrad._kernels.RowStats`
of ``[T, P]`` buffers), the capture also records each row's per-parameter squared norms and
NaN/Inf counts (free on CUDA, where the kernel computes them during the copy).  No function here
synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._flat import FlatLayout
from ._kernels import RowStats, fill_row_fused, fill_rows_fused

__all__ = ["auto_chunk_size", "available_memory", "batched_shared_grads", "capture_batched", "capture_feature",
           "capture_loop", "chunks", "encoder_vjp", "feature_gradients"]

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


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can still get, or ``None`` if unknown.

    CUDA: the device's free memory plus what PyTorch's caching allocator holds unused (no host
    synchronisation; ``None`` while a CUDA graph is being captured).  CPU: ``MemAvailable`` of
    ``/proc/meminfo`` (Linux); ``None`` elsewhere.
    """
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():  # no driver queries inside a CUDA graph
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def auto_chunk_size(num_tasks: int, numel: int, itemsize: int, available: int | None) -> int | None:
    """Tasks per batched pass so that its batched gradients fit: ``None`` (all at once) when they
    do, else the largest chunk whose estimate fits.

    The estimate per task is twice the shared gradients' bytes (``2 * numel * itemsize``: the
    batched parameter gradients plus as much again for the batched intermediate gradients), and
    the budget half of ``available``.

    Example:
        >>> auto_chunk_size(40, 1_000_000, 4, available=10**10), auto_chunk_size(40, 1_000_000, 4, 10**8)
        (None, 6)
    """
    if available is None:
        return None
    per_task = 2 * max(1, numel) * itemsize
    k = int(0.5 * available) // per_task
    return None if k >= num_tasks else max(1, k)


def _want(stats: RowStats | None) -> dict[str, bool]:
    """Which statistics to compute: those ``stats`` has buffers for."""
    return {"norms": stats is not None and stats.sq_norms is not None,
            "check": stats is not None and stats.nonfinite is not None}


def capture_loop(losses: Sequence[Tensor], layout: FlatLayout, specific: Sequence[Tensor], J: Tensor,
                 retain_graph: bool = False,
                 stats: RowStats | None = None) -> tuple[Acc, list[int]]:
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
        if all(g is None for g in grads[:n]):
            zero_rows.append(t)
        fill_row_fused(layout, J[t], grads[:n], out=None if stats is None else stats.row(t),
                       **_want(stats))
        _accumulate(acc, grads[n:])
    return acc, zero_rows


def _batched_grad(outputs: Tensor, inputs: Sequence[Tensor], grad_outputs: Tensor,
                  retain_graph: bool) -> tuple[Tensor | None, ...]:
    """Gradients of ``<outputs, grad_outputs[k]>`` for every ``k`` (batched along dim 0) with
    respect to ``inputs``; ``None`` for unused inputs.

    Two implementations, chosen by device because each is the faster one there:

    * CUDA: ``torch.vmap`` over ``autograd.grad`` (what TorchJD uses).  On an H100 with ResNet-18
      and T = 40 the feature mode took 71-85 ms per step with it and 162 ms with
      ``is_grads_batched``.
    * CPU: ``autograd.grad(..., is_grads_batched=True)`` (PyTorch's internal batching rule per
      backward op).  On the 2-core development CPU (built-in ConvNet, batch 64 of 3x64x64,
      T = 40) the feature mode took 3.8 s and 1.4 GiB with it, 7.9 s and 1.9 GiB with
      ``torch.vmap`` (``benchmarks/RESULTS.md``, step speed).
    """
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


def _selector(a: int, b: int, T: int, like: Tensor) -> Tensor:
    eye = torch.zeros(b - a, T, dtype=like.dtype, device=like.device)
    eye[:, a:b] = torch.eye(b - a, dtype=like.dtype, device=like.device)
    return eye


def _write_columns(layout: FlatLayout, J: Tensor, a: int, b: int, grads: Sequence[Tensor | None],
                   stats: RowStats | None = None) -> None:
    """Rows ``a:b`` of ``J`` <- batched per-parameter gradients ``[b - a, *shape]``."""
    fill_rows_fused(layout, J[a:b], grads, out=None if stats is None else stats.rows(a, b),
                    **_want(stats))


def capture_batched(losses: Sequence[Tensor], layout: FlatLayout, specific: Sequence[Tensor], J: Tensor,
                    retain_graph: bool = False, chunk_size: int | None = None,
                    stats: RowStats | None = None) -> Acc:
    """All rows of ``J`` from batched backward passes (one per chunk of tasks)."""
    L = torch.stack([loss.reshape(()) for loss in losses])
    T = L.shape[0]
    shared = layout.params
    inputs = [*shared, *specific]
    n = len(shared)
    acc: Acc = [None] * len(specific)
    parts = chunks(T, chunk_size)
    for k, (a, b) in enumerate(parts):
        grads = _batched_grad(L, inputs, _selector(a, b, T, L), retain_graph or k < len(parts) - 1)
        _write_columns(layout, J, a, b, grads[:n], stats)
        _accumulate(acc, grads[n:], reduce_batch=True)
    return acc


def batched_shared_grads(losses: Sequence[Tensor], layout: FlatLayout, specific: Sequence[Tensor],
                         features: Tensor | None = None,
                         retain_graph: bool = False) -> tuple[list[Tensor | None], Acc]:
    """Every task's gradient of each shared parameter, batched (``[T, *shape]``, ``None`` if no
    task reaches it), from one batched pass without writing ``J``; and the summed specific grads.

    With ``features`` the pass is the feature mode's (heads per task, then one batched VJP
    through the encoder), else the batched mode's.  The blocks are ``J``'s columns parameter by
    parameter: the optimizer's Gramian path reads ``G`` and ``d = w^T J`` from them directly.
    """
    T = len(losses)
    n = len(layout.params)
    if features is None:
        L = torch.stack([loss.reshape(()) for loss in losses])
        grads = _batched_grad(L, [*layout.params, *specific], _selector(0, T, T, L), retain_graph)
        acc: Acc = [None] * len(specific)
        _accumulate(acc, grads[n:], reduce_batch=True)
        return list(grads[:n]), acc
    Z, acc = feature_gradients(losses, features, specific, features.dtype)
    return list(_batched_grad(features, layout.params, Z, retain_graph)), acc


def feature_gradients(losses: Sequence[Tensor], features: Tensor, specific: Sequence[Tensor],
                      dtype: torch.dtype) -> tuple[Tensor, Acc]:
    """``Z`` ([T, *features.shape], row t = d loss_t / d features) and the summed specific grads.

    Only the part of the graph above ``features`` (the heads) is traversed; the graph below is kept.
    On CUDA one batched backward through the heads for the features (``torch.vmap`` over one-hot
    weightings of the losses) and one plain backward for the heads' parameters; on the CPU, or
    where vmap cannot run, one backward per task for the features and one plain backward for
    the heads' parameters.
    """
    acc: Acc = [None] * len(specific)
    T = len(losses)
    L = torch.stack([loss.reshape(()) for loss in losses])
    Z = None
    if features.device.type == "cuda":
        # Batched over tasks only for the features (the heads' parameters below), so the work
        # does not grow with T^2.  On the CPU the per-task loop measured cheaper
        # (benchmarks/RESULTS.md, step speed).
        try:
            eye = torch.eye(T, dtype=L.dtype, device=L.device)
            zg = _batched_grad(L, [features], eye, retain_graph=True)[0]
            Z = (torch.zeros((T, *features.shape), dtype=dtype, device=features.device)
                 if zg is None else zg.to(dtype))
        except (RuntimeError, NotImplementedError):
            Z = None
    if Z is None:
        # One backward per task for the features only: with two threads on a small model the
        # heads took 2.8 ms this way against 4.3 ms for per-task backward passes over
        # [features, *specific] (T = 40), and the same with one thread.
        Z = torch.empty((T, *features.shape), dtype=dtype, device=features.device)
        for t, loss in enumerate(losses):
            g = torch.autograd.grad(loss.reshape(()), [features], retain_graph=True,
                                    allow_unused=True)[0]
            if g is None:
                Z[t].zero_()
            else:
                Z[t].copy_(g)
    if specific:  # the heads' parameters: their summed gradient from one backward
        _accumulate(acc, torch.autograd.grad(L.sum(), list(specific), retain_graph=True,
                                             allow_unused=True))
    return Z, acc
    # One backward per task for the features only, and one for the heads' parameters (their
    # summed gradient): with two threads on a small model this measured 2.8 ms against 4.3 ms for
    # per-task backward passes over [features, *specific] (T = 40), and the same with one thread.
    Z = torch.empty((T, *features.shape), dtype=dtype, device=features.device)
    for t, loss in enumerate(losses):
        g = torch.autograd.grad(loss.reshape(()), [features], retain_graph=True, allow_unused=True)[0]
        if g is None:
            Z[t].zero_()
        else:
            Z[t].copy_(g)
    if specific:
        total = torch.stack([loss.reshape(()) for loss in losses]).sum()
        _accumulate(acc, torch.autograd.grad(total, list(specific), retain_graph=True,
                                             allow_unused=True))
    return Z, acc


def capture_feature(losses: Sequence[Tensor], features: Tensor, layout: FlatLayout,
                    specific: Sequence[Tensor], J: Tensor, retain_graph: bool = False,
                    chunk_size: int | None = None, stats: RowStats | None = None) -> Acc:
    """``J`` through the features: heads per task, then batched VJPs through the encoder."""
    Z, acc = feature_gradients(losses, features, specific, features.dtype)
    T = Z.shape[0]
    parts = chunks(T, chunk_size)
    for k, (a, b) in enumerate(parts):
        grads = _batched_grad(features, layout.params, Z[a:b], retain_graph or k < len(parts) - 1)
        _write_columns(layout, J, a, b, grads, stats)
    return acc


def encoder_vjp(features: Tensor, direction: Tensor, layout: FlatLayout, out: Tensor,
                retain_graph: bool = False) -> None:
    """``out`` ([D]) <- gradient of ``<features, direction>`` with respect to the shared parameters."""
    grads = torch.autograd.grad(features, layout.params, grad_outputs=direction.view_as(features).to(features.dtype),
                                retain_graph=retain_graph, allow_unused=True)
    layout.fill_row(out, grads)
