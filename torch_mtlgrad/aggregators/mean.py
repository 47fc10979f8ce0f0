"""Equal weighting (EW): the mean or the sum of the task gradients.

``Sum`` gives exactly what ``sum(losses).backward()`` puts into the shared parameters;
``Mean`` divides it by T.  Both read no Gramian and keep no state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import WeightedAggregator

__all__ = ["Mean", "Sum"]


class Mean(WeightedAggregator):
    """``d = (1/T) sum_t g_t``.

    Example:
        >>> import torch
        >>> Mean()(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
        tensor([0.5000, 1.5000])
    """

    paper = "baseline"
    summary = "equal weighting, `1/T` each"

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        T = num_tasks
        return torch.full((T,), 1.0 / T, dtype=dtype, device=device)


class Sum(WeightedAggregator):
    """``d = sum_t g_t``, what ``sum(losses).backward()`` gives.

    Example:
        >>> import torch
        >>> Sum()(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
        tensor([1., 3.])
    """

    paper = "baseline"
    summary = "equal weighting, 1 each (the default: trains as `sum(losses).backward()`)"

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.ones(num_tasks, dtype=dtype, device=device)
