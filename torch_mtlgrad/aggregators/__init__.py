"""Gradient aggregators: ``agg(J, losses=None) -> d`` over the task Jacobian ``J`` ([T, D]).

Build one by class, or by short name through :func:`get`; :func:`available` lists the names.
"""

from ._base import Aggregator, WeightedAggregator
from ._registry import available, get, register
from .central import Central, central_weights
from .mean import Mean, Sum
from .mgda import MinNorm
from .tension import Tensioned

__all__ = [
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
]
