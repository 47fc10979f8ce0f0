"""Constant weights: ``d = w^T J`` for task weights ``w`` fixed by the user.

The static weighting that multi-task papers tune by grid search (equal weights are
:class:`~torch_mtlgrad.aggregators.Mean` / ``Sum``).  The weights need neither ``J`` nor ``G``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import WeightedAggregator

__all__ = ["Constant"]


class Constant(WeightedAggregator):
    """``d = sum_t w_t g_t`` with user-given weights ``w``.

    Args:
        weights: one finite number per task (a sequence or a 1-D tensor).  They are used as
            given: not normalised, and negative values are allowed (a task's gradient is then
            ascended).  At every call ``J`` must have exactly ``len(weights)`` rows.

    Absent tasks: the present tasks keep their own weights (not renormalised); an absent task
    gets weight 0.

    Example:
        >>> import torch
        >>> agg = Constant([0.25, 2.0])
        >>> agg(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        tensor([1., 2.])
    """

    paper = "baseline"
    summary = "fixed user weights"

    def __init__(self, weights: Sequence[float] | Tensor) -> None:
        super().__init__()
        if isinstance(weights, Tensor):
            w = weights.detach().to(device="cpu", dtype=torch.float64)
        else:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise TypeError(
                    f"weights must be a sequence of numbers or a 1-D tensor, got "
                    f"{type(weights).__name__}"
                )
            try:
                w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
            except (TypeError, ValueError) as e:
                raise TypeError(f"weights must be numbers, got {list(weights)!r}") from e
        if w.dim() != 1:
            raise ValueError(f"weights must be 1-D (one per task), got shape {tuple(w.shape)}")
        if w.numel() == 0:
            raise ValueError("weights is empty: give one weight per task")
        bad = (~torch.isfinite(w)).nonzero().flatten()
        if bad.numel():
            t = int(bad[0])
            raise ValueError(f"weight of task {t} is {float(w[t])!r}: weights must be finite")
        self.task_weights = w
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        T = num_tasks
        if T != self.task_weights.numel():
            raise ValueError(
                f"Constant has {self.task_weights.numel()} weights but J has {T} rows (tasks); "
                "give one weight per task"
            )
        if self._subset_idx is not None:  # the present tasks' weights (restricted for this call)
            return self.task_weights.to(device=device, dtype=dtype)
        key = (device, dtype)
        if key not in self._cache:  # one host-to-device copy per device and dtype
            self._cache[key] = self.task_weights.to(device=device, dtype=dtype)
        return self._cache[key]

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        return {"task_weights": (0,)}

    def __repr__(self) -> str:
        vals = ", ".join(f"{float(x):g}" for x in self.task_weights)
        return f"Constant([{vals}])"
