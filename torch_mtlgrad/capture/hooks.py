"""The legacy loop's capture: hooks on the shared parameters route each backward pass run inside
``with opt.task(t):`` into row ``t`` of ``J``.

For loops that already call ``loss_t.backward()`` once per task; the result equals
``opt.backward(losses)`` (tested).  Task-specific parameters accumulate their ``.grad`` as usual.
A task whose block does not run this step is absent: the step combines the tasks that ran.

Between the blocks and the combination the shared ``.grad`` hold the plain sum of the task
gradients (autograd accumulates them as usual).  :meth:`TaskHooks.touched` tells whether anything
changed them after the last block (``clip_grad_norm_`` scales them in place), so that the optimizer
can refuse a step whose clipping saw the sum instead of the direction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .captured import CaptureBuffers, Captured, zero_rows
from .layout import FlatLayout

__all__ = ["TaskHooks"]


def _row_hook(view: Tensor) -> Callable[[Tensor], None]:
    def hook(grad: Tensor) -> None:
        view.add_(grad)

    return hook


class TaskHooks:
    """Rows of ``J`` filled by ``task(t)`` blocks, between the first block and :meth:`collect`.

    While a capture is pending the shared ``.grad`` are set aside (so the direction is added to
    what they held) and restored by :meth:`restore` when the step does not complete.

    Example:
        >>> lin = torch.nn.Linear(2, 1); x = torch.randn(3, 2)
        >>> layout = FlatLayout(list(lin.parameters()))
        >>> hooks = TaskHooks(layout, CaptureBuffers(layout))
        >>> for t in range(2):
        ...     with hooks.task(t, num_tasks=2):
        ...         ((t + 1) * lin(x).sum()).backward()
        >>> captured = hooks.collect(num_tasks=2, specific=[])
        >>> torch.allclose(captured.J[1], 2 * captured.J[0])
        True
    """

    def __init__(self, layout: FlatLayout, buffers: CaptureBuffers) -> None:
        self.layout, self.buffers = layout, buffers
        self._rows: dict[int, Tensor] = {}
        self._losses: dict[int, Tensor] = {}
        self._stash: list[Tensor | None] | None = None
        self.open: int | None = None  # the task whose block is running
        self._marks: list[tuple[int, int] | None] = []  # the shared .grad as the last block left them

    @property
    def pending(self) -> bool:
        """A ``task()`` block ran (or runs) and its step is not aggregated yet."""
        return bool(self._rows) or self.open is not None

    @property
    def rows(self) -> int:
        """How many tasks have a row this step."""
        return len(self._rows)

    @contextmanager
    def task(self, t: int, loss: Tensor | None = None, num_tasks: int | None = None) -> Iterator[None]:
        """Route the backward passes inside the block into row ``t`` (``loss``: its value, for
        methods that read the losses; checked by the caller)."""
        if self.open is not None:
            raise RuntimeError(f"task({t}) opened inside task({self.open}): blocks do not nest")
        if not isinstance(t, int) or isinstance(t, bool) or t < 0 or (num_tasks is not None
                                                                         and t >= num_tasks):
            bound = f"[0, {num_tasks})" if num_tasks is not None else ">= 0"
            hint = ""
            if isinstance(t, int) and num_tasks is not None and t >= num_tasks:
                hint = (f" ({num_tasks} tasks were set or seen at the first step; when some tasks "
                        "can be absent from a step, pass num_tasks=T to MultiTaskOptimizer)")
            raise ValueError(f"task index must be an integer in {bound}, got {t!r}{hint}")
        params = self.layout.params
        if self._stash is None:
            # First task of this step: keep what .grad held, so the direction is added to it.
            self._stash = [p.grad for p in params]
            for p in params:
                p.grad = None
        row = self._rows.get(t)
        if row is None:
            row = torch.zeros(self.layout.numel, dtype=self.buffers.dtype, device=self.layout.device)
            self._rows[t] = row
        handles = [p.register_hook(_row_hook(v)) for p, v in zip(params, self.layout.views(row))]
        self.open = t
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.open = None
        if loss is not None:
            self._losses[t] = loss.detach().reshape(())
        self._marks = [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]

    def touched(self) -> bool:
        """Whether a shared ``.grad`` was replaced or changed in place since the last block ended
        (each in-place change bumps a tensor's version counter; no synchronisation)."""
        now = [None if p.grad is None else (id(p.grad), p.grad._version) for p in self.layout.params]
        return bool(self._marks) and now != self._marks

    def restore(self) -> None:
        """Put back the shared ``.grad`` held before the first block and forget the capture."""
        if self._stash is not None:
            for p, g in zip(self.layout.params, self._stash):
                p.grad = g
        self.clear()

    def clear(self) -> None:
        self._rows, self._losses, self._stash, self._marks = {}, {}, None, []

    def collect(self, num_tasks: int | None, specific: list[Tensor], checked: bool = True) -> Captured:
        """End the capture: ``J`` from the rows of the tasks whose block ran (``T`` is
        ``num_tasks``, or the highest task index plus one when not known), with the loss values
        given as ``loss=`` (``checked``: find the zero rows, for the warning).

        ``loss=`` given for some of the tasks that ran only is an error; the ``.grad`` are then
        restored and the capture forgotten.
        """
        rows, stash, losses = self._rows, self._stash, self._losses
        assert stash is not None
        T = num_tasks if num_tasks is not None else max(rows) + 1
        tasks = sorted(rows)
        if losses and len(losses) != len(tasks):
            self.restore()
            raise ValueError(f"loss= was given for tasks {sorted(losses)} only; give it for all "
                             "or none")
        J = self.buffers.jacobian(len(tasks))
        for r, t in enumerate(tasks):
            J[r].copy_(rows[t])
        values = torch.stack([losses[t] for t in tasks]).to(J.dtype) if losses else None
        self.clear()
        zeros = zero_rows(J) if checked else []
        return Captured("task hooks", values, specific, [p.grad for p in specific], stash, J=J,
                        add_grads=False, zero_rows=zeros,
                        tasks=None if len(tasks) == T else tasks, total=T)
