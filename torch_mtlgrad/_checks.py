"""The checks of a step: the losses' types and count, the non-finite policy, and the warning for
tasks that do not reach the shared parameters.  Nothing here changes any state on failure."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .capture.layout import FlatLayout

__all__ = [
    "NONFINITE",
    "NonFiniteError",
    "NonFinitePolicy",
    "ZeroRowWarning",
    "all_finite",
    "check_arguments",
    "check_count",
    "check_loss",
    "check_losses",
    "check_shared",
    "find_nonfinite",
    "nonfinite_loss",
]

log = logging.getLogger(__name__)

NONFINITE = ("raise", "skip", "unchecked")


class NonFiniteError(FloatingPointError, ValueError):
    """A NaN/Inf loss or task gradient under ``nonfinite="raise"`` (names the task)."""


def resolve_shared(shared: Any) -> tuple[list[Tensor], list[str]]:
    """``shared=`` as (parameters, names): a module's named parameters, or positions
    ``shared[i]`` for an iterable of tensors."""
    if isinstance(shared, nn.Module):
        named = list(shared.named_parameters())
        return [p for _, p in named], [n for n, _ in named]
    if isinstance(shared, Tensor):
        return [shared], ["shared[0]"]
    try:
        params = list(shared)
    except TypeError:
        raise TypeError(
            f"shared must be an nn.Module or an iterable of parameters, got {type(shared).__name__}"
        ) from None
    return params, [f"shared[{i}]" for i in range(len(params))]


def check_arguments(optimizer: Any, num_tasks: Any, scaler: Any) -> None:
    """The constructor's ``optimizer``, ``num_tasks`` and ``scaler``."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if num_tasks is not None and (isinstance(num_tasks, bool) or not isinstance(num_tasks, int)
                                  or num_tasks < 1):
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    if scaler is not None and not (callable(getattr(scaler, "scale", None))
                                   and callable(getattr(scaler, "is_enabled", None))):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")


def check_shared(layout: FlatLayout, optimizer: Optimizer) -> None:
    """Every shared parameter is held by the wrapped optimizer and requires grad."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for p, n in zip(layout.params, layout.names):
        if id(p) not in held:
            raise ValueError(f"shared parameter {n!r} is not held by the wrapped optimizer")
        if not p.requires_grad:
            raise ValueError(f"shared parameter {n!r} does not require grad")


def check_loss(t: int, loss: Any) -> None:
    """Loss ``t`` must be a real floating-point scalar tensor that requires grad."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss of task {t} is a {type(loss).__name__}, not a tensor")
    if loss.numel() != 1:
        raise ValueError(f"loss of task {t} is not a scalar: shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise TypeError(f"loss of task {t} has dtype {loss.dtype}: a loss must be a real "
                        "floating-point tensor")
    if not loss.requires_grad:
        raise ValueError(f"loss of task {t} does not require grad (was it detached?)")


def check_count(T: int, num_tasks: int | None) -> None:
    """``T`` losses where the optimizer expects ``num_tasks`` (``None``: not known yet)."""
    if num_tasks is not None and T != num_tasks:
        raise ValueError(f"expected {num_tasks} task losses (one per task), got {T}")


def check_losses(losses: Any, num_tasks: int | None) -> list[Tensor]:
    """The losses of ``backward(losses)`` as a list of scalar tensors, one per task, on one device.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> len(check_losses(w * 2, num_tasks=2))
        2
    """
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(f"losses as one tensor must be 1-D with one value per task, got shape "
                             f"{tuple(losses.shape)}")
        losses = list(losses.unbind())
    elif isinstance(losses, dict):
        raise TypeError("losses is a dict: pass a list of scalar tensors in task order")
    elif isinstance(losses, (str, bytes)) or not isinstance(losses, Iterable):
        raise TypeError(f"losses must be a sequence of scalar tensors, got {type(losses).__name__}")
    losses = list(losses)
    if not losses:
        raise ValueError("losses is empty: pass one scalar loss per task")
    for t, loss in enumerate(losses):
        check_loss(t, loss)
    devices = [loss.device for loss in losses]
    if len(set(devices)) > 1:
        where = ", ".join(f"task {t}: {d}" for t, d in enumerate(devices))
        raise ValueError(f"the losses are on several devices ({where}); all must be on one device")
    check_count(len(losses), num_tasks)
    return losses


