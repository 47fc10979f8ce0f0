"""The aggregator interface shared by every gradient-combination method.

An aggregator maps the task Jacobian ``J`` (shape ``[T, D]``, row ``t`` the gradient of
loss ``t`` with respect to the shared parameters) and optionally the loss values ``[T]`` to
one direction ``d`` of shape ``[D]``.  It is plain math on tensors: nothing here knows about
optimizers, hooks or models.

Two kinds of subclasses:

* :class:`Aggregator`: implement :meth:`Aggregator.forward` (``J, losses -> d``).
* :class:`WeightedAggregator`: the method is a weighting ``w`` of the rows, ``d = w^T J``.
  Implement :meth:`WeightedAggregator.weighting`.  When ``gramian_only`` is true the weighting
  reads only ``G = J J^T`` (and the losses), which is what lets it run on ``G`` alone.

After every call ``agg.weights`` holds the task weights of the last direction when the direction
is a combination of the rows (else ``None``) and ``agg.diagnostics`` a dict of tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Aggregator", "WeightedAggregator", "check_matrix", "check_losses", "work_dtype"]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype aggregation runs in: float64 stays, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_matrix(J: Tensor) -> Tensor:
    """Validate a task Jacobian and return it in the aggregation dtype (float32 or float64)."""
    if not isinstance(J, Tensor):
        raise TypeError(f"J must be a torch.Tensor of shape [T, D], got {type(J).__name__}")
    if J.dim() != 2:
        raise ValueError(f"J must have shape [T, D] (2 dimensions), got shape {tuple(J.shape)}")
    if J.shape[0] == 0:
        raise ValueError("J has no rows: there must be at least one task")
    if not (J.is_floating_point()):
        raise TypeError(f"J must be a floating-point tensor, got dtype {J.dtype}")
    return J.to(work_dtype(J.dtype))


def check_losses(losses: Any, num_tasks: int, like: Tensor) -> Tensor:
    """Validate loss values for ``num_tasks`` tasks; returns a detached 1-D tensor like ``like``."""
    if isinstance(losses, (list, tuple)):
        losses = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in losses])
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a tensor of shape [{num_tasks}], got {type(losses).__name__}")
    losses = losses.detach()
    if losses.dim() != 1 or losses.shape[0] != num_tasks:
        raise ValueError(
            f"losses must have shape [{num_tasks}] (one value per row of J), "
            f"got shape {tuple(losses.shape)}"
        )
    return losses.to(device=like.device, dtype=like.dtype)


class Aggregator(ABC):
    """Base class: ``agg(J, losses=None) -> d``.

    Subclasses set the class attributes:

    * ``gramian_only``: the direction depends on ``J`` only through ``G = J J^T`` (the weights do;
      the direction is then ``w^T J``).
    * ``needs_losses``: the method reads the loss values; calling it without them is an error.
    * ``stateful``: it keeps state between calls (returned by :meth:`state_dict`).
    """

    gramian_only: ClassVar[bool] = False
    needs_losses: ClassVar[bool] = False
    stateful: ClassVar[bool] = False

    def __init__(self) -> None:
        self.weights: Tensor | None = None
        self.diagnostics: dict[str, Tensor] = {}

    def __call__(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        out_dtype = J.dtype if isinstance(J, Tensor) else None
        Jw = check_matrix(J)
        lw: Tensor | None = None
        if losses is not None:
            lw = check_losses(losses, Jw.shape[0], Jw)
        elif self.needs_losses:
            raise ValueError(f"{type(self).__name__} needs the loss values: call agg(J, losses)")
        d = self.forward(Jw, lw)
        return d.to(out_dtype)

    @abstractmethod
    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        """Compute the direction from a validated ``J`` (float32/64) and losses (or ``None``)."""

    # State -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the method keeps between calls (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    def reset(self) -> None:
        """Forget all state kept between calls (stateful methods override this)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WeightedAggregator(Aggregator):
    """An aggregator whose direction is ``d = w^T J`` for a weighting ``w`` of the rows."""

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        G = J @ J.T if self.gramian_only else None
        w = self.weighting(J, G, losses)
        self.weights = w
        return w @ J

    @abstractmethod
    def weighting(self, J: Tensor, G: Tensor | None, losses: Tensor | None) -> Tensor:
        """Return the ``[T]`` weights.  ``G`` is ``J J^T`` when ``gramian_only`` (use it, not J)."""
