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

:meth:`Aggregator.aggregate` returns an :class:`Aggregation`: the direction, the task weights when
the direction is a combination of the rows (else ``None``) and the method's diagnostics.  The
attributes ``agg.weights`` and ``agg.diagnostics`` hold the same tensors of the last call, for
interactive use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Aggregation", "Aggregator", "WeightedAggregator", "check_losses", "check_matrix", "work_dtype"]


def work_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype aggregation runs in: float64 stays, everything else (half precision, or mixed
    dtypes given as ``None``) becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Aggregation:
    """What one call of an aggregator found.

    Attributes:
        direction: ``d`` (``[D]``, in ``J``'s dtype); ``None`` from
            :meth:`WeightedAggregator.aggregate_gramian`, which never sees ``J``.
        weights: ``[T]`` task weights when ``d = w^T J`` (else ``None``).
        diagnostics: the method's own tensors (e.g. ``c`` and ``delta`` for tensioners).
    """

    direction: Tensor | None
    weights: Tensor | None
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


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
        """The direction ``d`` (``[D]``, in ``J``'s dtype): :meth:`aggregate`'s ``direction``."""
        d = self.aggregate(J, losses).direction
        assert d is not None
        return d

    def aggregate(self, J: Tensor, losses: Tensor | None = None) -> Aggregation:
        """Validate ``J`` (``[T, D]``) and the losses (``[T]`` or ``None``), then combine.

        Example:
            >>> from torch_mtlgrad.aggregators import get
            >>> out = get("mean").aggregate(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
            >>> out.direction, out.weights
            (tensor([0.5000, 0.5000]), tensor([0.5000, 0.5000]))
        """
        out_dtype = J.dtype if isinstance(J, Tensor) else None
        Jw = check_matrix(J)
        lw: Tensor | None = None
        if losses is not None:
            lw = check_losses(losses, Jw.shape[0], Jw)
        elif self.needs_losses:
            raise ValueError(f"{type(self).__name__} needs the loss values: call agg(J, losses)")
        d = self.forward(Jw, lw)
        return Aggregation(d.to(out_dtype), self.weights, self.diagnostics)

    @property
    def from_gramian(self) -> bool:
        """Whether the direction is ``w^T J`` with weights that read only ``G = J J^T`` and the
        losses, so that :meth:`WeightedAggregator.aggregate_gramian` can run without ``J``."""
        return False

    @property
    def runs_on_features(self) -> bool:
        """Whether the method may run on any matrix with the same Gramian as ``J``: the
        representation-gradient approximation (MGDA-UB, Sener and Koltun, NeurIPS 2018) applies it
        to the gradients with respect to the shared features."""
        return self.gramian_only

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
    """An aggregator whose direction is ``d = w^T J`` for a weighting ``w`` of the rows that reads
    only ``G = J J^T`` (``gramian_only``) or nothing of ``J`` at all (fixed or loss-based weights).
    """

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        G = J @ J.T if self.gramian_only else None
        w = self.weighting(G, losses, num_tasks=J.shape[0], dtype=J.dtype, device=J.device)
        self.weights = w
        return w @ J

    def aggregate_gramian(self, G: Tensor, losses: Tensor | None = None) -> Aggregation:
        """The weights from the Gramian ``G`` (``[T, T]``) alone, for callers that never build
        ``J`` (the direction ``w^T J`` is theirs to form, e.g. block by block).

        Example:
            >>> from torch_mtlgrad.aggregators import get
            >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
            >>> agg = get("mgda")
            >>> torch.allclose(agg.aggregate_gramian(J @ J.T).weights, agg.aggregate(J).weights)
            True
        """
        if not self.from_gramian:
            raise ValueError(f"{self!r} reads J itself: call aggregate(J, losses)")
        T = G.shape[0]
        if losses is None and self.needs_losses:
            raise ValueError(f"{type(self).__name__} needs the loss values: aggregate_gramian(G, losses)")
        lw = None if losses is None else check_losses(losses, T, G)
        w = self.weighting(G if self.gramian_only else None, lw, num_tasks=T, dtype=G.dtype,
                           device=G.device)
        self.weights = w
        return Aggregation(None, w, self.diagnostics)

    @property
    def from_gramian(self) -> bool:
        return True

    @property
    def runs_on_features(self) -> bool:
        return True

    @abstractmethod
    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return the ``[T]`` weights (``T = num_tasks``, in ``dtype`` on ``device``).  ``G`` is
        ``J J^T`` when the class is ``gramian_only``, else ``None``: the weights then read the
        losses (or nothing)."""
