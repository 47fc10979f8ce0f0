"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018).

Chen, Badrinarayanan, Lee, Rabinovich, *GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks*, ICML 2018, Sec. 3 and Algorithm 1.  Task weights
``w_i`` (initially 1) scale the losses, ``L = sum_i w_i L_i``; they are learned so that the
weighted gradient norms ``G_W^(i) = ||w_i grad_W L_i|| = w_i ||g_i||`` approach a common scale
adjusted by each task's relative training rate:

    L~_i(t) = L_i(t) / L_i(0)                     (loss ratio; L_i(0) = the first call's loss)
    r_i(t)  = L~_i(t) / mean_j L~_j(t)            (relative inverse training rate)
    G_bar(t) = mean_j G_W^(j)(t)
    L_grad  = sum_i | G_W^(i)(t) - G_bar(t) [r_i(t)]^alpha |_1

with the target ``G_bar(t) [r_i(t)]^alpha`` held constant (the paper's instruction), so

    dL_grad/dw_i = sign(w_i ||g_i|| - G_bar r_i^alpha) ||g_i||.

Each call (Algorithm 1): the direction is ``d = sum_i w_i g_i`` with the current weights; then
``w`` takes one step of its own optimizer on ``dL_grad/dw`` and is renormalised so that
``sum_i w_i = T``.  Choices the paper leaves open, documented: weights are clipped at 0 before
the renormalisation (the paper's renormalisation assumes positive weights; if every weight
reaches 0 they restart at 1, ``diagnostics["restarted"] = 1``), and ``alpha`` defaults to 1.5 (the paper's value
for NYUv2; it is the asymmetry hyperparameter named ``alpha`` in the paper).  The paper updates
``w`` with the network's optimizer and learning rate; here ``optimizer="adam"`` with
``lr=0.025`` by default (no paper default exists: tune it like a learning rate).

``W`` in the paper is the last shared layer; by default the norms are taken over all shared
parameters (the whole row of ``J``), ``||g_i||^2 = G_ii``: only the diagonal of the Gramian is
read, computed as the row norms of ``J`` (O(TD), not the O(T^2 D) Gramian).  ``layer=(start,
end)`` restricts the norms to those columns of ``J`` (e.g. the last shared layer's range from
``FlatLayout.param_range``), as in the paper.

The losses must be positive at the first call (they are the denominators of ``L~``; checked
once, the only host synchronisation: later steps are sync-free on CUDA).
State (``state_dict``): ``w`` with its optimizer state and the initial losses ``L(0)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import (
    Aggregation,
    WeightedAggregator,
    check_finite_input,
    check_losses,
    check_present,
    work_dtype,
)
from ._learned import LearnedVector, OptimizerName

__all__ = ["GradNorm"]


class GradNorm(WeightedAggregator):
    """GradNorm (Chen et al., 2018): weights learned on ``L_grad = sum_i |w_i ||g_i|| - target_i|``.

    Args:
        alpha: the asymmetry ``alpha`` (default 1.5).
        lr: learning rate of the weights' optimizer (default 0.025).
        optimizer: ``"adam"`` (default) or ``"sgd"`` (Algorithm 1's plain gradient step).
        layer: ``(start, end)`` columns of ``J`` the norms are taken over (the paper's last
            shared layer ``W``); ``None`` (default) uses the whole row.

    Diagnostics of the last call: ``grad_norms`` (``||g_i||``), ``target``, ``ratio``
    (``r_i``), ``l_grad``, ``restarted``.

    Absent tasks: an absent task's weight, optimizer moments and ``L_i(0)`` do not move; the
    present tasks' weights take the step among themselves and are renormalised to sum to
    ``T_present``.  A task first present later starts with weight 1, a fresh Adam, and
    ``L_i(0)`` = its loss at that step (which must be positive).  Later losses may be 0; when
    every present task's loss ratio is 0, ``r = 1``.

    Example:
        >>> import torch
        >>> agg = GradNorm(alpha=1.5, lr=0.1, optimizer="sgd")
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
        >>> agg(J, torch.tensor([1.0, 1.0]))   # w = (1, 1)
        tensor([1., 3.])
        >>> agg.task_weights   # (1 + 0.1, 1 - 0.3), renormalised to sum to T = 2
        tensor([1.2222, 0.7778])
    """

    paper = ("Chen et al., *GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep "
             "Multitask Networks*, ICML 2018")
    summary = ("GradNorm: weights learned so that the weighted gradient norms follow the tasks' "
               "training rates")

    gramian_only = True
    needs_losses = True
    stateful = True
    _unseen = False  # some task was never present (its L_i(0) is NaN)

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, optimizer: OptimizerName = "adam",
                 layer: tuple[int, int] | None = None) -> None:
        super().__init__()
        if not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
        if layer is not None and not (isinstance(layer, tuple) and len(layer) == 2
                                      and all(isinstance(x, int) for x in layer)
                                      and 0 <= layer[0] < layer[1]):
            raise ValueError(f"layer must be a (start, end) pair of column indices with "
                             f"0 <= start < end, got {layer!r}")
        self.alpha = float(alpha)
        self.layer = layer
        self._w = LearnedVector(optimizer, lr)
        self.initial_losses: Tensor | None = None

    @property
    def task_weights(self) -> Tensor | None:
        """The weights the next call will use (``None`` before the first call)."""
        return None if self._w.value is None else self._w.get()

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        # Only the row norms are needed (of the layer's columns with layer=), without forming G.
        if self.layer is not None:
            start, end = self.layer
            if end > J.shape[1]:
                raise ValueError(f"layer={self.layer} is outside J's {J.shape[1]} columns")
            norms = J[:, start:end].norm(dim=1)
        else:
            norms = J.norm(dim=1)
        w = self._update(norms, losses, J.shape[0], J.dtype, J.device)
        self.weights = w
        return w @ J

    @property
    def from_gramian(self) -> bool:
        """The norms of the whole gradients are ``sqrt(diag G)``; one layer's need ``J``."""
        return self.layer is None

    @property
    def reads(self) -> Any:
        """``"layer"`` with ``layer=``: only the norms of the task gradients over those columns
        (a caller may compute them from that layer's gradients alone and pass them to
        :meth:`aggregate_norms`); else ``"gramian"`` (the diagonal of ``G``)."""
        return "gramian" if self.layer is None else "layer"

    def aggregate_norms(self, norms: Tensor, losses: Tensor, *, present: Tensor | None = None,
                        check_finite: bool = True) -> Aggregation:
        """The weights of this call from the task gradients' norms ``||g_i||`` over the
        ``layer=`` columns (``[T]``, or the present tasks' only with ``present=``), for a caller
        that never builds ``J`` (the optimizer takes ``layer``'s gradients by one small backward
        per task, then one backward of ``sum_i w_i L_i``).  The same step as :meth:`aggregate`
        on a ``J`` with those norms; ``direction`` is ``None``.  Non-finite norms or losses raise
        :class:`~torch_mtlgrad.NonFiniteError` before any state changes, as in :meth:`aggregate`
        (``check_finite=False`` skips the check).

        Example:
            >>> a, b = GradNorm(layer=(0, 1)), GradNorm(layer=(0, 1))
            >>> J = torch.tensor([[3.0, 1.0], [1.0, 2.0]]); L = torch.tensor([1.0, 2.0])
            >>> torch.equal(a.aggregate(J, L).weights, b.aggregate_norms(J[:, :1].norm(dim=1), L).weights)
            True
        """
        norms = torch.as_tensor(norms).detach()
        if norms.dim() != 1 or not norms.is_floating_point():
            raise ValueError(f"norms must be a 1-D floating-point tensor (one per present task), "
                             f"got shape {tuple(norms.shape)} and dtype {norms.dtype}")
        norms = norms.to(work_dtype(norms.dtype))
        T = norms.shape[0]
        mask = check_present(present, T, self._known_num_tasks())
        lw = check_losses(losses, T, norms)
        if self._checks_finite(check_finite):
            check_finite_input(norms, "norms", mask)
            check_finite_input(lw, "losses", mask)
        if mask is None:
            self.weights = self._update(norms, lw, T, norms.dtype, norms.device)
        else:
            with self._present_call(mask):
                self.weights = self._update(norms, lw, T, norms.dtype, norms.device)
        return Aggregation(None, self.weights, self.diagnostics)

    @property
    def runs_on_features(self) -> bool:
        """Only on the whole gradients: ``layer=`` names columns of the parameters' ``J``."""
        return self.layer is None

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.layer is not None or G is None:
            raise ValueError("GradNorm with layer= reads J's columns: call agg(J, losses)")
        return self._update(torch.diagonal(G).clamp_min(0).sqrt(), losses, num_tasks, dtype, device)

    def _update(self, norms: Tensor, losses: Tensor | None, num_tasks: int, dtype: torch.dtype,
                device: torch.device) -> Tensor:
        """The weights of this call from the task gradients' norms; one step of eq. 2."""
        if losses is None:
            raise ValueError("GradNorm needs the loss values: agg(J, losses)")
        T = num_tasks
        if self.initial_losses is None:
            self._check_initial(losses, torch.ones_like(losses, dtype=torch.bool))
            self.initial_losses = losses.detach().clone()
            self._w.init(torch.ones(T, dtype=dtype, device=device))
        elif self._subset_idx is not None or self._unseen:
            # Tasks present for the first time: L_i(0) is their loss now.
            new = torch.isnan(self.initial_losses)
            if bool(new.any()):
                self._check_initial(losses, new)
                self.initial_losses = torch.where(new, losses.detach().to(self.initial_losses),
                                                  self.initial_losses)
        w = self._w.get()
        if w.shape[0] != T:
            raise ValueError(f"GradNorm was tracking {w.shape[0]} tasks, got J with {T} rows; "
                             "call reset() to start over")
        norms = norms.to(w.dtype)
        L = losses.to(w.dtype)
        L0 = self.initial_losses.to(device=w.device, dtype=w.dtype)
        loss_ratio = L / L0
        mean_ratio = loss_ratio.mean()
        # Every loss at 0: no task trains slower than another, r = 1 (no 0/0, no host sync).
        r = torch.where(mean_ratio > 0, loss_ratio / mean_ratio, torch.ones_like(loss_ratio))
        gw = w * norms
        target = gw.mean() * r.pow(self.alpha)
        grad = torch.sign(gw - target) * norms
        self.diagnostics = {"grad_norms": norms, "target": target, "ratio": r,
                            "l_grad": (gw - target).abs().sum()}
        used = w.clone()
        self._w.step(grad)
        new = self._w.get().clamp_min(0)
        total = new.sum()
        # Every weight at 0 (only with a very large lr): restart at 1, without a host sync.
        restart = total <= 0
        new = torch.where(restart, torch.ones_like(new), new)
        total = torch.where(restart, torch.full_like(total, float(T)), total)
        self._w.assign(new * (T / total))
        self.diagnostics["restarted"] = restart.to(new.dtype)
        return used.to(dtype)

    def _check_initial(self, losses: Tensor, which: Tensor) -> None:
        bad = ((~(losses > 0)) & which).nonzero().flatten()
        if bad.numel():
            t = int(bad[0])
            raise ValueError(
                f"task {self._task_index(t)} has initial loss {float(losses[t])!r}: GradNorm "
                "divides by each task's first loss L_i(0), which must be positive; pass None "
                "for a task that is absent this step (it then takes its L_i(0) when first present)")

    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"_w": ((0,), 1.0), "initial_losses": ((0,), float("nan"))}

    def _scatter(self, saved: dict[str, Any], idx: Tensor, num_tasks: int) -> None:
        super()._scatter(saved, idx, num_tasks)
        self._note_unseen()

    def _note_unseen(self) -> None:
        """Whether some task has no ``L_i(0)`` yet (never present): checked in the host flag
        ``_unseen`` so that a plain call needs no synchronisation otherwise."""
        L0 = self.initial_losses
        self._unseen = L0 is not None and bool(torch.isnan(L0).any())

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self._w.state_dict(),
                "initial_losses": None if self.initial_losses is None
                else self.initial_losses.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"weights", "initial_losses"}
        if unknown:
            raise ValueError(f"GradNorm state has unknown keys {sorted(unknown)}")
        L0 = state.get("initial_losses")
        if L0 is not None and (not isinstance(L0, Tensor) or L0.dim() != 1):
            raise ValueError("GradNorm state 'initial_losses' must be a 1-D tensor or None")
        self._w.load_state_dict(state.get("weights", {}), "GradNorm.weights")
        self.initial_losses = None if L0 is None else L0.detach().clone()
        self._note_unseen()

    def reset(self) -> None:
        self._w.clear()
        self.initial_losses = None
        self._unseen = False

    def __repr__(self) -> str:
        return (f"GradNorm(alpha={self.alpha}, lr={self._w.lr}, "
                f"optimizer={self._w.optimizer_name!r})")
