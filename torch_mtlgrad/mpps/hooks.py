"""The forward hooks of :class:`~torch_mtlgrad.mpps.MPPS` and the contexts that draw the masks.

:class:`MaskHooks` is the part of ``MPPS`` that runs during a forward: :meth:`MaskHooks.task`
(sequential form, one task per forward) and :meth:`MaskHooks.batched` (one forward on the batch
repeated ``T`` times) draw one mask per task and masked layer, and the hook on every masked layer
multiplies its output by the active mask.  Outside those contexts, and for a layer in eval mode,
the hooks pass the output through unchanged (the paper evaluates the full backbone; Shi et al.,
ICCV 2023, section 4.1).  The rules are on the documentation's MPPS page.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .layers import mask_output
from .masks import Family, sample_masks

__all__ = ["MaskHooks"]


class MaskHooks:
    """Mixin of :class:`~torch_mtlgrad.mpps.MPPS`: mask drawing, the hooks and their contexts.

    It reads the attributes ``MPPS.__init__`` sets (declared below) and keeps the per-step state
    ``_mode`` (``None``, ``"task"`` or ``"batched"``), ``_active`` (per layer the mask in use,
    ``[N]`` or ``[T, N]``) and ``_drawn`` (task -> per-layer mask of its last context, read by
    the objective).
    """

    num_tasks: int
    family: Family
    layer_names: list[str]
    logits: nn.ParameterList
    _layers: list[nn.Module]
    _dims: list[int]
    _handles: list[Any]
    _generator: torch.Generator
    _mode: str | None
    _active: list[Tensor] | None
    _drawn: dict[int, list[Tensor]]

    def _hook(self, idx: int, module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
        if self._mode is None or not module.training:
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"MPPS: layer {self.layer_names[idx]!r} returned {type(output).__name__}"
            )
        assert self._active is not None
        tasks = None if self._mode == "task" else self.num_tasks
        return mask_output(
            output, self._active[idx], self._dims[idx], tasks, self.layer_names[idx]
        )

    def remove(self) -> None:
        """Take the hooks off the backbone; it then computes exactly what it did before.

        Example:
            >>> from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> net = nn.Sequential(nn.Linear(2, 4))
            >>> MPPS(net, 2, scheduler=4).remove()
            >>> len(net[0]._forward_hooks)
            0
        """
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the backbone."""
        return bool(self._handles)

    @property
    def layers(self) -> list[nn.Module]:
        """The masked modules of the backbone, in order."""
        return list(self._layers)

    # ------------------------------------------------------------------ sampling and contexts
    def _gen(self) -> torch.Generator:
        dev = self.logits[0].device
        if self._generator.device != dev:  # the module was moved: continue on a derived stream
            seed = int(torch.randint(0, 2**62, (), generator=self._generator).item())
            self._generator = torch.Generator(device=dev)
            self._generator.manual_seed(seed)
        return self._generator

    def _draw(self, t: int) -> list[Tensor]:
        gen = self._gen()
        masks = []
        for a in self.logits:
            is_owner = a.detach().argmax(-1) == t
            masks.append(sample_masks(a[:, t], is_owner, self.family, gen))
        return masks

    def _check_task(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, int) or not (0 <= t < self.num_tasks):
            raise ValueError(f"task must be an int in [0, {self.num_tasks}), got {t!r}")
        return t

    def _enter(self) -> None:
        if not self._handles:
            raise RuntimeError("MPPS was removed from the backbone; build a new one to mask again")
        if self._mode is not None:
            raise RuntimeError(
                "MPPS contexts do not nest: leave the current task/batched block first"
            )

    @contextmanager
    def task(self, t: int) -> Iterator[None]:
        """Mask the backbone for task ``t`` inside the block (sequential form).

        A fresh mask is drawn for every masked layer on entry; it is the one
        :meth:`~torch_mtlgrad.mpps.MPPS.regularize` scores.  In eval mode the hooks pass through
        (full backbone).

        Example:
            >>> import torch; from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> net = nn.Sequential(nn.Linear(3, 4)).train()
            >>> mpps = MPPS(net, 2, scheduler=3, family="bernoulli")
            >>> with mpps.task(0):
            ...     out = net(torch.ones(1, 3))
            >>> bool(torch.equal(out[0, :2], net(torch.ones(1, 3))[0, :2]))  # task 0 owns 0, 1
            True
        """
        self._check_task(t)
        self._enter()
        masks = self._draw(t)
        self._drawn[t] = masks
        self._active, self._mode = masks, "task"
        try:
            yield
        finally:
            self._active, self._mode = None, None

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Mask a forward on the batch repeated ``T`` times, block ``t`` with task ``t``'s mask.

        The input must be task-major, ``[x; x; ...; x]`` (see :meth:`repeat`), and so are the
        outputs (``out.chunk(T)``).  Masks are drawn for tasks ``0 .. T-1`` in order, consuming
        the random stream exactly as ``T`` sequential :meth:`task` blocks would.

        Example:
            >>> import torch; from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> net = nn.Sequential(nn.Linear(3, 4))
            >>> mpps = MPPS(net, 2, scheduler=3)
            >>> with mpps.batched():
            ...     out = net(mpps.repeat(torch.ones(5, 3)))
            >>> tuple(out.shape)
            (10, 4)
        """
        self._enter()
        per_task = [self._draw(t) for t in range(self.num_tasks)]
        for t, masks in enumerate(per_task):
            self._drawn[t] = masks
        self._active = [
            torch.stack([per_task[t][i] for t in range(self.num_tasks)])
            for i in range(len(self._layers))
        ]
        self._mode = "batched"
        try:
            yield
        finally:
            self._active, self._mode = None, None

    def repeat(self, x: Tensor) -> Tensor:
        """``[x; x; ...; x]`` (``T`` copies along dim 0), the input layout of :meth:`batched`.

        Example:
            >>> import torch; from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> MPPS(nn.Linear(2, 2), 3, scheduler=3).repeat(torch.zeros(4, 2)).shape
            torch.Size([12, 2])
        """
        return x.repeat(self.num_tasks, *([1] * (x.dim() - 1)))
