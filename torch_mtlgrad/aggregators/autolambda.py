"""Auto-Lambda (Liu, James, Davison and Johns, TMLR 2022): task weights meta-learned on a
validation batch.

Liu, James, Davison, Johns, *Auto-Lambda: Disentangling Dynamic Task Relationships*, TMLR 2022.
The training objective is ``sum_t lambda_t L_t(theta)``; the weights ``lambda`` follow the
bilevel problem

    min_lambda  L_val(theta*(lambda)),   L_val = sum_{t in primary} L_t^val

approximated, as in DARTS (Liu, Simonyan and Yang, ICLR 2019), by one look-ahead step: with
``theta' = theta - eta grad_theta sum_t lambda_t L_t(theta)`` (a virtual step of the network's own
optimizer with its learning rate ``eta``),

    lambda <- lambda - beta * grad_lambda L_val(theta')                               (1)

and the network then steps along ``grad_theta sum_t lambda_t L_t`` with the *updated* weights.
Because ``theta'`` is linear in ``lambda``, the chain rule gives the meta-gradient exactly:

    dL_val(theta') / dlambda_t = -eta * g_val(theta') . g_t(theta)                    (2)

with ``g_t`` row ``t`` of ``J`` and ``g_val`` the gradient of the validation loss at ``theta'``.
The authors' code (``auto_lambda.py``) evaluates the dot product of (2) by a central finite
difference, ``(L_t(theta + e g_val) - L_t(theta - e g_val)) / 2e`` with ``e = 0.01 / ||g_val||``
(the DARTS device for a Hessian-vector product), which costs two more forward passes of the
training batch; here ``J`` is at hand, so (2) is computed as the product ``-(J u)_t`` itself,
``u = eta * g_val(theta')``, the value the finite difference approximates up to ``O(e^2)``.

The input ``u`` comes from outside ``J``: with :class:`~torch_mtlgrad.MultiTaskOptimizer`, pass
``validation_losses=fn`` (``fn()`` computes the validation losses on a batch it draws); at each
step the optimizer takes the virtual step ``theta'``, calls ``fn()`` there, captures the
gradient of the primary tasks' validation losses over the shared parameters (one more forward
and backward per step), puts ``theta`` back bit for bit, and hands ``u`` to the method
(:meth:`AutoLambda.set_validation`).  Standalone: :meth:`AutoLambda.aggregate_validation`.

Approximations (``approximation=``):

* ``"unrolled"`` (default, the paper's): ``g_val`` at the look-ahead ``theta'`` as above.  The
  virtual step is the one of the authors' code: ``theta' = theta - eta (grad + wd theta + mu m)``
  with each parameter's group ``lr`` (``eta``), ``weight_decay`` (``wd``) and, for SGD with
  momentum, ``momentum`` times its momentum buffer (``mu m``); the shared parameters' grad is
  ``lambda^T J`` with the weights before this call's update, the task-specific ones' their summed
  task gradients (this library gives those the plain sum, so their step does not depend on
  ``lambda`` and (2) is over the shared parameters only).
* ``"first_order"``: ``g_val`` at ``theta`` (DARTS' first-order approximation, ``theta' =
  theta`` in (2)): no virtual step, the same one extra forward and backward.

Defaults (the authors' code): ``lambda`` starts at ``init = 0.1`` for every task
(``--autol_init``); the meta optimizer is Adam (PyTorch's, ``betas=(0.9, 0.999)``, ``eps=1e-8``)
with ``lr = 1e-4`` (``--autol_lr``: 1e-4 for NYUv2, 3e-5 for CityScapes, 3e-4 for
CIFAR-100); ``primary=None`` makes every task primary (the multi-task setting; a subset of task
indices is the auxiliary-learning setting, where the other tasks' weights are still learned).
The weights are left unconstrained, as in the paper and the authors' code (no clipping, no
normalisation: they may grow, or turn negative).

Scale: ``d = lambda^T J`` with ``lambda = 0.1`` at the start: ``0.1 T g`` on ``T`` equal rows,
neither the sum's scale nor a convex combination (``"unnormalised"``).

Absent tasks (``present=``): the method runs on the present rows; an absent task's ``lambda_t``
and its Adam moments do not move; a task first present later starts at ``init`` with a fresh
Adam (its own step count).

State (``state_dict``): ``lambda`` and its optimizer's state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ._base import Aggregation, Aggregator
from ._learned import LearnedVector, OptimizerName

__all__ = ["AutoLambda"]

Approximation = Literal["unrolled", "first_order"]
APPROXIMATIONS: tuple[str, ...] = ("unrolled", "first_order")

_NEEDS = ("AutoLambda needs the gradient of the validation loss for this step and got none: "
          "pass validation_losses=fn to MultiTaskOptimizer (fn() returns the validation losses "
          "on a validation batch it draws: one per task, or their sum over the primary tasks), "
          "or call agg.aggregate_validation(J, g_val, losses, lr=eta) (or agg.set_validation(g_val, "
          "lr=eta) before agg.aggregate(J)) with g_val the validation loss's gradient over the "
          "shared parameters (J's columns)")


class AutoLambda(Aggregator):
    """Auto-Lambda (Liu et al., TMLR 2022): ``d = lambda^T J`` with ``lambda`` stepped by
    ``grad_lambda L_val(theta') = -J u``, ``u = eta g_val(theta')``, before the direction is formed.

    Args:
        init: the initial weight of every task (default 0.1, the authors' ``--autol_init``).
        lr: the meta step size ``beta`` (default 1e-4, the authors' ``--autol_lr`` for NYUv2).
        optimizer: the meta optimizer: ``"adam"`` (default, the authors') or ``"sgd"`` (then
            ``lambda <- lambda + lr J u``).
        primary: the primary tasks (indices among all tasks) whose validation losses form the
            meta objective; ``None`` (default): every task.
        approximation: ``"unrolled"`` (default: ``g_val`` at the look-ahead ``theta'``) or
            ``"first_order"`` (``g_val`` at ``theta``); read by the optimizer, which evaluates the
            validation losses where this says.

    Each call needs the validation input ``u`` (:meth:`set_validation`, or
    :meth:`aggregate_validation`); without it the call is a ``ValueError`` saying what to pass,
    raised before anything changes.

    Diagnostics of the last call: ``lambda_before`` (the weights of the virtual step),
    ``meta_grad`` (``-J u``, the gradient (2) of the module docstring).

    Example:
        >>> import torch
        >>> agg = AutoLambda(init=1.0, lr=0.5, optimizer="sgd")
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> g_val = torch.tensor([1.0, -1.0])      # the validation gradient at theta'
        >>> out = agg.aggregate_validation(J, g_val, lr=0.1)   # eta = 0.1: J u = [0.1, -0.2]
        >>> out.weights                             # 1 - 0.5 * (-[0.1, -0.2])
        tensor([1.0500, 0.9000])
        >>> out.direction
        tensor([1.0500, 1.8000])
    """

    paper: ClassVar[str] = ("Liu, James, Davison & Johns, *Auto-Lambda: Disentangling Dynamic "
                            "Task Relationships*, TMLR 2022")
    summary: ClassVar[str] = ("task weights meta-learned by one look-ahead step on a validation "
                              "batch (needs validation_losses=)")
    stateful: ClassVar[bool] = True
    random: ClassVar[bool] = False
    needs_validation: ClassVar[bool] = True

    def __init__(self, init: float = 0.1, lr: float = 1e-4, optimizer: OptimizerName = "adam",
                 primary: Sequence[int] | None = None,
                 approximation: Approximation = "unrolled") -> None:
        super().__init__()
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise TypeError(f"init must be a finite number (the initial task weight), got {init!r}")
        if approximation not in APPROXIMATIONS:
            raise ValueError(f"approximation must be one of {APPROXIMATIONS}, got {approximation!r}")
        self.init = float(init)
        self.approximation: Approximation = approximation
        self.primary = _check_primary(primary)
        self._lam = LearnedVector(optimizer, lr)  # validates optimizer and lr
        self._pending: Tensor | None = None  # u = eta * g_val for the next call
        self._u: Tensor | None = None  # u during a call

    @property
    def lam(self) -> Tensor | None:
        """The current task weights ``lambda`` (``None`` before the first call)."""
        return None if self._lam.value is None else self._lam.get()

    def current_weights(self, num_tasks: int, dtype: torch.dtype,
                        device: torch.device | str) -> Tensor:
        """``lambda`` over all ``num_tasks`` tasks as the next call starts from (``init`` before
        the first call): the weights of the virtual step."""
        lam = self.lam
        if lam is None:
            return torch.full((num_tasks,), self.init, dtype=dtype, device=device)
        if lam.shape[0] != num_tasks:
            raise ValueError(f"AutoLambda was tracking {lam.shape[0]} tasks, got {num_tasks}; call "
                             "reset() to start over")
        return lam.to(dtype=dtype, device=device)

    def primary_mask(self, num_tasks: int) -> list[bool]:
        """One bool per task: whether its validation loss is part of the meta objective."""
        if self.primary is None:
            return [True] * num_tasks
        bad = [t for t in self.primary if t >= num_tasks]
        if bad:
            raise ValueError(f"primary tasks {bad} do not exist: there are {num_tasks} tasks "
                             f"(indices 0..{num_tasks - 1})")
        return [t in self.primary for t in range(num_tasks)]

    def set_validation(self, grad: Tensor, lr: float | Tensor = 1.0) -> None:
        """Stage the validation input of the next call: ``u = lr * grad``, ``grad`` the gradient
        (``[D]``, ``J``'s columns) of the validation loss at ``theta'`` and ``lr`` the network's
        learning rate ``eta`` (a number, or ``[D]``: one per column)."""
        if not isinstance(grad, Tensor) or grad.dim() != 1 or not grad.is_floating_point():
            raise ValueError("the validation gradient must be a 1-D floating-point tensor with one "
                             f"entry per column of J, got {_describe(grad)}")
        if isinstance(lr, Tensor):
            if lr.shape not in (torch.Size([]), grad.shape):
                raise ValueError(f"lr must be a number or a tensor of shape {tuple(grad.shape)} "
                                 f"(one per column of J), got shape {tuple(lr.shape)}")
            lr = lr.detach().to(grad.device)
        elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"lr must be a non-negative number (the network's learning rate), "
                             f"got {lr!r}")
        self._pending = (grad.detach() * lr)

    def aggregate_validation(self, J: Tensor, grad: Tensor, losses: Tensor | None = None, *,
                             lr: float | Tensor = 1.0, present: Tensor | Sequence[bool] | None = None,
                             check_finite: bool = True) -> Aggregation:
        """:meth:`set_validation` then :meth:`aggregate`: one step of (1) and the direction."""
        self.set_validation(grad, lr)
        return self.aggregate(J, losses, present=present, check_finite=check_finite)

    def aggregate(self, J: Tensor, losses: Tensor | None = None, *,
                  present: Tensor | Sequence[bool] | None = None,
                  check_finite: bool = True) -> Aggregation:
        """As :meth:`Aggregator.aggregate`, reading the staged validation input (consumed by the
        call, failed or not); ``ValueError`` without one, ``NonFiniteError`` for a non-finite one
        (under ``check_finite``), both before anything changes."""
        u, self._pending = self._pending, None
        if u is None:
            raise ValueError(_NEEDS)
        if isinstance(J, Tensor) and J.dim() == 2 and u.shape[0] != J.shape[1]:
            raise ValueError(f"the validation gradient has {u.shape[0]} entries but J has "
                             f"{J.shape[1]} columns: it must be the gradient over the same "
                             "parameters, in J's layout")
        if self._checks_finite(check_finite) and not bool(torch.isfinite(u).all()):
            from .._errors import NonFiniteError

            raise NonFiniteError(
                "the validation gradient is not finite (NaN or inf): look at the validation "
                "losses and the network's learning rate; to skip this check pass "
                "check_finite=False or set agg.check_finite = False")
        self._u = u
        try:
            return super().aggregate(J, losses, present=present, check_finite=check_finite)
        finally:
            self._u = None

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        T = J.shape[0]
        u = self._u
        assert u is not None
        if self._lam.value is None:
            self._lam.init(torch.full((T,), self.init, dtype=J.dtype, device=J.device))
        before = self._lam.get().clone()
        if before.shape[0] != T:
            raise ValueError(f"AutoLambda was tracking {before.shape[0]} tasks, got J with {T} "
                             "rows; call reset() to start over")
        meta_grad = -(J @ u.to(dtype=J.dtype, device=J.device))  # (2)
        self._lam.step(meta_grad)  # (1)
        w = self._lam.get().to(J.dtype)
        self.weights = w
        self.diagnostics = {"lambda_before": before, "meta_grad": meta_grad}
        return w @ J

    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"_lam": ((0,), self.init)}

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self._lam.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"lambda"}
        if unknown:
            raise ValueError(f"AutoLambda state has unknown keys {sorted(unknown)}")
        self._lam.load_state_dict(state.get("lambda", {}), "AutoLambda.lambda")

    def reset(self) -> None:
        self._lam.clear()
        self._pending = None

    def __repr__(self) -> str:
        primary = "" if self.primary is None else f", primary={list(self.primary)}"
        return (f"AutoLambda(init={self.init}, lr={self._lam.lr}, "
                f"optimizer={self._lam.optimizer_name!r}{primary}, "
                f"approximation={self.approximation!r})")


def _check_primary(primary: Sequence[int] | None) -> tuple[int, ...] | None:
    if primary is None:
        return None
    if isinstance(primary, (str, bytes)) or not isinstance(primary, Sequence) or not primary:
        raise ValueError(f"primary must be None (every task) or a non-empty sequence of task "
                         f"indices, got {primary!r}")
    out = []
    for t in primary:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"primary must hold non-negative task indices, got {t!r}")
        if t in out:
            raise ValueError(f"primary lists task {t} twice")
        out.append(t)
    return tuple(out)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
