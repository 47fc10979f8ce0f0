"""NORMAL: multi-task learning with a time-aware neural ODE (Ye et al., IJCAI 2023).

* :class:`TimeAwareODE`: the heavy-ball ODE block with one learned position per task (eq. 5-6).
* :class:`PositionGrad` / :func:`position_readout`: the positions' gradient, eq. (7).
* :class:`PositionUpdater`: a gradient plugin stepping the positions with their own step size
  inside ``MultiTaskOptimizer`` (Algorithm 1), jointly or alternating.
* :func:`distance_matrix`, :func:`group_positions`, :class:`PositionHistory`: task relatedness
  and the position curves (paper section 5.4, Fig. 2).
"""

from .block import TimeAwareODE
from .diagnostics import PositionHistory, distance_matrix, group_positions
from .integrate import euler_step, integrate_positions
from .position_grad import PositionGrad, eq7_gradient, position_readout
from .updater import (
    PositionUpdater,
    check_positions_not_in,
    parameters_except_positions,
    position_parameters,
)

__all__ = [
    "TimeAwareODE",
    "PositionGrad",
    "position_readout",
    "eq7_gradient",
    "euler_step",
    "integrate_positions",
    "PositionUpdater",
    "position_parameters",
    "parameters_except_positions",
    "check_positions_not_in",
    "distance_matrix",
    "group_positions",
    "PositionHistory",
]
