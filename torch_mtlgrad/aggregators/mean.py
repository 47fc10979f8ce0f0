"""Equal weighting (EW): the mean or the sum of the task gradients.

``Sum`` gives exactly what ``sum(losses).backward()`` puts into the shared parameters;
``Mean`` divides it by T.  Both read no Gramian and keep no state.
"""

from __future__ import annotations

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

    def weighting(self, J: Tensor, G: Tensor | None, losses: Tensor | None) -> Tensor:
        T = J.shape[0]
        return J.new_full((T,), 1.0 / T)


class Sum(WeightedAggregator):
    """``d = sum_t g_t``, what ``sum(losses).backward()`` gives.

    Example:
        >>> import torch
        >>> Sum()(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
        tensor([1., 3.])
    """

    def weighting(self, J: Tensor, G: Tensor | None, losses: Tensor | None) -> Tensor:
        return J.new_ones(J.shape[0])
