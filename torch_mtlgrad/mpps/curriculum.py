"""The curriculum of MPPS: ``Phi``, the target ``Pi``, their EC, and the end-of-epoch update.

Shi et al., *Deep Multitask Learning with Progressive Parameter Sharing* (ICCV 2023), section 3.5
and Algorithm 1: an EC scheduler sets, epoch by epoch, the exclusive capacity the target must
have; at every course boundary the target is rebuilt from the learnt ``Phi`` (problem (4), see
:func:`~torch_mtlgrad.mpps.target.update_target`).  :class:`Curriculum` is the part of
:class:`~torch_mtlgrad.mpps.MPPS` that does this bookkeeping; see the documentation's MPPS page.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .ec import distribution_ec, layer_ec, task_shares
from .masks import exclusive_phi
from .schedulers import ECScheduler
from .target import Granularity, update_target

__all__ = ["Curriculum"]

logger = logging.getLogger(__name__)


class Curriculum:
    """Mixin of :class:`~torch_mtlgrad.mpps.MPPS`: EC readouts, the schedule, the target update.

    It reads the attributes and buffers ``MPPS.__init__`` sets (declared below); the target of
    masked layer ``i`` is the buffer ``target_i``.
    """

    num_tasks: int
    eps: float
    scheduler: ECScheduler
    target_update: Granularity
    adaptive_target: bool
    epoch: int
    logits: nn.ParameterList
    _layers: list[nn.Module]

    @property
    def phi(self) -> list[Tensor]:
        """Per layer, the ``[N_l, T]`` sharing probabilities ``Phi = sigmoid(logits)`` (detached)."""
        return [torch.sigmoid(a.detach()) for a in self.logits]

    @property
    def target(self) -> list[Tensor]:
        """Per layer, the ``[N_l, T]`` target probabilities ``Pi``."""
        return [self._target(i) for i in range(len(self._layers))]

    def _target(self, i: int) -> Tensor:
        return getattr(self, f"target_{i}")

    def ec(self, which: str = "phi") -> Tensor:
        """EC of the whole distribution (``which="phi"``) or of the target (``"target"``).

        Example:
            >>> from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> round(MPPS(nn.Linear(2, 4), 2, scheduler=3).ec().item(), 4)  # 1 - eps
            0.99
        """
        return distribution_ec(self._which(which))

    def layer_ec(self, which: str = "phi") -> list[float]:
        """EC of every masked layer, in order.

        Example:
            >>> from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> [round(v, 2) for v in MPPS(nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 4)), 2,
            ...                            scheduler=3).layer_ec()]
            [0.99, 0.99]
        """
        return [float(layer_ec(p)) for p in self._which(which)]

    def task_shares(self, which: str = "phi") -> list[Tensor]:
        """Per layer, the ``[T, T]`` share matrix of :func:`~torch_mtlgrad.mpps.ec.task_shares`.

        ``S[o, t]`` is the mean ``phi[:, t]`` on the neurons task ``o`` owns (Figure 6 plots
        ``S[0, 1] / (S[0, 1] + S[0, 2])``).

        Example:
            >>> from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> MPPS(nn.Linear(2, 4), 2, scheduler=3).task_shares()[0]
            tensor([[0.9900, 0.0100],
                    [0.0100, 0.9900]])
        """
        return [task_shares(p) for p in self._which(which)]

    def _which(self, which: str) -> list[Tensor]:
        if which == "phi":
            return self.phi
        if which == "target":
            return self.target
        raise ValueError(f"which must be 'phi' or 'target', got {which!r}")

    def _set_target(self, scheduled: float) -> None:
        if self.adaptive_target:
            source = self.phi
        else:
            source = [
                exclusive_phi(p.shape[0], self.num_tasks, self.eps, p.dtype, p.device)
                for p in self.phi
            ]
        new = update_target(source, scheduled, self.eps, self.target_update)
        for i, pi in enumerate(new):
            self._target(i).copy_(pi)

    def end_epoch(self) -> float:
        """Advance the scheduler by one epoch; at a course boundary rebuild the target (Algorithm 1).

        Call it once at the end of every epoch.  The new target has EC equal to the schedule's
        value for the epoch that starts now (see :func:`~torch_mtlgrad.mpps.target.update_target`
        for when clipping to ``[eps, 1 - eps]`` makes it differ).  Returns that value.

        Example:
            >>> from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS, Linear
            >>> mpps = MPPS(nn.Linear(2, 6), 3, scheduler=Linear(5))
            >>> mpps.end_epoch(), round(mpps.ec("target").item(), 4)
            (0.75, 0.75)
        """
        prev = self.epoch
        self.epoch += 1
        value = self.scheduler.value(self.epoch)
        if self.scheduler.course(self.epoch) != self.scheduler.course(prev):
            self._set_target(value)
            logger.info(
                "MPPS epoch %d: target EC %.4f (scheduled %.4f), Phi EC %.4f",
                self.epoch,
                float(self.ec("target")),
                value,
                float(self.ec("phi")),
            )
        return value
