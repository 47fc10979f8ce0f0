"""torch_mtlgrad: multi-task gradient combination as a drop-in PyTorch optimizer wrapper.

``MultiTaskOptimizer`` and the aggregators are imported here; the model-side methods
(``torch_mtlgrad.conal``, ``torch_mtlgrad.mpps``, ``torch_mtlgrad.normal``), the loss weightings
(``torch_mtlgrad.weightings``) and ``torch_mtlgrad.distributed`` load on first access.
"""

import importlib
from typing import Any

from . import aggregators
from .capture.layout import FlatLayout
from .optimizer import MultiTaskOptimizer, NonFiniteError
from .plugins import GradientPlugin

__all__ = ["MultiTaskOptimizer", "NonFiniteError", "FlatLayout", "GradientPlugin", "aggregators",
           "conal", "mpps", "normal", "weightings", "distributed", "metrics"]
__version__ = "0.1.0"

_SUBMODULES = {"conal", "mpps", "normal", "weightings", "distributed", "metrics", "capture",
               "diagnostics"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
