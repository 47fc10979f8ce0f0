"""The aggregator interface shared by every gradient-combination method.

An aggregator maps the task Jacobian ``J`` (shape ``[T, D]``, row ``t`` the gradient of
loss ``t`` with respect to the shared parameters) and optionally the loss values ``[T]`` to
one direction ``d`` of shape ``[D]``.  It is plain math on tensors: nothing here knows about
optimizers, hooks or models.

Two kinds of subclasses:

* :class:`Aggregator`: implement :meth:`Aggregator.forward` (``J, losses -> d``).
* :class:`WeightedAggregator`: the method is a weighting ``w`` of the rows, ``d = w^T J``.
  Implement :meth:`WeightedAggregator.weighting`, which is handed ``G = J J^T`` when the class
  is ``gramian_only`` and no matrix at all otherwise (fixed or loss-based weights): it never
  sees ``J``.  That is what lets :meth:`WeightedAggregator.aggregate_gramian` run on ``G`` alone.

:meth:`Aggregator.aggregate` returns an :class:`Aggregation`: the direction, the task weights when
the direction is a combination of the rows (else ``None``) and the method's diagnostics; callers
use it (``agg(J, losses)`` is its ``direction``).  The attributes ``agg.weights`` and
``agg.diagnostics`` are the last call's, the same tensors as the returned :class:`Aggregation`,
for interactive use.

Two read-only properties tell a caller (the optimizer) which routes a method allows, so that it
needs no ``isinstance`` check and never reads a wrapper's base: :attr:`Aggregator.from_gramian`
(the weights can come from ``G`` without ``J``) and :attr:`Aggregator.runs_on_features` (the
method may run on any matrix with the same Gramian as ``J``).

:func:`work_dtype` is the one rule for the dtype aggregation runs in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Aggregation", "Aggregator", "WeightedAggregator", "check_gramian", "check_losses",
           "check_matrix", "work_dtype"]


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


def check_gramian(G: Tensor) -> Tensor:
    """Validate a Gramian ``G = J J^T`` and return it in the aggregation dtype (as
    :func:`check_matrix` does for ``J``)."""
    if not isinstance(G, Tensor):
        raise TypeError(f"G must be a torch.Tensor of shape [T, T], got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square [T, T] Gramian, got shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise ValueError("G has no rows: there must be at least one task")
    if not G.is_floating_point():
        raise TypeError(f"G must be a floating-point tensor, got dtype {G.dtype}")
    return G.to(work_dtype(G.dtype))


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
    """Base class: ``agg.aggregate(J, losses=None) -> Aggregation``; ``agg(J, losses) -> d``.

    Subclasses set the class attributes:

    * ``gramian_only``: the direction depends on ``J`` only through ``G = J J^T`` (the weights do;
      the direction is then ``w^T J``).
    * ``needs_losses``: the method reads the loss values; calling it without them is an error.
    * ``stateful``: it keeps state between calls (returned by :meth:`state_dict`).

    Attributes:
        weights: the last call's task weights (``None`` before the first call, or when the
            direction is not a combination of the rows): the same tensor as that call's
            :attr:`Aggregation.weights`.
        diagnostics: the last call's diagnostics, the same dict as :attr:`Aggregation.diagnostics`.

    Use the returned :class:`Aggregation` rather than these attributes: they are overwritten by
    the next call.
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
        """Whether the direction is ``w^T J`` with weights that read only ``G = J J^T`` and/or the
        losses, so that :meth:`WeightedAggregator.aggregate_gramian` can run without ``J``.

        True for every :class:`WeightedAggregator` (except GradNorm with ``layer=``, whose norms
        are over some columns of ``J``); false for every other aggregator, the tensioner included
        (its direction ``beta v + omega^T J`` needs the base direction ``v``)."""
        return False

    @property
    def runs_on_features(self) -> bool:
        """Whether the method may run on any matrix with the same Gramian as ``J``: the
        representation-gradient approximation (MGDA-UB, Sener and Koltun, *Multi-Task Learning as
        Multi-Objective Optimization*, NeurIPS 2018, Sec. 3.3) applies it to the gradients with
        respect to the shared features instead of the shared parameters.

        True when the class is ``gramian_only`` or a :class:`WeightedAggregator` (whose weights read
        ``G`` or nothing of ``J``); GradNorm with ``layer=`` is not (its columns are parameters).
        :class:`~torch_mtlgrad.aggregators.Tensioned` answers as its base method."""
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
        """The weights from the Gramian ``G = J J^T`` (``[T, T]``) alone, for callers that never
        build ``J`` (the direction ``w^T J`` is theirs to form, e.g. block by block with
        :mod:`~torch_mtlgrad.aggregators.blocks`): an :class:`Aggregation` with ``direction=None``.

        ``G`` and the losses are validated and cast as :meth:`aggregate` does for ``J``; the call
        counts as one step of a stateful method and records ``weights`` and ``diagnostics`` just
        as :meth:`aggregate` does (the same weights as ``aggregate(J)``, up to how ``G`` was
        rounded).  Only where
        :attr:`from_gramian` is true (else ``ValueError``).

        Example:
            >>> from torch_mtlgrad.aggregators import get
            >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
            >>> agg = get("mgda")
            >>> torch.allclose(agg.aggregate_gramian(J @ J.T).weights, agg.aggregate(J).weights)
            True
        """
        if not self.from_gramian:
            raise ValueError(f"{self!r} reads J itself: call aggregate(J, losses)")
        G = check_gramian(G)
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
        """True: the weights read ``G`` (``gramian_only``) or nothing of ``J``."""
        return True

    @property
    def runs_on_features(self) -> bool:
        """True: ``w`` depends on ``J`` only through ``G``, and ``w^T`` applies to any matrix."""
        return True

    @abstractmethod
    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return the ``[T]`` weights (``T = num_tasks``, in ``dtype`` on ``device``).  ``G`` is
        ``J J^T`` when the class is ``gramian_only``, else ``None``: the weights then read the
        losses (or nothing)."""
