"""CoNAL: conflict-noticed architecture learning (Yue, Zhang and Liang, AAAI 2023).

* :class:`ConflictNoticing` (``conflict.py``): eq. 5 as a gradient plugin for
  :class:`~torch_mtlgrad.MultiTaskOptimizer` (``conflict_noticing=[...]`` is the shortcut).
* :class:`SearchSpace` (``space.py``): the shared chain, purely-specific copies, ``alpha [T, P]``.
* :class:`BilevelSearch` (``search.py``): first-order bilevel search, Algorithm 1.
* :func:`derive`, :class:`Architecture`, :func:`build_network` (``derive.py``): argmax branch
  points, pruning, JSON export and rebuild.
* :func:`retrain_optimizer` (``retrain.py``): retraining from scratch with RLW (eq. 3) or any
  aggregator.
* :class:`ProgressiveSearch` (``pro.py``): CoNAL-Pro, section 2.4.

The model-side parts (space, derive, network) need no optimizer; the search and retraining
helpers wrap one.
"""

from .conflict import ConflictNoticing, SegmentGramian, first_conflict, segment_gramians
from .derive import Architecture, Branch, BranchedNetwork, Derived, build_network, derive
from .pro import ProgressiveSearch, ProResult, ProStage
from .retrain import retrain_optimizer
from .search import BilevelSearch
from .space import SearchSpace, count_parameters, reinitialize

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
