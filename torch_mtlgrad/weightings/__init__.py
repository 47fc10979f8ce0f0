"""Loss weightings with learned or tracked state, usable wherever an aggregator is.

Each is an :class:`~torch_mtlgrad.aggregators.Aggregator` (``agg(J, losses) -> d``) whose
direction is ``w^T J`` for task weights ``w`` it learns or tracks from the losses (and, for
GradNorm, the gradient norms) across calls, with its own step size and optimizer; everything it
keeps is in ``state_dict()``.  They are loss weightings, not directions, so they take no
``"+tension"``.  Each lives in its own file under ``torch_mtlgrad/aggregators/`` beside the other
methods; this package is their namespace.

* :class:`UncertaintyWeighting` (``"uw"``): Kendall, Gal and Cipolla, CVPR 2018.
* :class:`GradNorm` (``"gradnorm"``): Chen et al., ICML 2018.
* :class:`DWA` (``"dwa"``): Liu, Johns and Davison, CVPR 2019.
* :class:`FAMO` (``"famo"``): Liu, Liu, Stone and Liu, NeurIPS 2023.
"""

from ..aggregators.dwa import DWA
from ..aggregators.famo import FAMO
from ..aggregators.gradnorm import GradNorm
from ..aggregators.uw import UncertaintyWeighting

__all__ = ["DWA", "FAMO", "GradNorm", "UncertaintyWeighting"]
