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

from ._errors import NonFiniteError
from ._stack import user_stacklevel
from .capture.layout import FlatLayout

__all__ = [
    "NONFINITE",
    "NonFiniteError",
    "NonFinitePolicy",
    "ZeroRowWarning",
    "all_finite",
    "check_arguments",
    "check_count",
    "check_frozen",
    "check_loss",
    "check_losses",
    "check_present",
    "check_shared",
    "find_nonfinite",
    "nonfinite_loss",
    "resolve_shared",
    "warn_all_shared",
]

log = logging.getLogger(__name__)

NONFINITE = ("raise", "skip", "unchecked")




def resolve_shared(shared: Any) -> tuple[list[Tensor], list[str], list[tuple[Tensor, str]]]:
    """``shared=`` as (trainable parameters, their names, frozen ``(parameter, name)`` pairs): a
    module's named parameters, or positions ``shared[i]`` for an iterable of tensors.

    Frozen parameters (``requires_grad=False``, e.g. a pre-trained stem) are not part of ``J``;
    the others keep their names.  An iterator that yields nothing is reported as probably
    consumed already (the same ``model.parameters()`` generator passed to the optimizer).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> net[0].weight.requires_grad_(False)
        ... # doctest: +ELLIPSIS
        Parameter...
        >>> params, names, frozen = resolve_shared(net)
        >>> names, [n for _, n in frozen]
        (['0.bias', '1.weight', '1.bias'], ['0.weight'])
    """
    if isinstance(shared, nn.Module):
        named = list(shared.named_parameters())
    elif isinstance(shared, Tensor):
        named = [("shared[0]", shared)]
    else:
        try:
            items = list(shared)
        except TypeError:
            raise TypeError(
                f"shared must be an nn.Module or an iterable of parameters, got {type(shared).__name__}"
            ) from None
        if not items and iter(shared) is shared:
            raise ValueError(
                "shared= is an iterator that yielded no parameters: it was probably consumed "
                "already (e.g. the same model.parameters() generator passed to the optimizer). "
                "Pass the shared module itself, or list(...) of its parameters")
        named = [(f"shared[{i}]", p) for i, p in enumerate(items)]
    if not named:
        raise ValueError("no shared parameters: shared= holds none; pass the shared module (e.g. "
                         "shared=model.encoder) or a non-empty list of its parameters")
    # Not tensors are left for FlatLayout to name.
    trainable = [(n, p) for n, p in named if getattr(p, "requires_grad", True)]
    frozen = [(p, n) for n, p in named if not getattr(p, "requires_grad", True)]
    if not trainable:
        raise ValueError(f"every shared parameter is frozen (requires_grad=False: "
                         f"{', '.join(n for _, n in frozen[:5])}{', ...' if len(frozen) > 5 else ''}): "
                         "there is nothing to combine; unfreeze some, or use the plain optimizer")
    return [p for _, p in trainable], [n for n, _ in trainable], frozen


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
    """Every trainable shared parameter is held by the wrapped optimizer."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for p, n in zip(layout.params, layout.names):
        if id(p) not in held:
            raise ValueError(f"shared parameter {n!r} is not held by the wrapped optimizer, and it "
                             "requires grad: build the optimizer over it too (or freeze it with "
                             "requires_grad_(False) if it is not to be trained)")


def check_frozen(frozen: Sequence[tuple[Tensor, str]]) -> None:
    """A shared parameter that was frozen when the optimizer was built must stay frozen: it is
    not part of ``J``, so it would get no gradient."""
    for p, n in frozen:
        if p.requires_grad:
            raise RuntimeError(
                f"shared parameter {n!r} was frozen (requires_grad=False) when the "
                "MultiTaskOptimizer was built and now requires grad: it is not part of the task "
                "Jacobian and would get no gradient. Build a new torch.optim optimizer and "
                "MultiTaskOptimizer after unfreezing (carry state over with state_dict)")


def warn_all_shared(num_specific: int) -> None:
    """Warn when every parameter of the wrapped optimizer is shared (``shared=`` the whole model):
    a min-norm-like method may then starve whole heads."""
    if num_specific == 0:
        warnings.warn(
            "every parameter of the wrapped optimizer is in shared=, so no parameter is "
            "task-specific: if the model has task heads, shared= should be only the part all "
            "tasks use (e.g. shared=model.encoder); the heads then get their own task's gradient "
            "instead of a share of the combined direction", UserWarning, stacklevel=user_stacklevel())


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


def check_present(present: Any, T: int) -> list[bool]:
    """``backward(losses, present=...)``: one bool per task."""
    if isinstance(present, Tensor):
        if present.dtype != torch.bool or present.dim() != 1:
            raise TypeError(f"present must be a 1-D bool tensor or a sequence of bools, got a "
                            f"{present.dtype} tensor of shape {tuple(present.shape)}")
        present = present.tolist()
    try:
        flags = list(present)
    except TypeError:
        raise TypeError(f"present must be a sequence of bools, got {type(present).__name__}") from None
    if not all(isinstance(f, bool) for f in flags):
        raise TypeError(f"present must hold bools (True: the task is in this batch), got {flags!r}")
    if len(flags) != T:
        raise ValueError(f"present has {len(flags)} entries for {T} task losses: give one per task")
    return flags


def check_losses(losses: Any, num_tasks: int | None,
                 present: Any = None) -> tuple[list[Tensor], list[int], int]:
    """The losses of ``backward(losses)``: the present tasks' losses (scalar tensors on one
    device), their task indices, and the number of tasks ``T``.

    A task is absent this step when its entry is ``None`` or ``present[t]`` is false (its entry
    is then not looked at).

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> [len(check_losses(w * 2, num_tasks=2)[0]), check_losses([w.sum(), None], None)[1:]]
        [2, ([0], 2)]
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
    T = len(losses)
    check_count(T, num_tasks)
    flags = [True] * T if present is None else check_present(present, T)
    tasks = [t for t in range(T) if flags[t] and losses[t] is not None]
    for t in tasks:
        check_loss(t, losses[t])
    devices = [losses[t].device for t in tasks]
    if len(set(devices)) > 1:
        where = ", ".join(f"task {t}: {losses[t].device}" for t in tasks)
        raise ValueError(f"the losses are on several devices ({where}); all must be on one device")
    return [losses[t] for t in tasks], tasks, T


