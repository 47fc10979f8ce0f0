"""torch_mtlgrad: multi-task gradient combination as a drop-in PyTorch optimizer wrapper."""

from . import aggregators
from ._flat import FlatLayout
from .optimizer import MultiTaskOptimizer  # noqa: E402
from .plugins import GradientPlugin

__all__ = ["MultiTaskOptimizer", "FlatLayout", "GradientPlugin", "aggregators"]
__version__ = "0.1.0"
