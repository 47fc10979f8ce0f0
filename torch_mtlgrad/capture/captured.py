"""The one object a capture hands to the rest of the step, and the buffers it fills."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..aggregators import work_dtype
from ._kernels import RowStats
from .layout import FlatLayout

__all__ = ["CaptureBuffers", "Captured", "present_mask", "zero_rows"]


def zero_rows(J: Tensor) -> list[int]:
    """The tasks whose row of ``J`` is zero (their loss does not reach the shared parameters);
    one host synchronisation."""
    return (~(J != 0).any(dim=1)).nonzero().flatten().tolist()


@dataclass
class Captured:
    """What one step captured: the rows of ``J`` or the per-parameter gradient blocks, the loss
    values, the task-specific gradients and the mode that ran.

    Attributes:
        mode: the capture that ran (``"loop"``, ``"batched"``, ``"feature"``,
            ``"representation"`` or ``"task hooks"``).
        values: ``[T]`` detached loss values in the work dtype (``None``: a legacy loop without
            ``loss=``).
        J: ``[T, D]`` rows of the task Jacobian (``[T, F]``: the features' gradients in the
            representation mode); ``None`` on the Gramian path.  Times the GradScaler scale
            when one is on.
        blocks: the Gramian path's per-parameter gradient blocks ``[T, *shape]`` (``None`` where
            no task reaches a parameter), instead of ``J``.
        stats: per-(task, parameter) statistics recorded while ``J`` was filled (NaN/Inf counts,
            squared norms), or ``None``.
        params: the task-specific tensors; ``grads`` their summed gradients of this step.
        add_grads: ``True``: ``grads`` are added to the ``.grad`` (``backward``); ``False``: the
            ``.grad`` already hold them and are set to ``grads`` (a legacy loop, where a plugin's
            ``synchronize`` may have replaced entries).
        prior: the shared parameters' ``.grad`` before this step (the direction is added).
        zero_rows: tasks whose gradient of the shared parameters is zero, when known.
        lift: the representation mode's map from a direction over the features to one over the
            shared parameters (one backward through the encoder); ``what`` names the rows' space
            for messages.
        name_tasks: refills ``J`` by the per-task loop on the kept graph, used only to name the
            task of a non-finite value after a batched pass (which spreads it over every row).
        seconds: wall time of the capture (for ``capture="timed"``).
        tasks: the task index of each row (``None``: every task is present, row ``t`` is task
            ``t``); ``total`` is then the number of tasks ``T``, absent ones included.
        weights: the loss-only route's task weights (``[T]``, ``0`` at absent tasks): the shared
            gradients ``shared`` were taken of ``sum_t w_t L_t`` (one backward, no ``J``).
        shared: the loss-only route's new gradients of the shared parameters (``None`` where no
            loss reaches one), to be added to ``prior``.
        diagnostics: the loss-only route's diagnostics (the weights and the losses).
    """

    mode: str
    values: Tensor | None
    params: list[Tensor]
    grads: list[Tensor | None]
    prior: list[Tensor | None]
    J: Tensor | None = None
    blocks: list[Tensor | None] | None = None
    stats: RowStats | None = None
    add_grads: bool = True
    zero_rows: list[int] = field(default_factory=list)
    lift: Callable[[Tensor], Tensor] | None = None
    what: str = ""
    name_tasks: Callable[[Tensor], None] | None = None
    seconds: float = 0.0
    tasks: list[int] | None = None
    total: int | None = None
    weights: Tensor | None = None
    shared: list[Tensor | None] | None = None
    diagnostics: dict[str, Tensor] | None = None

    @property
    def num_tasks(self) -> int:
        """``T``: the number of tasks, absent ones included."""
        if self.total is not None:
            return self.total
        if self.J is not None:
            return self.J.shape[0]
        assert self.values is not None
        return self.values.shape[0]

    def task_of(self, rows: list[int]) -> list[int]:
        """The task index of each of these rows."""
        return rows if self.tasks is None else [self.tasks[r] for r in rows]

    def present(self, device: torch.device | None = None) -> Tensor | None:
        """``[T]`` bools, true where the task is present (``None``: all are)."""
        return present_mask(self.tasks, self.num_tasks, device)

    def present_rows(self, per_task: Tensor) -> Tensor:
        """A ``[T]`` tensor over all tasks (e.g. the weights) restricted to the present rows."""
        if self.tasks is None:
            return per_task
        return per_task[torch.tensor(self.tasks, dtype=torch.long, device=per_task.device)]


def present_mask(tasks: list[int] | None, num_tasks: int,
                 device: torch.device | None = None) -> Tensor | None:
    """``[num_tasks]`` bools, true at ``tasks`` (``None``: every task is present).

    Example:
        >>> present_mask([0, 2], 3).tolist(), present_mask(None, 3)
        ([True, False, True], None)
    """
    if tasks is None:
        return None
    mask = torch.zeros(num_tasks, dtype=torch.bool, device=device)
    mask[tasks] = True
    return mask


class CaptureBuffers:
    """``J`` (``[T, D]``) and its row statistics, allocated once per (T, dtype) and reused."""

    def __init__(self, layout: FlatLayout) -> None:
        self.layout = layout
        self.dtype = work_dtype(layout.dtype)
        self.J: Tensor | None = None
        self._stats: RowStats | None = None
        self._stats_key: tuple[object, ...] | None = None

    def jacobian(self, T: int) -> Tensor:
        """The ``[T, D]`` buffer in the work dtype."""
        if self.J is None or self.J.shape[0] != T or self.J.dtype != self.dtype:
            self.J = torch.empty(T, self.layout.numel, dtype=self.dtype, device=self.layout.device)
        return self.J

    def row_stats(self, T: int, *, norms: bool, check: bool) -> RowStats | None:
        """``[T, P]`` buffers for the squared norms (``norms``) and NaN/Inf counts (``check``) of
        the rows, or ``None`` when neither is wanted."""
        if not (check or norms):
            return None
        key = (T, self.dtype, norms, check)
        if self._stats is None or self._stats_key != key:
            self._stats = RowStats.empty(len(self.layout.params), T, self.dtype, self.layout.device,
                                         norms=norms, check=check)
            self._stats_key = key
        return self._stats