def nonfinite_loss(values: Tensor | None, tasks: Sequence[int] | None = None) -> str | None:
    """The first non-finite loss value, described; ``None`` when all are finite (one host sync).
    ``tasks``: the task index of each value (when some tasks are absent)."""
    if values is None or bool(torch.isfinite(values).all()):
        return None
    i = int((~torch.isfinite(values)).nonzero()[0])
    t = i if tasks is None else tasks[i]
    return f"loss of task {t} is not finite ({float(values[i])})"


def all_finite(first: Tensor, values: Tensor | None, grads: Sequence[Tensor | None] | None) -> bool:
    """``first`` (a 0-d bool: the check of ``J`` or ``G``) and finite loss values and
    gradients (each by its largest absolute value, one multi-tensor kernel for all of them: a
    NaN/Inf makes it non-finite, finite values never overflow), in one host synchronisation.
    When ``first`` comes from a sum (the row sums of ``J``), a sum of finite values that
    overflows reads as not finite: callers then look closer."""
    ok = [first]
    if values is not None:
        ok.append(torch.isfinite(values).all())
    gs = [g for g in grads or () if g is not None]
    if gs:
        peaks = torch._foreach_norm(gs, float("inf"))
        if len({p.dtype for p in peaks}) > 1 or len({p.device for p in peaks}) > 1:
            peaks = [p.to(first.device, torch.float32) for p in peaks]
        ok.append(torch.isfinite(torch.stack(peaks)).all())
    return bool(torch.stack([o.to(first.device) for o in ok]).all())


def find_nonfinite(J: Tensor, values: Tensor | None, grads: Sequence[Tensor | None],
                   params: Sequence[Tensor], layout: FlatLayout, what: str | None = None,
                   counts: Tensor | None = None, tasks: Sequence[int] | None = None) -> str | None:
    """The first NaN/Inf among the loss values, the rows of ``J`` and the task-specific
    gradients, described for the error; ``None`` when all are finite.

    ``what``: the rows' space when it is not the shared parameters (the representation mode's
    features).  ``counts``: ``[T, P]`` NaN/Inf counts of ``J`` recorded during the capture (no
    pass over ``J`` then).  Without them a pre-check on the row sums (one read of ``J``): a NaN or
    Inf in a row makes its sum non-finite; a finite row whose sum overflows only sends the check
    to the exact look below.  ``tasks``: the task index of each row (when some are absent).
    """
    pre = torch.isfinite(J.sum(dim=1)).all() if counts is None else counts.sum() == 0
    if all_finite(pre, values, grads):
        return None
    bad = nonfinite_loss(values, tasks)
    if bad is not None:
        return bad
    finite = torch.isfinite(J).all(dim=1) if counts is None else counts.sum(1) == 0
    if not bool(finite.all()):
        r = int((~finite).nonzero()[0])
        t = r if tasks is None else tasks[r]
        if what:
            return f"task {t} has a non-finite gradient in {what}"
        if counts is not None:
            name = layout.names[int(counts[r].nonzero()[0])]
        else:
            name = next(layout.names[i] for i, v in enumerate(layout.views(J[r]))
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
                              "J is zero (if the task is absent from this batch, pass None as its "
                              "loss instead of 0 * loss: the step then aggregates the tasks present)",
                              RuntimeWarning, stacklevel=user_stacklevel())
