"""Dynamic weight average (DWA; Liu, Johns and Davison, CVPR 2019).

Liu, Johns, Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019, Sec. 3.3
("Dynamic Weight Average"), eq. (7)-(8):

    lambda_k(t) = K exp(w_k(t-1) / T) / sum_i exp(w_i(t-1) / T),   w_k(t-1) = L_k(t-1) / L_k(t-2)

with ``K`` tasks, temperature ``T`` (the paper's ``T = 2``) and ``L_k(t)`` the average loss of
task ``k`` over epoch ``t``; ``w_k(t) = 1`` for ``t = 1, 2`` (the first two epochs use weights 1).
The weights sum to ``K``.  The direction is ``d = sum_k lambda_k(t) g_k``.

Epochs: with ``steps_per_epoch=n`` every ``n`` calls form an epoch, ``L_k(t)`` is the mean of the
losses given in that epoch's calls, and the weights stay fixed within an epoch.  The default
``steps_per_epoch=1`` makes every call an epoch (weights from the previous two calls' losses);
set it to the number of batches per epoch to reproduce the paper, or pass ``None`` and call
:meth:`DWA.end_epoch` yourself at the end of each epoch.

Choices the paper leaves open: a zero average loss in the denominator gives ``w_k = 1``; negative
losses are an error (the ratio of losses is meant for positive losses).  The weights read only
the losses, neither ``J`` nor its Gramian.  State (``state_dict``): the last two epoch averages,
the running sum and count of the current epoch, and the number of completed epochs.

Absent tasks (``present=``): the weights are ``T_present softmax(w / T)`` over the present
tasks, each ratio from the task's own last two epoch averages (1 until the task has two); an
absent task's losses are not added to the epoch, and its history stays as it was.  An epoch's
average is over the calls where the task was present; a task with no loss in an epoch keeps its
history.  Epochs are counted in calls, present or not: with ``steps_per_epoch > 1`` (or
:meth:`DWA.end_epoch`) the closing call also closes the epoch for a task absent at that call but
present earlier in the epoch (its history then moves, the one exception to "absent tasks keep
their state"); with the default ``steps_per_epoch=1`` an absent task's state never moves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator

__all__ = ["DWA"]


class DWA(WeightedAggregator):
    """DWA (Liu et al., 2019, eq. 7-8): ``lambda = K softmax(w / T)``, ``w`` the last loss ratios.

    Args:
        temperature: the softness ``T`` of the weights (default 2, the paper's).
        steps_per_epoch: calls per epoch (default 1); ``None`` to end epochs with
            :meth:`end_epoch`.
        validate: check every call that the losses are non-negative (default); this reads the
            losses on the host, so pass ``False`` for a sync-free step on CUDA.

    Diagnostics of the last call: ``loss_ratio`` (``w_k(t-1)``, ones during the first two
    epochs), ``epoch`` (the current epoch ``t``, 1-based).

    Example:
        >>> import torch
        >>> agg = DWA(temperature=2.0)
        >>> J = torch.eye(2)
        >>> agg(J, torch.tensor([1.0, 1.0]))   # epochs 1 and 2: weights 1
        tensor([1., 1.])
        >>> agg(J, torch.tensor([0.5, 1.0]))
        tensor([1., 1.])
        >>> agg(J, torch.tensor([0.5, 1.0]))   # ratios (0.5, 1): the slower task gets more
        tensor([0.8756, 1.1244])
    """

    paper = "Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019"
    summary = "dynamic weight average: weights from the ratio of each task's last two losses"

    needs_losses = True
    stateful = True

    def __init__(self, temperature: float = 2.0, steps_per_epoch: int | None = 1,
                 validate: bool = True) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if steps_per_epoch is not None and not (isinstance(steps_per_epoch, int)
                                                and steps_per_epoch >= 1):
            raise ValueError(
                f"steps_per_epoch must be a positive integer or None, got {steps_per_epoch!r}")
        self.temperature = float(temperature)
        self.steps_per_epoch = steps_per_epoch
        self.validate = bool(validate)
        self.completed = 0  # epochs completed
        self.history: Tensor | None = None  # [2, T]: L(t-2), L(t-1) epoch averages
        self.running: Tensor | None = None  # [T] sum of this epoch's losses
        self.count = 0  # calls in this epoch
        # Losses per task in this epoch ([T]) once tasks were absent; None: ``count`` for all.
        self.task_count: Tensor | None = None

    def current_weights(self, T: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(lambda(t), w(t-1))`` for the current epoch from the completed ones."""
        if self.completed < 2 or self.history is None:
            ones = like.new_ones(T)
            return ones, ones
        prev2, prev1 = self.history[0].to(like), self.history[1].to(like)
        ratio = torch.where(prev2 > 0, prev1 / prev2.clamp_min(torch.finfo(like.dtype).tiny),
                            torch.ones_like(prev1))
        return T * torch.softmax(ratio / self.temperature, dim=0), ratio

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        if losses is None:
            raise ValueError("DWA needs the loss values: agg(J, losses)")
        if self._subset_idx is not None:
            return self._weighting_present(losses, self._subset_idx, dtype, device)
        T = num_tasks
        tracked = self.running if self.running is not None else self.history
        if tracked is not None and tracked.shape[-1] != T:
            raise ValueError(f"DWA was tracking {tracked.shape[-1]} tasks, got J with {T} rows; "
                             "call reset() to start over")
        if self.validate:
            bad = (losses < 0).nonzero().flatten()
            if bad.numel():
                t = int(bad[0])
                raise ValueError(f"task {t} has loss {float(losses[t])!r}: DWA's loss ratios "
                                 "need non-negative losses")
        lam, ratio = self.current_weights(T, torch.empty((), dtype=dtype, device=device))
        self.diagnostics = {"loss_ratio": ratio, "epoch": torch.tensor(float(self.completed + 1))}
        L = losses.detach()
        self.running = L.clone() if self.running is None else self.running.to(L) + L
        self.count += 1
        if self.task_count is not None:
            self.task_count = self.task_count + 1
        if self.steps_per_epoch is not None and self.count >= self.steps_per_epoch:
            self.end_epoch()
        return lam

    def _known_num_tasks(self) -> int | None:
        tracked = self.running if self.running is not None else self.history
        return None if tracked is None else int(tracked.shape[-1])

    def _weighting_present(self, losses: Tensor, idx: Tensor, dtype: torch.dtype,
                           device: torch.device) -> Tensor:
        """The weights of the present tasks ``idx``; their losses join the epoch."""
        assert self._subset_total is not None
        Tt, n = self._subset_total, idx.numel()
        if self.validate:
            bad = (losses < 0).nonzero().flatten()
            if bad.numel():
                t = int(bad[0])
                raise ValueError(f"task {self._task_index(t)} has loss {float(losses[t])!r}: "
                                 "DWA's loss ratios need non-negative losses")
        like = torch.empty((), dtype=dtype, device=device)
        if self.completed < 2 or self.history is None:
            lam = ratio = like.new_ones(n)
        else:
            i = idx.to(self.history.device)
            prev2, prev1 = self.history[0][i].to(like), self.history[1][i].to(like)
            ratio = torch.where(prev2 > 0, prev1 / prev2.clamp_min(torch.finfo(dtype).tiny),
                                torch.ones_like(prev1))
            lam = n * torch.softmax(ratio / self.temperature, dim=0)
        self.diagnostics = {"loss_ratio": ratio, "epoch": torch.tensor(float(self.completed + 1))}
        L = losses.detach()
        running = L.new_zeros(Tt) if self.running is None else self.running.to(L)
        self.running = running.index_add(0, idx.to(L.device), L)
        counts = (self.task_count if self.task_count is not None
                  else torch.full((Tt,), float(self.count), dtype=torch.float64))
        self.task_count = counts.index_add(0, idx.cpu(), torch.ones(n, dtype=torch.float64))
        self.count += 1
        if self.steps_per_epoch is not None and self.count >= self.steps_per_epoch:
            self.end_epoch()
        return lam

    def end_epoch(self) -> None:
        """Close the current epoch: its mean loss becomes ``L(t-1)`` for the next epoch."""
        if self.running is None or self.count == 0:
            raise RuntimeError("DWA.end_epoch(): no losses were given in this epoch")
        if self.task_count is None:
            mean = self.running / self.count
            if self.history is None:
                self.history = torch.stack([torch.zeros_like(mean), mean])
            else:
                self.history = torch.stack([self.history[1].to(mean), mean])
        else:  # tasks were absent: each task's average over its own calls; none: no change
            has = (self.task_count > 0).to(self.running.device)
            mean = self.running / self.task_count.to(self.running).clamp_min(1)
            hist = (torch.zeros(2, mean.shape[0], dtype=mean.dtype, device=mean.device)
                    if self.history is None else self.history.to(mean))
            self.history = torch.stack([torch.where(has, hist[1], hist[0]),
                                        torch.where(has, mean, hist[1])])
        self.completed += 1
        self.running = None
        self.count = 0
        self.task_count = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "history": None if self.history is None else self.history.clone(),
            "running": None if self.running is None else self.running.clone(),
            "count": self.count,
            **({} if self.task_count is None else {"task_count": self.task_count.clone()}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"completed", "history", "running", "count", "task_count"}
        if unknown:
            raise ValueError(f"DWA state has unknown keys {sorted(unknown)}")
        hist, running = state.get("history"), state.get("running")
        if hist is not None and (not isinstance(hist, Tensor) or hist.dim() != 2
                                 or hist.shape[0] != 2):
            raise ValueError("DWA state 'history' must be a [2, T] tensor or None")
        if running is not None and (not isinstance(running, Tensor) or running.dim() != 1):
            raise ValueError("DWA state 'running' must be a 1-D tensor or None")
        self.completed = int(state.get("completed", 0))
        self.count = int(state.get("count", 0))
        self.history = None if hist is None else hist.detach().clone()
        self.running = None if running is None else running.detach().clone()
        tc = state.get("task_count")
        if tc is not None and (not isinstance(tc, Tensor) or tc.dim() != 1):
            raise ValueError("DWA state 'task_count' must be a 1-D tensor or None")
        self.task_count = None if tc is None else tc.detach().to("cpu", torch.float64).clone()

    def reset(self) -> None:
        self.completed = 0
        self.history = None
        self.running = None
        self.count = 0
        self.task_count = None

    def __repr__(self) -> str:
        return f"DWA(temperature={self.temperature}, steps_per_epoch={self.steps_per_epoch})"
