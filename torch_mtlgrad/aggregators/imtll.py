"""IMTL-L, impartial loss balancing (Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, *Towards
Impartial Multi-task Learning*, ICLR 2021, Sec. 3.1), and the loss half of the paper's hybrid
IMTL (:class:`~torch_mtlgrad.aggregators.imtl.IMTL`).

Each task has a learned scale parameter ``s_t``; the task's scaled loss is

    L~_t = e^{s_t} L_t - s_t,

whose minimiser in ``s_t`` is ``s_t = -log L_t``, where the scaled loss ``e^{s_t} L_t`` is 1:
every task's scaled loss is pushed to the same value, 1.  (At that optimum the weights
``e^{s_t} = 1 / L_t`` are those at the optimum of uncertainty weighting's ``e^{-s} L + s``; the
two differ on the way there, the gradients in ``s`` being ``e^{s} L - 1`` and
``1 - e^{-s} L``.)

At each call, with ``s`` the current scales:

* the direction is the gradient of ``sum_t L~_t`` in the shared parameters:
  ``d = sum_t e^{s_t} g_t``, i.e. ``weights = e^{s}`` (the weights use ``s`` *before* this
  call's update, as one joint step would);
* then ``s`` takes one step of its own optimizer with the gradient
  ``dL~_t / ds_t = e^{s_t} L_t - 1``, which needs only the loss values.

Choices the paper leaves open (documented): the paper trains ``s`` jointly with the network by
the same optimizer; here it has its own (``optimizer="adam"`` by default, ``lr=1e-3``, as for
uncertainty weighting; set ``lr`` to the network's to mirror the paper).  ``s`` starts at
``init_log_scale`` (default 0: weights 1, the plain sum at the first step).  The paper's base
``e`` of the exponent (it notes any base works) is fixed at ``e``.  The task-specific
parameters receive the plain sum of the task gradients, as for every method of this library
(in the paper they receive the scaled losses' gradients, ``e^{s_t}`` times theirs).

The weights need neither ``J`` nor its Gramian (``reads == "losses"``: through
:class:`~torch_mtlgrad.MultiTaskOptimizer` the step is one backward pass of
``sum_t e^{s_t} L_t``).  Everything stays on the losses' device; no host synchronisation.
State (``state_dict``): ``s`` and its optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._learned import LearnedVector, OptimizerName

__all__ = ["IMTLL"]


class IMTLL(WeightedAggregator):
    """IMTL-L (Liu et al. 2021, Sec. 3.1): ``weights = e^{s}``, ``s`` fit to
    ``sum_t e^{s_t} L_t - s_t``.

    Args:
        lr: learning rate of the scales' optimizer (default 1e-3).
        optimizer: ``"adam"`` (default) or ``"sgd"`` (then ``s <- s - lr (e^s L - 1)``).
        init_log_scale: initial ``s_t`` (default 0).

    Diagnostics of the last call: ``log_scale`` (the ``s`` used for the weights),
    ``objective`` (``sum_t e^{s_t} L_t - s_t`` at that ``s``).

    Absent tasks: an absent task's ``s_t`` and its optimizer moments do not move; a task first
    present later starts at ``init_log_scale`` with a fresh Adam (its own step count).  A loss
    of 0 is valid (``s_t`` then increases).

    Example:
        >>> import torch
        >>> agg = IMTLL(lr=0.1, optimizer="sgd")
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> agg(J, torch.tensor([2.0, 0.5]))   # s = 0: weights 1
        tensor([1., 1.])
        >>> agg.log_scale                      # s - 0.1 (e^s L - 1)
        tensor([-0.1000,  0.0500])
        >>> agg(J, torch.tensor([2.0, 0.5]))   # weights e^s: the larger loss is scaled down
        tensor([0.9048, 1.0513])
    """

    needs_losses = True
    stateful = True
    paper = ("Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial Multi-task "
             "Learning*, ICLR 2021")
    summary = "learned loss scales e^s, s fit to e^s L - s: every scaled loss pushed to 1"

    def __init__(self, lr: float = 1e-3, optimizer: OptimizerName = "adam",
                 init_log_scale: float = 0.0) -> None:
        super().__init__()
        if isinstance(init_log_scale, bool) or not isinstance(init_log_scale, (int, float)):
            raise TypeError(f"init_log_scale must be a number, got {type(init_log_scale).__name__}")
        self.init_log_scale = float(init_log_scale)
        self._s = LearnedVector(optimizer, lr)

    @property
    def log_scale(self) -> Tensor | None:
        """The current scales ``s`` (``None`` before the first call)."""
        return None if self._s.value is None else self._s.get()

    def _scales(self, losses: Tensor | None, T: int, dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor]:
        """``s`` before this call's update and the losses (in ``s``'s dtype); makes ``s`` on the
        first call."""
        if losses is None:
            raise ValueError(f"{type(self).__name__} needs the loss values: agg(J, losses)")
        if self._s.value is None:
            self._s.init(torch.full((T,), self.init_log_scale, dtype=dtype, device=device))
        s = self._s.get()
        if s.shape[0] != T:
            raise ValueError(f"{type(self).__name__} was tracking {s.shape[0]} tasks, got {T}; "
                             "call reset() to start over")
        return s, losses.to(s)

    def _update(self, s: Tensor, L: Tensor) -> None:
        """The diagnostics at ``s`` and one step of ``s`` on ``sum_t e^{s_t} L_t - s_t``."""
        k = torch.exp(s)
        self.diagnostics = {"log_scale": s.clone(), "objective": (k * L - s).sum()}
        self._s.step(k * L - 1)

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        s, L = self._scales(losses, num_tasks, dtype, device)
        w = torch.exp(s)
        self._update(s, L)
        return w.to(dtype)

    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"_s": ((0,), self.init_log_scale)}

    def state_dict(self) -> dict[str, Any]:
        return {"log_scale": self._s.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"log_scale"}
        if unknown:
            raise ValueError(f"{type(self).__name__} state has unknown keys {sorted(unknown)}")
        self._s.load_state_dict(state.get("log_scale", {}), f"{type(self).__name__}.log_scale")

    def reset(self) -> None:
        self._s.clear()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(lr={self._s.lr}, optimizer={self._s.optimizer_name!r}, "
                f"init_log_scale={self.init_log_scale})")
