"""The validation gradient of a method that meta-learns its weights on a validation batch
(Auto-Lambda: ``MultiTaskOptimizer(..., validation_losses=fn)``).

:func:`validation_gradient` takes the look-ahead step ``theta' = theta - eta (grad + wd theta +
mu m)`` of every parameter the wrapped optimizer holds (the virtual step of the authors' code:
each parameter's group ``lr``, ``weight_decay`` and, for SGD with momentum, ``momentum`` times
its momentum buffer; the shared parameters' grad is ``w^T J`` for the method's current weights,
the task-specific ones' their summed task gradients), calls ``fn()`` there, and captures the
gradient of the validation objective over the shared parameters with the loop capture (one row
in ``J``'s layout).  The parameters are swapped (``p.data``), never written: ``theta`` comes back
as the same tensors, bit for bit, and a graph kept with ``retain_graph=True`` stays valid.
Without the look-ahead (``unrolled=False``) ``fn()`` runs at ``theta``.

Cost: one forward (``fn``) and one backward per step, plus one ``[D]`` vector.  ``fn()`` runs the
model in the mode it is in: BatchNorm running statistics see the validation batch (the authors'
code runs it on a copy of the network).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .layout import FlatLayout
from .loop import capture_loop

__all__ = ["check_validation", "validation_gradient", "validation_objective"]


def check_validation(fn: Any, aggregator: Any) -> Callable[[], Any] | None:
    """``validation_losses=`` checked against the method: a callable, given only to a method that
    reads a validation batch (``aggregator.needs_validation``); returns it (or ``None``)."""
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"validation_losses must be a callable returning the validation losses "
                        f"(e.g. lambda: [loss(h(enc(x_val)), y) for ...]), got {type(fn).__name__}")
    if not getattr(aggregator, "needs_validation", False):
        raise ValueError(f"validation_losses= is read only by a method that meta-learns on a "
                         f"validation batch (e.g. 'autolambda'); {aggregator!r} reads none: drop "
                         "validation_losses=, or pick such a method")
    return fn


def validation_objective(out: Any, primary: Sequence[bool]) -> Tensor:
    """The meta objective from what ``fn()`` returned: a scalar tensor as it is, or one loss per
    task (a sequence with ``None`` for a task without a validation loss, or a 1-D tensor) summed
    over the primary tasks.

    Example:
        >>> validation_objective([torch.tensor(1.0), None, torch.tensor(3.0)], [True, True, True])
        tensor(4.)
    """
    T = len(primary)
    what = ("validation_losses() must return a scalar tensor (the validation objective) or one "
            f"loss per task ({T} entries, None for a task without one)")
    if isinstance(out, Tensor):
        if out.dim() == 0:
            return out
        if out.dim() != 1:
            raise ValueError(f"{what}, got a tensor of shape {tuple(out.shape)}")
        out = list(out.unbind(0))
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
        raise TypeError(f"{what}, got {type(out).__name__}")
    if len(out) != T:
        raise ValueError(f"{what}, got {len(out)} entries")
    terms = []
    for t, (loss, keep) in enumerate(zip(out, primary)):
        if loss is None or not keep:
            continue
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"validation loss {t} must be a scalar tensor, got "
                            f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}")
        terms.append(loss.reshape(()))
    if not terms:
        raise ValueError("validation_losses() returned no loss for any primary task: the meta "
                         f"objective is the sum over the primary tasks {[t for t in range(T) if primary[t]]}")
    return torch.stack(terms).sum() if len(terms) > 1 else terms[0]


def _virtual(p: Tensor, grad: Tensor | None, group: dict[str, Any], optimizer: Optimizer) -> Tensor:
    """``p - lr (grad + wd p + momentum m)`` (``p`` itself when it has no gradient)."""
    if grad is None:
        return p.detach()
    step = grad.to(p.dtype)
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if wd:
        step = step + wd * p.detach()
    mu = float(group.get("momentum", 0.0) or 0.0)
    buf = optimizer.state.get(p, {}).get("momentum_buffer") if mu else None
    if buf is not None:
        step = step + mu * buf
    return p.detach() - float(group["lr"]) * step


def validation_gradient(fn: Callable[[], Any], primary: Sequence[bool], layout: FlatLayout,
                        optimizer: Optimizer, dtype: torch.dtype, *,
                        shared: Tensor | None = None,
                        specific: Sequence[Tensor] = (),
                        specific_grads: Sequence[Tensor | None] = (),
                        add_grads: bool = True,
                        scale: Tensor | None = None) -> tuple[Tensor, Any, Tensor]:
    """``(g_val, eta, L_val)``: the gradient (``[D]``, ``dtype``) over the shared parameters of
    the validation objective at the look-ahead ``theta'``, the shared parameters' learning rates
    (a float, or ``[D]`` where the groups differ) and the objective's value.

    ``shared``: the shared parameters' ``[D]`` gradient of the virtual step (``None``: no
    look-ahead, ``fn()`` runs at ``theta``); ``specific`` / ``specific_grads``: the task-specific
    tensors and their gradients of the step (``add_grads``: added to their ``.grad``, as
    :class:`~torch_mtlgrad.capture.Captured` says); ``scale``: GradScaler's scale, which
    every one of those gradients is times (``fn()``'s objective is not scaled).
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    lrs = [float(groups[id(p)]["lr"]) for p in layout.params]
    swapped: list[tuple[Tensor, Tensor]] = []
    try:
        if shared is not None:
            moves = list(zip(layout.params, layout.views(shared)))
            if add_grads:  # the step adds them to the .grad already there
                specific_grads = [p.grad if g is None else g if p.grad is None else p.grad + g
                                  for p, g in zip(specific, specific_grads)]
            moves += [(p, g) for p, g in zip(specific, specific_grads) if id(p) in groups]
            if scale is not None:
                moves = [(p, None if g is None else g / scale) for p, g in moves]
            news = [_virtual(p, g, groups[id(p)], optimizer) for p, g in moves]
            for (p, _), new in zip(moves, news):
                swapped.append((p, p.data))
                p.data = new
        with torch.enable_grad():
            objective = validation_objective(fn(), primary)
            row = torch.empty(1, layout.numel, dtype=dtype, device=layout.device)
            capture_loop([objective], layout, [], row)
    finally:
        for p, data in reversed(swapped):
            p.data = data
    eta: Any = lrs[0]
    if len(set(lrs)) > 1:
        eta = torch.cat([torch.full((n,), lr, dtype=dtype, device=layout.device)
                         for n, lr in zip(layout.numels, lrs)])
    return row[0], eta, objective.detach()
