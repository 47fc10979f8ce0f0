"""CoNAL: conflict-noticed architecture learning (Yue, Zhang and Liang, AAAI 2023).

* :class:`ConflictNoticing` (``conflict.py``): eq. 5 as a gradient plugin for
  :class:`~torch_mtlgrad.MultiTaskOptimizer` (``conflict_noticing=[...]`` is the shortcut).
* :class:`SearchSpace` (``space.py``): the shared chain, purely-specific copies, ``alpha [T, P]``.
* :class:`BilevelSearch` (``search.py``): first-order bilevel search, Algorithm 1.
* :func:`derive`, :class:`Architecture`, :func:`build_network` (``derive.py``): argmax branch
  points, pruning, JSON export and rebuild.
* :func:`retrain_optimizer` (``retrain.py``): retraining from scratch with RLW (eq. 3) or any
  aggregator.
* :class:`ProgressiveSearch` (``pro.py``): CoNAL-Pro, the paper's section 2.4.

The model-side parts (space, derive, network) and the conflict-noticing plugin need no
optimizer and load with this package; the search and retraining drivers wrap a
:class:`~torch_mtlgrad.MultiTaskOptimizer` and load on first access (the optimizer builds
:class:`ConflictNoticing` for ``conflict_noticing=``, so this package must not import it).
"""

import importlib
from typing import TYPE_CHECKING, Any

from .conflict import ConflictNoticing, SegmentGramian, first_conflict, segment_gramians
from .derive import Architecture, Branch, BranchedNetwork, Derived, build_network, derive
from .space import SearchSpace, count_parameters, reinitialize

if TYPE_CHECKING:  # for type checkers only: at run time these load on first access
    from .pro import ProgressiveSearch, ProResult, ProStage
    from .retrain import retrain_optimizer
    from .search import BilevelSearch

# The drivers that build a MultiTaskOptimizer: name -> module, loaded on first access.
_DRIVERS = {"BilevelSearch": "search", "ProgressiveSearch": "pro", "ProResult": "pro",
            "ProStage": "pro", "retrain_optimizer": "retrain"}

__all__ = [
    "Architecture",
    "BilevelSearch",
    "Branch",
    "BranchedNetwork",
    "ConflictNoticing",
    "Derived",
    "ProResult",
    "ProStage",
    "ProgressiveSearch",
    "SearchSpace",
    "SegmentGramian",
    "build_network",
    "count_parameters",
    "derive",
    "first_conflict",
    "reinitialize",
    "retrain_optimizer",
    "segment_gramians",
]


def __getattr__(name: str) -> Any:
    if name in _DRIVERS:
        value = getattr(importlib.import_module(f"{__name__}.{_DRIVERS[name]}"), name)
        globals()[name] = value  # later accesses skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
