"""Per-task weights kept on the simplex across calls with absent tasks (SDMGrad's ``w``,
ExcessMTL's ``alpha``): one rule for restricting them to the present tasks.

A call with ``present`` sees the present tasks' slice of the kept weights (the base class's
``_task_state`` restriction).  :func:`present_share` renormalises that slice to sum 1 for the
call and returns the share of the simplex it held; the method stores its new weights times that
share, and the base class writes them back, so the kept weights stay on the simplex and an absent
task's entry does not move.  Before the first call the kept weights are ``1/T_total`` each (the
fill for a task never present before).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["present_share"]


def present_share(kept: Tensor | None, num_present: int, num_total: int,
                  like: Tensor) -> tuple[Tensor, Tensor]:
    """``(weights summing to 1, share)`` for a call on ``num_present`` of ``num_total`` tasks:
    the kept slice over its sum (uniform when it sums to 0), and that sum (``num_present /
    num_total`` before the first call, when ``kept`` is ``None``).  Sync-free; in ``like``'s
    dtype and device.

    Example:
        >>> present_share(torch.tensor([0.1, 0.3]), 2, 4, torch.empty(0))
        (tensor([0.2500, 0.7500]), tensor(0.4000))
    """
    uniform = like.new_full((num_present,), 1.0 / num_present)
    if kept is None:
        return uniform, like.new_tensor(num_present / num_total)
    kept = kept.to(like)
    mass = kept.sum()
    return torch.where(mass > 0, kept / torch.where(mass > 0, mass, 1.0), uniform), mass
