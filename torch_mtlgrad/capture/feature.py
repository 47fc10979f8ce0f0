"""The feature mode: the tasks' gradients with respect to the shared features ``z`` first (only
the heads are traversed), then batched vector-Jacobian products through the encoder.

Exact when the losses depend on the shared parameters only through ``z`` (tested against the
loop).  No host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._kernels import RowStats
from .batched import batched_grad, chunks, write_rows
from .compiled import check_features, through_compiled
from .layout import FlatLayout
from .loop import Acc, accumulate

__all__ = ["capture_feature", "feature_gradients"]


@through_compiled
def feature_gradients(losses: Sequence[Tensor], features: Tensor, specific: Sequence[Tensor],
                      dtype: torch.dtype) -> tuple[Tensor, Acc]:
    """``Z`` ([T, *features.shape], row t = d loss_t / d features) and the summed specific grads.

    Only the part of the graph above ``features`` (the heads) is traversed; the graph below is
    kept.  On CUDA one batched backward through the heads for the features (``torch.vmap`` over
    one-hot weightings of the losses), so the work does not grow with T^2; on the CPU, or where
    vmap cannot run, one backward per task for the features only (it measured cheaper there,
    the documentation's Performance page).  Then one plain backward of the summed losses for the heads'
    parameters.  Features that come out of a ``torch.compile``'d region which also computes the
    losses are refused (:func:`~.compiled.check_features`).

    Example:
        >>> z = torch.randn(3, 2, requires_grad=True)
        >>> Z, _ = feature_gradients([z.sum(), (z ** 2).sum()], z, [], torch.float32)
        >>> Z.shape, bool((Z[0] == 1).all())
        (torch.Size([2, 3, 2]), True)
    """
    check_features(losses, features)
    acc: Acc = [None] * len(specific)
    T = len(losses)
    L = torch.stack([loss.reshape(()) for loss in losses])
    Z = None
    if features.device.type == "cuda":
        try:
            eye = torch.eye(T, dtype=L.dtype, device=L.device)
            zg = batched_grad(L, [features], eye, retain_graph=True)[0]
            Z = (torch.zeros((T, *features.shape), dtype=dtype, device=features.device)
                 if zg is None else zg.to(dtype))
        except (RuntimeError, NotImplementedError):
            Z = None
    if Z is None:
        Z = torch.empty((T, *features.shape), dtype=dtype, device=features.device)
        for t, loss in enumerate(losses):
            g = torch.autograd.grad(loss.reshape(()), [features], retain_graph=True,
                                    allow_unused=True)[0]
            if g is None:
                Z[t].zero_()
            else:
                Z[t].copy_(g)
    if specific:  # the heads' parameters: their summed gradient from one backward
        accumulate(acc, torch.autograd.grad(L.sum(), list(specific), retain_graph=True,
                                            allow_unused=True))
    return Z, acc


@through_compiled
def capture_feature(losses: Sequence[Tensor], features: Tensor, layout: FlatLayout,
                    specific: Sequence[Tensor], J: Tensor, retain_graph: bool = False,
                    chunk_size: int | None = None, stats: RowStats | None = None) -> Acc:
    """``J`` through the features: heads per task, then batched VJPs through the encoder."""
    Z, acc = feature_gradients(losses, features, specific, features.dtype)
    T = Z.shape[0]
    parts = chunks(T, chunk_size)
    for k, (a, b) in enumerate(parts):
        grads = batched_grad(features, layout.params, Z[a:b], retain_graph or k < len(parts) - 1)
        write_rows(layout, J, a, b, grads, stats)
    return acc