def nonfinite_loss(values: Tensor | None) -> str | None:
    """The first non-finite loss value, described; ``None`` when all are finite (one host sync)."""
    if values is None or bool(torch.isfinite(values).all()):
        return None
    t = int((~torch.isfinite(values)).nonzero()[0])
    return f"loss of task {t} is not finite ({float(values[t])})"


def all_finite(first: Tensor, values: Tensor | None, grads: Sequence[Tensor | None] | None) -> bool:
    """``first`` (a 0-d bool: the check of ``J`` or ``G``) and finite loss values and summed
    task-specific gradients (each by its sum: a NaN/Inf makes it non-finite), in one host
    synchronisation.  A sum of finite values that overflows reads as not finite: callers then
    look closer."""
    ok = [first]
    if values is not None:
        ok.append(torch.isfinite(values).all())
    ok += [torch.isfinite(g.sum()) for g in grads or () if g is not None]
    return bool(torch.stack([o.to(first.device) for o in ok]).all())


def find_nonfinite(J: Tensor, values: Tensor | None, grads: Sequence[Tensor | None],
                   params: Sequence[Tensor], layout: FlatLayout, what: str | None = None,
                   counts: Tensor | None = None) -> str | None:
    """The first NaN/Inf among the loss values, the rows of ``J`` and the task-specific
    gradients, described for the error; ``None`` when all are finite.

    ``what``: the rows' space when it is not the shared parameters (the representation mode's
    features).  ``counts``: ``[T, P]`` NaN/Inf counts of ``J`` recorded during the capture (no
    pass over ``J`` then).  Without them a pre-check on the row sums (one read of ``J``): a NaN or
    Inf in a row makes its sum non-finite; a finite row whose sum overflows only sends the check
    to the exact look below.
    """
    pre = torch.isfinite(J.sum(dim=1)).all() if counts is None else counts.sum() == 0
    if all_finite(pre, values, grads):
        return None
    bad = nonfinite_loss(values)
    if bad is not None:
        return bad
    finite = torch.isfinite(J).all(dim=1) if counts is None else counts.sum(1) == 0
    if not bool(finite.all()):
        t = int((~finite).nonzero()[0])
        if what:
            return f"task {t} has a non-finite gradient in {what}"
        if counts is not None:
            name = layout.names[int(counts[t].nonzero()[0])]
        else:
            name = next(layout.names[i] for i, v in enumerate(layout.views(J[t]))
                        if not bool(torch.isfinite(v).all()))
        return f"task {t} has a non-finite gradient in shared parameter {name!r}"
    i = next((i for i, g in enumerate(grads) if g is not None and not bool(torch.isfinite(g).all())),
             None)
    if i is None:  # the pre-check flagged an overflowing sum of finite values
        return None
    shape = tuple(params[i].shape) if params else ()
    return f"the summed task gradient of task-specific parameter {i} (shape {shape}) is not finite"


class NonFinitePolicy:
    """What a NaN/Inf does: ``"raise"`` (a :class:`NonFiniteError` naming the task), ``"skip"``
    (the step is skipped, counted in :attr:`skipped_steps` and logged) or ``"unchecked"`` (no
    check, no synchronisation).

    Example:
        >>> policy = NonFinitePolicy("skip")
        >>> policy.apply("loss of task 0 is not finite (nan)"), policy.skipped_steps
        (True, 1)
    """

    def __init__(self, mode: str) -> None:
        if mode not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {mode!r}")
        self.mode = mode
        self.skipped_steps = 0

    @property
    def checked(self) -> bool:
        """Whether the step's values are looked at."""
        return self.mode != "unchecked"

    def apply(self, message: str) -> bool:
        """Raise, or count and log the skip; returns ``True`` (the step is to be skipped)."""
        if self.mode == "raise":
            raise NonFiniteError(message + " (pass nonfinite='skip' to skip such steps)")
        self.skipped_steps += 1
        log.warning("skipping step: %s (%d skipped so far)", message, self.skipped_steps)
        return True


class ZeroRowWarning:
    """Warns once per task whose loss does not reach the shared parameters (a zero row of ``J``)."""

    def __init__(self) -> None:
        self.warned: set[int] = set()

    def __call__(self, tasks: Iterable[int]) -> None:
        for t in tasks:
            if t not in self.warned:
                self.warned.add(t)
                warnings.warn(f"task {t}'s loss does not depend on the shared parameters: its row of "
                              "J is zero", RuntimeWarning, stacklevel=4)
