"""Gradient aggregators over the task Jacobian ``J`` ([T, D]): plain math on tensors.

``agg.aggregate(J, losses=None)`` returns an :class:`Aggregation` (direction, task weights,
diagnostics); ``agg(J, losses)`` is its direction.  A :class:`WeightedAggregator` (``d = w^T J``
with weights that read only ``G = J J^T`` or the losses) also has
``aggregate_gramian(G, losses)`` for callers that hold ``G`` but not ``J``; the properties
``from_gramian`` and ``runs_on_features`` say which routes a method allows (see
:class:`Aggregator`).  :func:`work_dtype` is the dtype rule every caller shares.

Every method lives here, one module each: the direction methods and the loss weightings with
learned or tracked state (``uw``, ``gradnorm``, ``dwa``, ``famo``; also re-exported by
:mod:`torch_mtlgrad.weightings`).  Build one by class, or by short name through :func:`get`;
:func:`available` lists the names, :func:`aliases` the other spellings ``get`` accepts and
:func:`scale_convention` each method's scale (``"sum"``, ``"convex"`` or ``"unnormalised"``);
:class:`Rescaled` (the name suffix ``"*T"``) multiplies a direction by the number of tasks.
Every method of the registry is importable from here by its class name (loaded on first use, so
importing this package does not import cvxpy or the methods you do not use).  Nothing here
imports the optimizer, the capture code, the plugins or the model-side methods.
"""

from typing import Any

from ._base import Aggregation, Aggregator, WeightedAggregator, work_dtype
from ._registry import _ENTRIES, aliases, available, get, register, resolve, scale_convention
from .central import Central, central_weights
from .mean import Mean, Sum
from .mgda import MinNorm
from .rescaled import Rescaled
from .tension import Tensioned

_LAZY = {cls: module for module, cls, _ in _ENTRIES.values() if module.startswith(__name__ + ".")}

__all__ = [
    "Aggregation",
    "Aggregator",
    "WeightedAggregator",
    "Central",
    "Mean",
    "MinNorm",
    "Rescaled",
    "Sum",
    "Tensioned",
    "aliases",
    "available",
    "central_weights",
    "get",
    "register",
    "resolve",
    "scale_convention",
    "work_dtype",
    *sorted(c for c in _LAZY if c not in {"Mean", "Sum", "MinNorm", "Central"}),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
