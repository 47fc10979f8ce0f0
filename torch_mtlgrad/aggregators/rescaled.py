"""``Rescaled``: a base aggregator's direction times the number of tasks it combined.

Why: the learning rate.  ``MultiTaskOptimizer``'s default, ``aggregator="sum"``, trains exactly as
``sum(losses).backward()``.  A method whose weights sum to 1 (scale convention ``"convex"``:
``mean``, ``mgda``, ``central``, ...; see :func:`~torch_mtlgrad.aggregators.scale_convention`)
gives a direction about ``T`` times shorter, so the same learning rate takes a step on the shared
parameters about ``T`` times smaller, while the task-specific parameters keep the sum's step.
``Rescaled`` multiplies the direction (and the weights) by ``T``, the number of rows of ``J``
it aggregated (the number of tasks present when ``present=`` marks some absent), so a
convex-combination method gets the scale of the sum and the learning rate tuned for
``sum(losses).backward()`` applies.  By name: the suffix ``"*T"`` (``get("mgda*T")``,
``get("mgda+tension*T")``; case-insensitive).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ._base import Aggregation, Aggregator, Reads
from ._registry import get

__all__ = ["Rescaled"]


def _count_present(present: Any, default: int) -> int:
    """The number of ``True`` entries of an already validated ``present`` (``default`` for
    ``None``)."""
    if present is None:
        return default
    if isinstance(present, Tensor):
        return int(present.sum())
    return sum(bool(v) for v in present)


class Rescaled(Aggregator):
    """A base aggregator with its direction and weights multiplied by the number of tasks.

    Args:
        base: an :class:`Aggregator`, or a short name for
            :func:`~torch_mtlgrad.aggregators.get` (e.g. ``"mgda"``, ``"central+tension"``).

    Every call returns ``T`` times the base's direction and weights, ``T`` the number of rows the
    base aggregated (with ``present=``, the present tasks).  Everything else is the base's: the
    flags ``gramian_only``, ``needs_losses``, ``stateful``, :attr:`reads`, :attr:`from_gramian`,
    :attr:`runs_on_features`, the state (:meth:`state_dict` is the base's, unchanged), the
    diagnostics (scale-free quantities, the same dict as the base's), the keyword arguments of
    each call (e.g. ``present=``), :meth:`aggregate_gramian` / :meth:`aggregate_losses` /
    :meth:`aggregate_norms` where the base has them, and the base's other public attributes
    (read-only, e.g. ``layer``).  With ``present=`` the weights have the base's length ``T_total``
    (0 at absent tasks) and are multiplied by ``T_present``.

    Example:
        On orthogonal rows MGDA's direction is a convex combination of them; ``"mgda*T"`` is
        ``T`` times it:

        >>> import torch
        >>> from torch_mtlgrad.aggregators import get
        >>> J = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
        >>> get("mgda")(J)
        tensor([0.3333, 0.6667, 0.3333])
        >>> get("mgda*T")(J)
        tensor([1., 2., 1.])
        >>> bool(torch.allclose(get("mgda*T")(J), J.shape[0] * get("mgda")(J)))
        True
        >>> get("mgda*T")
        Rescaled(MinNorm(normalization='none', method='auto'))
    """

    paper = "baseline"
    summary = ("the direction and weights times the number of tasks present: a convex method at "
               "the scale of the sum")

    def __init__(self, base: Aggregator | str) -> None:
        super().__init__()
        if isinstance(base, str):
            base = get(base)
        if not isinstance(base, Aggregator):
            raise TypeError(f"base must be an Aggregator or a name, got {type(base).__name__}")
        if isinstance(base, Rescaled):
            raise TypeError(f"{base!r} is already rescaled (rescaling twice multiplies by T^2)")
        self.base = base

    # Flags and routes: the base's ---------------------------------------------------------
    @property
    def gramian_only(self) -> bool:  # type: ignore[override]
        return bool(self.base.gramian_only)

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return bool(self.base.needs_losses)

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return bool(self.base.stateful)

    @property
    def reads(self) -> Reads:
        """The base's (see :attr:`Aggregator.reads`)."""
        return self.base.reads

    @property
    def from_gramian(self) -> bool:
        """The base's (see :attr:`Aggregator.from_gramian`)."""
        return self.base.from_gramian

    @property
    def runs_on_features(self) -> bool:
        """The base's: multiplying by ``T`` keeps every route the base allows."""
        return self.base.runs_on_features

    # Calls ------------------------------------------------------------------------------------
    def _scaled(self, out: Aggregation, T: int) -> Aggregation:
        d = None if out.direction is None else out.direction * T
        w = None if out.weights is None else out.weights * T
        self.weights = w
        self.diagnostics = out.diagnostics
        return Aggregation(d, w, out.diagnostics)

    def aggregate(self, J: Tensor, losses: Tensor | None = None, **kwargs: Any) -> Aggregation:
        """The base's :meth:`~Aggregator.aggregate` (keyword arguments passed through, e.g.
        ``present=``), direction and weights times ``J.shape[0]``."""
        out = self.base.aggregate(J, losses, **kwargs)
        return self._scaled(out, J.shape[0])

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        d = self.aggregate(J, losses).direction
        assert d is not None
        return d

    def aggregate_gramian(self, G: Tensor, losses: Tensor | None = None,
                          **kwargs: Any) -> Aggregation:
        """The base's ``aggregate_gramian`` (weights from ``G = J J^T`` alone), weights times
        ``G.shape[0]``; a ``ValueError`` where the base has none."""
        fn = getattr(self.base, "aggregate_gramian", None)
        if fn is None:
            raise ValueError(f"{self.base!r} reads J itself: call aggregate(J, losses)")
        out = fn(G, losses, **kwargs)
        return self._scaled(out, G.shape[0])

    def aggregate_losses(self, losses: Tensor | Sequence[float] | None = None,
                         **kwargs: Any) -> Aggregation:
        """The base's ``aggregate_losses`` (weights from the losses alone, for ``reads ==
        "losses"``), weights times the number of tasks present (``num_tasks``, or the ``True``
        entries of ``present``); a ``ValueError`` where the base has none."""
        fn = getattr(self.base, "aggregate_losses", None)
        if fn is None:
            raise ValueError(f"{self.base!r} has no loss-only route: call aggregate(J, losses)")
        out = fn(losses, **kwargs)
        T = _count_present(kwargs.get("present"), kwargs.get("num_tasks", 0))
        return self._scaled(out, T)

    def aggregate_norms(self, norms: Tensor, losses: Tensor, **kwargs: Any) -> Aggregation:
        """The base's ``aggregate_norms`` (weights from the task gradients' norms over a layer,
        for ``reads == "layer"``), weights times the number of norms given (the present tasks);
        a ``ValueError`` where the base has none."""
        fn = getattr(self.base, "aggregate_norms", None)
        if fn is None:
            raise ValueError(f"{self.base!r} takes no gradient norms: call aggregate(J, losses)")
        out = fn(norms, losses, **kwargs)
        return self._scaled(out, len(norms))

    def __getattr__(self, name: str) -> Any:
        """The base's public attributes (its settings, e.g. ``layer``), read-only.  A call route
        this class does not rescale (an ``aggregate_*`` method not defined here) is refused
        rather than forwarded unscaled."""
        base = self.__dict__.get("base")
        if base is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if name.startswith("aggregate") and hasattr(base, name):
            raise AttributeError(f"Rescaled does not rescale {type(base).__name__}.{name}: call "
                                 "aggregate(J, losses)")
        return getattr(base, name)

    # State: the base's ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base's state (``Rescaled`` keeps none of its own)."""
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)

    def reset(self) -> None:
        self.base.reset()

    def __repr__(self) -> str:
        return f"Rescaled({self.base!r})"

