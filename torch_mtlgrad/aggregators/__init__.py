"""Gradient aggregators: ``agg(J, losses=None) -> d`` over the task Jacobian ``J`` ([T, D]).

Build one by class, or by short name through :func:`get`; :func:`available` lists the names.
Every method of the registry is importable from here by its class name (loaded on first use, so
importing this package does not import cvxpy or the methods you do not use).
"""

from typing import Any

from ._base import Aggregation, Aggregator, WeightedAggregator, work_dtype
from ._registry import _ENTRIES, available, get, register, resolve
from .central import Central, central_weights
from .mean import Mean, Sum
from .mgda import MinNorm
from .tension import Tensioned

_LAZY = {cls: module for module, cls, _ in _ENTRIES.values() if module.startswith(__name__ + ".")}

__all__ = [
    "Aggregation",
    "Aggregator",
    "WeightedAggregator",
    "Central",
    "Mean",
    "MinNorm",
    "Sum",
    "Tensioned",
    "available",
    "central_weights",
    "get",
    "register",
    "resolve",
    "work_dtype",
    *sorted(c for c in _LAZY if c not in {"Mean", "Sum", "MinNorm", "Central"}),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
