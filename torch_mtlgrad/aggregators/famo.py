"""FAMO: fast adaptive multitask optimisation (Liu, Liu, Stone and Liu, NeurIPS 2023).

Liu, Liu, Stone, Liu, *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023
(arXiv:2306.03792), Sec. 3 and Algorithm 1.  Task logits ``xi`` (initially 0) give
``z = softmax(xi)``; the update follows the gradient of ``sum_i z_i log(L_i - L*_i)``, rescaled:

    d = sum_i w_i g_i,   w_i = c z_i / (L_i - L*_i),   c = (sum_j z_j / (L_j - L*_j))^{-1}

so the weights sum to 1 (``L*`` = ``min_losses``, the losses' lower bounds, default 0).  After
the step, with ``delta_i = log(L_i - L*_i)`` before minus after the step (the decrease of each
log loss), the logits take one step on

    grad_xi = J_z^T delta = z * (delta - z^T delta)     (J_z the Jacobian of the softmax)

plus the decay ``gamma xi``: Algorithm 1's ``xi <- xi - beta (J_z^T delta + gamma xi)`` with
``optimizer="sgd"``; with ``optimizer="adam"`` (default, as in the authors' released code) the
same gradient and decay go through Adam with learning rate ``beta``.  Defaults ``beta = 0.025``
and ``gamma = 0.01`` as in the paper's experiments and the authors' code.

Which losses give ``delta``: the paper re-evaluates the losses after the step.  Here, by default,
``delta`` at call ``k`` is computed from the losses of call ``k - 1`` and call ``k`` (those of the
next mini-batch, which saves the extra forward pass), and the logits are updated *before* the
weights of call ``k`` are formed; the first call does no update.  For the paper's exact variant,
call :meth:`FAMO.update` with the losses re-evaluated on the same batch after the optimizer step;
the next call then skips its own update.  ``eps`` (default 1e-8, as in the authors' code) is
added to ``L - L*`` before the division and the log.

The weights read only the losses (neither ``J`` nor its Gramian).  State (``state_dict``): ``xi``
with its optimizer state and the previous call's losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator, check_losses, check_present
from ._learned import LearnedVector, OptimizerName

__all__ = ["FAMO"]


class FAMO(WeightedAggregator):
    """FAMO (Liu et al., 2023): ``w_i ∝ softmax(xi)_i / (L_i - L*_i)``, ``xi`` learned.

    Args:
        beta: step size of the logits ``xi`` (default 0.025).
        gamma: decay of the logits (default 0.01).
        optimizer: ``"adam"`` (default, the authors' code) or ``"sgd"`` (Algorithm 1 as printed).
        min_losses: the lower bounds ``L*`` (``[T]`` or a sequence), default 0.
        eps: added to ``L - L*`` (default 1e-8).
        validate: check every call that ``L >= L*`` (default); this reads the losses on the
            host, so pass ``False`` for a sync-free step on CUDA (a loss below its bound then
            gives meaningless weights, negative or NaN, instead of an error).

    Diagnostics of the last call: ``z`` (``softmax(xi)`` used for the weights), ``delta``
    (the log-loss decrease used for the update; NaN when no update ran).

    Absent tasks: an absent task's logit, its optimizer moments and its last loss do not move.
    A present task's ``delta`` is from its last present loss to this one; the logit update runs
    over the present tasks that have such a loss (the softmax taken over them), and a task
    first present later starts at logit 0 with a fresh Adam.  :meth:`update` takes ``present``
    too.  A loss of 0 is valid with ``eps > 0``; with ``eps=0`` it is an error naming the task.

    Example:
        >>> import torch
        >>> agg = FAMO(beta=0.5, gamma=0.0, optimizer="sgd", eps=0.0)
        >>> J = torch.eye(2)
        >>> agg(J, torch.tensor([1.0, 4.0]))   # z = (1/2, 1/2): w proportional to 1 / L
        tensor([0.8000, 0.2000])
        >>> d = agg(J, torch.tensor([0.5, 4.0]))   # task 1 improved, task 2 did not
        >>> agg.diagnostics["z"]   # so task 2's share grows
        tensor([0.4568, 0.5432])
    """

    paper = "Liu, Liu, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023"
    summary = ("fast adaptive multitask optimisation: learned logits balance the tasks' log-loss "
               "decrease")

    needs_losses = True
    stateful = True
    _partial = False  # some task has no previous loss (never present, or consumed by update())

    def __init__(self, beta: float = 0.025, gamma: float = 0.01, optimizer: OptimizerName = "adam",
                 min_losses: Tensor | Sequence[float] | None = None, eps: float = 1e-8,
                 validate: bool = True) -> None:
        super().__init__()
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.eps = float(eps)
        self.validate = bool(validate)
        self.min_losses = None if min_losses is None else torch.as_tensor(min_losses).detach()
        if self.min_losses is not None and self.min_losses.dim() != 1:
            raise ValueError(f"min_losses must be 1-D (one per task), got shape "
                             f"{tuple(self.min_losses.shape)}")
        self._xi = LearnedVector(optimizer, beta, weight_decay=gamma)
        self.prev_losses: Tensor | None = None  # L - L* + eps of the previous call

    @property
    def logits(self) -> Tensor | None:
        """The current logits ``xi`` (``None`` before the first call)."""
        return None if self._xi.value is None else self._xi.get()

    def _shifted(self, losses: Tensor) -> Tensor:
        T = losses.shape[0]
        Ls = torch.zeros_like(losses) if self.min_losses is None else self.min_losses.to(losses)
        if Ls.shape[0] != T:
            raise ValueError(f"min_losses has {Ls.shape[0]} entries, expected {T} (one per task)")
        D = losses - Ls
        if self.validate:
            bad = (~(D >= 0) if self.eps > 0 else ~(D > 0)).nonzero().flatten()
            if bad.numel():
                t = int(bad[0])
                task = self._task_index(t)
                if bool(D[t] == 0):
                    raise ValueError(
                        f"task {task} has loss {float(losses[t])!r}, equal to its lower bound "
                        f"L* = {float(Ls[t])!r}: with eps=0 FAMO takes log(L - L*) and divides "
                        "by it; pass None for a task that is absent this step, or use eps > 0")
                raise ValueError(f"task {task} has loss {float(losses[t])!r} below its lower "
                                 f"bound L* = {float(Ls[t])!r}: FAMO takes log(L - L*)")
        return D + self.eps

    def _update(self, before: Tensor, after: Tensor) -> Tensor:
        xi = self._xi.get()
        z = torch.softmax(xi, dim=0)
        delta = torch.log(before.to(xi)) - torch.log(after.to(xi))
        self._xi.step(z * (delta - z @ delta))
        return delta

    def _update_partial(self, before: Tensor, after: Tensor) -> Tensor:
        """:meth:`_update` over the tasks that have a previous loss (the others: NaN delta)."""
        have = torch.isfinite(before)
        delta = torch.full_like(after, float("nan"))
        if not bool(have.any()):
            return delta
        if bool(have.all()):
            return self._update(before, after)
        P = have.nonzero().flatten().to("cpu")
        full = self._xi
        sub = full.restrict(P)
        self._xi = sub
        try:
            d = self._update(before[P.to(before.device)], after[P.to(after.device)])
        finally:
            self._xi = full
        full.scatter(sub, P, before.shape[0])
        return delta.index_copy(0, P.to(delta.device), d.to(delta))

    def update(self, losses_after: Tensor | Sequence[float], *,
               present: Tensor | Sequence[bool] | None = None) -> None:
        """The paper's exact logit update: the losses of the same batch after the optimizer step.

        Call it after ``optimizer.step()``; the next call then does not update the logits again.
        ``present`` as in the call (``losses_after`` then has the present tasks' values).
        """
        if self.prev_losses is None:
            raise RuntimeError("FAMO.update(): call the aggregator on this step's losses first "
                               "(or update() was already called for this step)")
        n = len(losses_after) if not isinstance(losses_after, Tensor) else (
            losses_after.shape[0] if losses_after.dim() == 1 else -1)
        mask = check_present(present, n, self.prev_losses.shape[0], rows="losses_after")
        if mask is None:
            self._update_after(losses_after)
            return
        w = self.weights
        self.weights = None
        try:
            with self._present_call(mask):
                self._update_after(losses_after)
        finally:
            self.weights = w

    def _update_after(self, losses_after: Tensor | Sequence[float]) -> None:
        assert self.prev_losses is not None
        after = check_losses(losses_after, self.prev_losses.shape[0], self.prev_losses)
        if self._subset_idx is None and not self._partial:
            self._update(self.prev_losses, self._shifted(after))
            self.prev_losses = None
            return
        if not bool(torch.isfinite(self.prev_losses).any()):
            raise RuntimeError("FAMO.update(): call the aggregator on these tasks' losses first "
                               "(or update() was already called for them)")
        self._update_partial(self.prev_losses, self._shifted(after))
        self.prev_losses = torch.full_like(self.prev_losses, float("nan"))
        self._partial = True

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        if losses is None:
            raise ValueError("FAMO needs the loss values: agg(J, losses)")
        T = num_tasks
        D = self._shifted(losses)
        if self._xi.value is None:
            self._xi.init(torch.zeros(T, dtype=dtype, device=device))
        if self._xi.get().shape[0] != T:
            raise ValueError(f"FAMO was tracking {self._xi.get().shape[0]} tasks, got J with {T} "
                             "rows; call reset() to start over")
        delta = torch.full((T,), float("nan"), dtype=dtype, device=device)
        if self.prev_losses is not None:
            if self._subset_idx is None and not self._partial:
                delta = self._update(self.prev_losses, D)
            else:
                delta = self._update_partial(self.prev_losses.to(D), D)
        z = torch.softmax(self._xi.get(), dim=0)
        q = z / D.to(z)
        w = q / q.sum()
        self.prev_losses = D.detach().clone()
        self.diagnostics = {"z": z, "delta": delta}
        return w.to(dtype)

    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"_xi": ((0,), 0.0), "prev_losses": ((0,), float("nan"))}

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        return {"min_losses": (0,)}

    def _scatter(self, saved: dict[str, Any], idx: Tensor, num_tasks: int) -> None:
        super()._scatter(saved, idx, num_tasks)
        self._note_partial()

    def _note_partial(self) -> None:
        prev = self.prev_losses
        self._partial = prev is not None and not bool(torch.isfinite(prev).all())

    def state_dict(self) -> dict[str, Any]:
        return {"logits": self._xi.state_dict(),
                "prev_losses": None if self.prev_losses is None else self.prev_losses.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"logits", "prev_losses"}
        if unknown:
            raise ValueError(f"FAMO state has unknown keys {sorted(unknown)}")
        prev = state.get("prev_losses")
        if prev is not None and (not isinstance(prev, Tensor) or prev.dim() != 1):
            raise ValueError("FAMO state 'prev_losses' must be a 1-D tensor or None")
        self._xi.load_state_dict(state.get("logits", {}), "FAMO.logits")
        self.prev_losses = None if prev is None else prev.detach().clone()
        self._note_partial()

    def reset(self) -> None:
        self._xi.clear()
        self.prev_losses = None
        self._partial = False

    def __repr__(self) -> str:
        return (f"FAMO(beta={self.beta}, gamma={self.gamma}, "
                f"optimizer={self._xi.optimizer_name!r})")
