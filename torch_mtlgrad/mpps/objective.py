"""The per-task objective of MPPS, eq. (3), and the one-call training step built on it.

Shi et al., *Deep Multitask Learning with Progressive Parameter Sharing* (ICCV 2023), eq. (3) and
section 3.4: for task ``t``, its loss under its mask, plus ``beta`` times the closed-form
``KL(q_t || p_t)`` (``beta`` as in the paper's appendix), plus for Bernoulli masks a REINFORCE
surrogate whose *value* is zero and whose *gradient* is the score-function estimate of
``d E_m[L_t] / d phi[:, t]``.  :class:`TaskObjective` is the part of
:class:`~torch_mtlgrad.mpps.MPPS` that builds it; the rules (KL over every neuron, the baseline,
why each objective depends on its own ``phi[:, t]`` only) are on the documentation's MPPS page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from .masks import Family, bernoulli_log_prob, kl_divergence, logit

__all__ = ["TaskObjective"]


class TaskObjective:
    """Mixin of :class:`~torch_mtlgrad.mpps.MPPS`: eq. (3), the REINFORCE baseline, diagnostics.

    It reads the attributes and buffers ``MPPS.__init__`` sets (declared below), the masks the
    contexts of :class:`~torch_mtlgrad.mpps.hooks.MaskHooks` drew (``_drawn``) and the target
    ``Pi`` (``_target(i)``).
    """

    num_tasks: int
    family: Family
    beta: float
    baseline_decay: float | None
    logits: nn.ParameterList
    baseline: Tensor
    baseline_weight: Tensor
    _diag_kl: Tensor
    _diag_base: Tensor
    _drawn: dict[int, list[Tensor]]

    # Provided by the other parts of MPPS.
    _target: Callable[[int], Tensor]
    _check_task: Callable[[int], int]
    ec: Callable[..., Tensor]
    task: Callable[[int], AbstractContextManager[None]]
    batched: Callable[[], AbstractContextManager[None]]

    def kl(self) -> Tensor:
        """``[T]``: ``KL(q_t || p_t)`` of every task, closed form, summed over neurons and layers.

        Example:
            >>> from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> MPPS(nn.Linear(2, 4), 2, scheduler=3).kl().detach()  # q starts equal to p
            tensor([0., 0.])
        """
        total = None
        for i, a in enumerate(self.logits):
            term = kl_divergence(self.family, a, logit(self._target(i))).sum(0)
            total = term if total is None else total + term
        assert total is not None
        return total

    def _check_loss(self, t: int, loss: Any) -> None:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss of task {t} must be a scalar tensor")
        if not bool(torch.isfinite(loss.detach()).all()):
            raise ValueError(f"loss of task {t} is not finite ({loss.detach().item()})")
        if t not in self._drawn:
            raise RuntimeError(
                f"task {t} has no mask drawn since its last objective: compute its loss inside "
                "`with mpps.task(t):` or `with mpps.batched():`"
            )

    def objective(self, t: int, loss: Tensor) -> Tensor:
        """Eq. (3) for one task: ``L_t + beta * KL_t + (s_t - s_t.detach())``.

        ``loss`` is task ``t``'s loss computed under its last drawn mask (inside
        :meth:`~torch_mtlgrad.mpps.MPPS.task` or :meth:`~torch_mtlgrad.mpps.MPPS.batched`).  For
        Bernoulli masks ``s_t = (L_t - b_t) * sum_guests log q(m_t; phi[:, t])`` is the REINFORCE
        surrogate (``L_t`` detached, ``b_t`` the baseline): its value is zero, so the result has
        the value ``L_t + beta * KL_t`` that loss-based aggregators read, and its gradient in
        ``phi[:, t]`` is the score-function estimate of ``d E_m[L_t] / d phi[:, t]`` (section
        3.4).  Gaussian masks need no surrogate: ``L_t`` is differentiable in ``phi`` through the
        mask.  The result depends on ``phi[:, t]`` only.

        Per task, so a sequential loop can run backward right after each task's forward and keep
        one graph alive at a time (with ``MultiTaskOptimizer``: ``with opt.task(t, loss=obj):
        obj.backward()``).  Updates the task's baseline and ``diagnostics``.

        Example:
            >>> import torch; from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> net = nn.Linear(3, 4)
            >>> mpps = MPPS(net, 2, scheduler=3)
            >>> with mpps.task(1):
            ...     raw = net(torch.ones(2, 3)).pow(2).mean()
            >>> obj = mpps.objective(1, raw)
            >>> bool(torch.allclose(obj, raw + mpps.diagnostics["kl"][1]))
            True
        """
        self._check_task(t)
        self._check_loss(t, loss)
        a_all = list(self.logits)
        kl = sum(
            kl_divergence(self.family, a[:, t], logit(self._target(i)[:, t])).sum()
            for i, a in enumerate(a_all)
        )
        value = loss.detach().reshape(()).to(self.baseline.dtype)
        base = self._baseline_value()[t]
        obj = loss.reshape(()) + self.beta * kl
        if self.family == "bernoulli":
            logp = sum(
                (
                    bernoulli_log_prob(self._drawn[t][i], a[:, t]) * (a.detach().argmax(-1) != t)
                ).sum()
                for i, a in enumerate(a_all)
            )
            surrogate = (value - base) * logp
            obj = obj + (surrogate - surrogate.detach())
        if self.baseline_decay is not None:
            with torch.no_grad():
                d = self.baseline_decay
                self.baseline[t] = d * self.baseline[t] + (1.0 - d) * value
                self.baseline_weight[t] = d * self.baseline_weight[t] + (1.0 - d)
        del self._drawn[t]
        self._diag_kl[t] = kl.detach()
        self._diag_base[t] = base
        return obj

    def _baseline_value(self) -> Tensor:
        """Bias-corrected EMA ``b_t`` of past losses (0 before the first step or without baseline)."""
        if self.baseline_decay is None:
            return torch.zeros_like(self.baseline)
        w = self.baseline_weight
        return torch.where(w > 0, self.baseline / w.clamp_min(1e-30), torch.zeros_like(w))

    @property
    def diagnostics(self) -> dict[str, Tensor]:
        """Of the last objectives: ``kl`` ([T], the KL terms), ``baseline`` ([T], the baselines
        used) and ``ec`` (EC of ``Phi`` now)."""
        return {
            "kl": self._diag_kl.clone(),
            "baseline": self._diag_base.clone(),
            "ec": self.ec().detach(),
        }

    def regularize(self, task_losses: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`objective` for every task: the ``T`` masked task losses -> the ``T`` objectives.

        Everything is checked before anything is updated (count, scalars, finite values, a mask
        drawn for every task since its last objective).

        Example:
            >>> import torch; from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> net = nn.Linear(3, 4)
            >>> mpps = MPPS(net, 2, scheduler=3)
            >>> raw = []
            >>> for t in range(2):
            ...     with mpps.task(t):
            ...         raw.append(net(torch.ones(2, 3)).pow(2).mean())
            >>> out = mpps.regularize(raw)
            >>> bool(torch.allclose(out[1], raw[1] + mpps.diagnostics["kl"][1]))
            True
        """
        t_count = self.num_tasks
        if isinstance(task_losses, Tensor) or len(task_losses) != t_count:
            got = "a tensor" if isinstance(task_losses, Tensor) else f"{len(task_losses)}"
            raise ValueError(f"regularize needs a sequence of {t_count} task losses, got {got}")
        for t, loss in enumerate(task_losses):
            self._check_loss(t, loss)
        return [self.objective(t, loss) for t, loss in enumerate(task_losses)]

    def losses(self, task_loss: Callable[[int], Tensor]) -> list[Tensor]:
        """One training step's objectives, sequential form: the one call per step.

        Runs ``task_loss(t)`` inside ``task(t)`` for ``t = 0 .. T-1`` and returns
        :meth:`regularize` of the results, ready for ``MultiTaskOptimizer.backward`` (any
        aggregator) or ``sum(...).backward()``.  ``task_loss(t)`` runs the backbone on the batch
        and returns task ``t``'s scalar loss.

        Example:
            >>> import torch; from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> net = nn.Linear(3, 4)
            >>> mpps = MPPS(net, 2, scheduler=3)
            >>> ls = mpps.losses(lambda t: net(torch.ones(2, 3))[:, t].pow(2).mean())
            >>> [l.dim() for l in ls]
            [0, 0]
        """
        raw = []
        for t in range(self.num_tasks):
            with self.task(t):
                raw.append(task_loss(t))
        return self.regularize(raw)

    def losses_batched(self, all_losses: Callable[[], Sequence[Tensor]]) -> list[Tensor]:
        """One training step's objectives, batched form (one forward on ``T`` copies of the batch).

        Runs ``all_losses()`` inside ``batched()``; it must feed ``repeat`` of the input to the
        backbone, split its output with ``.chunk(T)`` and return the ``T`` task losses.

        Example:
            >>> import torch; from torch import nn
            >>> from torch_mtlgrad.mpps import MPPS
            >>> net = nn.Linear(3, 4)
            >>> mpps = MPPS(net, 2, scheduler=3)
            >>> def all_losses():
            ...     feats = net(mpps.repeat(torch.ones(2, 3))).chunk(2)
            ...     return [feats[t][:, t].pow(2).mean() for t in range(2)]
            >>> len(mpps.losses_batched(all_losses))
            2
        """
        with self.batched():
            raw = list(all_losses())
        return self.regularize(raw)
