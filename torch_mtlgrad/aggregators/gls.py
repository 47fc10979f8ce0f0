"""Geometric loss strategy (GLS; Chennupati, Sistu, Yogamani and Rawashdeh, *MultiNet++:
Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning*, CVPR
Workshops 2019).

GLS trains on the geometric mean of the task losses instead of their sum (the paper's eq. for
the total loss ``L_total = (prod_t L_t)^{1/T}``), which makes the objective invariant to the
scale of each loss: multiplying ``L_t`` by ``c`` multiplies ``L_total`` by ``c^{1/T}``.  Its
gradient in the shared parameters is ``sum_t (dF/dL_t) g_t`` with

    F(L) = (prod_t L_t)^{1/T},      w_t = dF/dL_t = F / (T L_t),

so the direction is ``w^T J``: tasks with small losses get large weights.  The weights read the
loss values only (``reads == "losses"``): through :class:`~torch_mtlgrad.MultiTaskOptimizer`
the step is one backward pass of ``sum_t w_t L_t``, whose gradient is that of ``F`` (in the
shared parameters; the task-specific ones get the plain sum, as for every method here).

Choices the paper leaves open (documented):

* ``F`` is computed as ``exp(mean_t log L_t)`` (no overflow or underflow of the product for many
  tasks or tiny losses).
* The losses must be positive: at ``L_t = 0`` the gradient ``F / (T L_t)`` is infinite for
  ``T >= 2`` (``0^{1/T}`` has no derivative at 0).  A non-positive loss is a ``ValueError``
  naming the task (one host synchronisation for the check; ``validate=False`` skips it, and the
  weights are then whatever the arithmetic gives).
* LibMTL's ``GLS`` takes the same backward pass (``(prod L)^{1/T}``); the weights it *returns*
  for logging, ``L_t / (T prod L)``, are not the gradient's weights, which are the ones here.

Stateless: the weights are a function of the current losses only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Aggregator, WeightedAggregator

__all__ = ["GLS", "check_positive_losses"]


def check_positive_losses(agg: Aggregator, losses: Tensor, why: str) -> None:
    """Raise ``ValueError`` naming the first task whose loss is not positive (``why``: what
    needs positive losses).  One host synchronisation."""
    bad = (~(losses > 0)).nonzero().flatten()
    if bad.numel():
        t = int(bad[0])
        raise ValueError(
            f"task {agg._task_index(t)} has loss {float(losses[t])!r}: {why} needs positive "
            "losses; pass None for a task that is absent this step, or add a small constant to "
            "the loss")


class GLS(WeightedAggregator):
    """GLS (Chennupati et al. 2019): the gradient of the geometric mean of the losses,
    ``w_t = F / (T L_t)``, ``F = (prod_t L_t)^{1/T}``.

    Args:
        validate: check that every loss is positive (default ``True``; one host
            synchronisation).

    Diagnostics of the last call: ``objective`` (``F``, the geometric mean).

    Absent tasks: the geometric mean of the present tasks' losses (``T`` = the number present).

    Example:
        >>> import torch
        >>> agg = GLS()
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> agg(J, torch.tensor([4.0, 1.0]))       # F = 2: w = 2 / (2 L)
        tensor([0.2500, 1.0000])
        >>> agg.diagnostics["objective"]
        tensor(2.)
    """

    needs_losses = True
    paper = ("Chennupati, Sistu, Yogamani & Rawashdeh, *MultiNet++: Multi-Stream Feature "
             "Aggregation and Geometric Loss Strategy for Multi-Task Learning*, CVPRW 2019")
    summary = "gradient of the geometric mean of the losses: w_t = (prod L)^(1/T) / (T L_t)"

    def __init__(self, validate: bool = True) -> None:
        super().__init__()
        self.validate = bool(validate)

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        if losses is None:
            raise ValueError("GLS needs the loss values: agg(J, losses)")
        if self.validate:
            check_positive_losses(self, losses, "GLS's geometric mean (its gradient F / (T L_t))")
        L = losses.to(dtype=dtype, device=device)
        F = torch.exp(torch.log(L).mean())
        self.diagnostics = {"objective": F}
        return F / (num_tasks * L)

    def __repr__(self) -> str:
        return f"GLS(validate={self.validate})"
