"""Gradient accumulation with the accumulate-then-aggregate semantics.

``opt.backward(losses, accumulate=True)`` on micro-batches 1..k-1 captures each micro-batch's task
Jacobian and adds it (with the loss values and the task-specific gradients) into one
:class:`Accumulation`; the next call without ``accumulate`` (or ``step()``) combines the sum once.
The direction is then the method applied to ``sum_i J_i``, the Jacobian of the summed losses:
exactly one step on the micro-batches' concatenation when each micro-batch's losses are scaled as
for plain accumulation (a mean over the micro-batch divided by k).  Summing each micro-batch's
direction instead (calling ``opt.backward(losses)`` on every micro-batch) is a different method
unless the aggregator is linear (sum, mean, fixed weights).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .captured import Captured
from .loop import accumulate

__all__ = ["Accumulation"]


class Accumulation:
    """``J``, the loss values and the task-specific gradients summed over micro-batches.

    A task is present in the accumulated step when it was present in any micro-batch; the rows of
    the others stay out of the combination.

    Example:
        >>> acc = Accumulation(num_tasks=2)
        >>> for k in range(3):
        ...     acc.add(Captured("loop", torch.ones(2), [], [], [None], J=torch.eye(2)))
        >>> out = acc.captured()
        >>> out.J.tolist(), out.values.tolist(), acc.micro_batches
        ([[3.0, 0.0], [0.0, 3.0]], [3.0, 3.0], 3)
    """

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.J: Tensor | None = None  # [T, D], absent tasks' rows zero
        self.values: Tensor | None = None
        self.seen = [False] * num_tasks
        self.params: list[Tensor] = []
        self.grads: list[Tensor | None] = []
        self.prior: list[Tensor | None] | None = None
        self.micro_batches = 0
        self.mode = ""
        self.has_values = True

    def add(self, c: Captured) -> None:
        """Add one micro-batch's capture (its ``J`` is copied: the buffer is reused)."""
        J = c.J
        assert J is not None and c.lift is None, "accumulation needs J of the shared parameters"
        rows = list(range(J.shape[0])) if c.tasks is None else c.tasks
        if c.num_tasks != self.num_tasks:
            raise ValueError(f"a micro-batch has {c.num_tasks} tasks, the accumulation "
                             f"{self.num_tasks}: every micro-batch must pass one loss (or None) "
                             "per task")
        if self.J is None:
            self.J = J.new_zeros(self.num_tasks, J.shape[1])
            self.values = J.new_zeros(self.num_tasks)
            self.params = list(c.params)
            self.grads = [None] * len(c.params)
            self.prior = c.prior
        index = torch_index(rows, J)
        self.J.index_add_(0, index, J)
        if c.values is None:
            self.has_values = False
        elif self.values is not None:
            self.values.index_add_(0, index, c.values.to(self.values.dtype))
        for r in rows:
            self.seen[r] = True
        accumulate(self.grads, c.grads)
        self.micro_batches += 1
        self.mode = c.mode

    def captured(self) -> Captured:
        """The accumulated step as one capture of the tasks present in any micro-batch."""
        assert self.J is not None and self.values is not None and self.prior is not None
        tasks = [t for t in range(self.num_tasks) if self.seen[t]]
        all_present = len(tasks) == self.num_tasks
        index = torch_index(tasks, self.J)
        J = self.J if all_present else self.J.index_select(0, index)
        values = None
        if self.has_values:
            values = self.values if all_present else self.values.index_select(0, index)
        return Captured(self.mode, values, self.params, self.grads, self.prior, J=J,
                        tasks=None if all_present else tasks, total=self.num_tasks)


def torch_index(rows: list[int], like: Tensor) -> Tensor:
    """``rows`` as an index tensor on ``like``'s device."""
    return torch.tensor(rows, dtype=torch.long, device=like.device)
