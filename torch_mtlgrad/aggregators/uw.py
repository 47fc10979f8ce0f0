"""Uncertainty weighting (UW; Kendall, Gal and Cipolla, CVPR 2018).

Kendall, Gal, Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
and Semantics*, CVPR 2018.  Each task has a learned homoscedastic noise ``sigma_t``; the joint
loss is ``sum_t 1/(2 sigma_t^2) L_t + log sigma_t`` for regression (eq. 7) and
``sum_t 1/sigma_t^2 L_t + log sigma_t`` for classification (eq. 10).  As the paper recommends
(Sec. 3.2), the learned quantity is the log variance ``s_t = log sigma_t^2``, which gives the
numerically stable form used here for every task:

    L_UW(theta, s) = sum_t exp(-s_t) L_t(theta) + s_t

(that is twice eq. 7, or eq. 10 with ``log sigma^2`` for ``log sigma``; the minimiser in ``s``,
``s_t = log L_t``, is the same).  So at each call, with ``s`` the current log variances:

* the direction is the gradient of ``L_UW`` in the shared parameters:
  ``d = sum_t exp(-s_t) g_t``, i.e. ``weights = exp(-s)`` (the weights use ``s`` *before* this
  call's update, as one joint step of ``theta`` and ``s`` would);
* then ``s`` takes one step of its own optimizer with the gradient
  ``dL_UW/ds_t = 1 - exp(-s_t) L_t``, which needs only the loss values.

In the paper ``s`` is trained jointly with the network by the same optimizer; here it has its own
(``optimizer="adam"`` by default, ``lr=1e-3``; set ``lr`` to the network's learning rate to
mirror the paper).  ``s`` starts at ``init_log_var`` (default 0, i.e. ``sigma = 1``).

The weights need neither ``J`` nor its Gramian (only the losses); the direction is ``w^T J``.
Everything stays on ``J``'s device; no host synchronisation.
State (``state_dict``): ``s`` and its optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._learned import LearnedVector, OptimizerName

__all__ = ["UncertaintyWeighting"]


class UncertaintyWeighting(WeightedAggregator):
    """UW (Kendall et al., 2018): ``weights = exp(-s)``, ``s`` fit to ``sum_t exp(-s_t) L_t + s_t``.

    Args:
        lr: learning rate of the log variances' optimizer (default 1e-3).
        optimizer: ``"adam"`` (default) or ``"sgd"`` (then ``s <- s - lr (1 - exp(-s) L)``).
        init_log_var: initial ``s_t = log sigma_t^2`` (default 0).

    Diagnostics of the last call: ``log_var`` (the ``s`` used for the weights), ``objective``
    (``sum_t exp(-s_t) L_t + s_t`` at that ``s``).

    Absent tasks: an absent task's ``s_t`` and its optimizer moments do not move; a task first
    present later starts at ``init_log_var`` with a fresh Adam (its own step count).  A loss of
    0 is valid (``s_t`` then decreases).

    Example:
        >>> import torch
        >>> agg = UncertaintyWeighting(lr=0.1, optimizer="sgd")
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> agg(J, torch.tensor([2.0, 0.5]))   # s = 0: weights 1
        tensor([1., 1.])
        >>> agg.state_dict()["log_var"]["value"]   # s - 0.1 (1 - L)
        tensor([ 0.1000, -0.0500])
        >>> agg(J, torch.tensor([2.0, 0.5]))   # weights exp(-s)
        tensor([0.9048, 1.0513])
    """

    paper = ("Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for "
             "Scene Geometry and Semantics*, CVPR 2018")
    summary = "uncertainty weighting: learned log-variances weigh the losses"

    needs_losses = True
    stateful = True

    def __init__(self, lr: float = 1e-3, optimizer: OptimizerName = "adam",
                 init_log_var: float = 0.0) -> None:
        super().__init__()
        if not isinstance(init_log_var, (int, float)):
            raise TypeError(f"init_log_var must be a number, got {type(init_log_var).__name__}")
        self.init_log_var = float(init_log_var)
        self._s = LearnedVector(optimizer, lr)

    @property
    def log_var(self) -> Tensor | None:
        """The current log variances ``s`` (``None`` before the first call)."""
        return None if self._s.value is None else self._s.get()

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        if losses is None:
            raise ValueError("UncertaintyWeighting needs the loss values: agg(J, losses)")
        T = num_tasks
        if self._s.value is None:
            self._s.init(torch.full((T,), self.init_log_var, dtype=dtype, device=device))
        s = self._s.get()
        if s.shape[0] != T:
            raise ValueError(f"UncertaintyWeighting was tracking {s.shape[0]} tasks, got J with "
                             f"{T} rows; call reset() to start over")
        L = losses.to(s.dtype)
        w = torch.exp(-s)
        self.diagnostics = {"log_var": s.clone(), "objective": (w * L + s).sum()}
        self._s.step(1 - w * L)
        return w.to(dtype)

    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"_s": ((0,), self.init_log_var)}

    def state_dict(self) -> dict[str, Any]:
        return {"log_var": self._s.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"log_var"}
        if unknown:
            raise ValueError(f"UncertaintyWeighting state has unknown keys {sorted(unknown)}")
        self._s.load_state_dict(state.get("log_var", {}), "UncertaintyWeighting.log_var")

    def reset(self) -> None:
        self._s.clear()

    def __repr__(self) -> str:
        return (f"UncertaintyWeighting(lr={self._s.lr}, optimizer={self._s.optimizer_name!r}, "
                f"init_log_var={self.init_log_var})")
