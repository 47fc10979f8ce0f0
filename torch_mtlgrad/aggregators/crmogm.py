"""CR-MOGM: correlation-reduced stochastic multi-objective gradient manipulation (Zhou et al.,
NeurIPS 2022).

Zhou, Zhang, Jiang, Zhong, Gu, Zhu, *On the Convergence of Stochastic Multi-Objective Gradient
Manipulation and Beyond*, NeurIPS 2022.

A multi-objective gradient manipulation method (MOGM: MGDA, PCGrad, CAGrad, ...) computes its
weights ``lambda_hat_k`` from the stochastic gradients of step ``k``; they are correlated with the
gradients they weight, which biases the direction and breaks the convergence of the stochastic
methods.  CR-MOGM smooths the weights across steps by a moving average and combines the current
rows with the smoothed weights:

    lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda_hat_k,        d_k = lambda_k^T J_k

with ``lambda_0 = lambda_hat_1`` (the first call returns the base's weights).

The choices the paper leaves open, as TorchJD 0.18's ``CRMOGMWeighting`` makes them (tested to
agree): ``alpha`` is the weight of the previous ``lambda`` (default ``0.9``, as an EMA's); the
paper's analysis lets ``alpha_k`` grow towards 1 as the learning rate decays (its Corollary 1):
set the attribute ``agg.alpha`` between calls, e.g. ``1 - lr / lr_0``; the first ``lambda`` is
the base's.  The base defaults to ``"mgda"`` (the paper's first instance); any weighting of the
rows that reads ``G`` or the losses works (``"pcgrad"``, ``"cagrad"``, ``"upgrad"``, ...): the
flags ``gramian_only``, ``needs_losses`` and ``random`` (so :attr:`reads`) are the base's.  A convex
base (weights summing to 1) stays convex: the ``"convex"`` scale convention for the default.

Diagnostics of a call: the base's own (e.g. MGDA's ``simplex_weights``, which are its
``lambda_hat``, not the smoothed weights), plus ``lambda_hat``, the base's weights of the call.

Absent tasks: an absent task's ``lambda`` does not move; the present tasks' previous ``lambda``
is their slice (not renormalised; the base's weights are those of the present tasks alone), and
a task first present later starts from its base weight (``lambda_{k-1} = lambda_hat_k`` for it),
as every task does at the first call.  The base's own per-task state follows the base's rules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator

__all__ = ["CRMOGM"]


class CRMOGM(WeightedAggregator):
    """CR-MOGM (Zhou et al., NeurIPS 2022): a base weighting smoothed by a moving average.

    Args:
        base: the method whose weights are smoothed: a :class:`WeightedAggregator` or its short
            name (default ``"mgda"``).
        alpha: the weight of the previous ``lambda`` in ``[0, 1]`` (default ``0.9``); ``0``
            returns the base's weights, ``1`` keeps the first call's.

    Against TorchJD 0.18: ``CRMOGM(base, alpha)`` gives the weights of
    ``CRMOGMWeighting(<the same weighting>, alpha)`` (tested with the base's weights fed to
    TorchJD's smoothing, and with ``"upgrad"`` against TorchJD's ``UPGradWeighting``).

    Example:
        >>> import torch
        >>> agg = CRMOGM()                       # MGDA's weights, smoothed with alpha = 0.9
        >>> agg(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))   # first call: MGDA's own weights
        tensor([0.8000, 0.4000])
        >>> agg(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))   # MGDA alone: (0.2, 0.8)
        tensor([1.4800, 0.2600])
        >>> agg.weights                          # 0.9 (0.8, 0.2) + 0.1 (0.2, 0.8)
        tensor([0.7400, 0.2600])
    """

    stateful = True
    paper = ("Zhou, Zhang, Jiang, Zhong, Gu & Zhu, *On the Convergence of Stochastic "
             "Multi-Objective Gradient Manipulation and Beyond*, NeurIPS 2022")
    summary = ("correlation-reduced MOGM: a base method's weights (MGDA by default) smoothed by a "
               "moving average across steps")

    def __init__(self, base: WeightedAggregator | str = "mgda", alpha: float = 0.9) -> None:
        super().__init__()
        if isinstance(base, str):
            from ._registry import get

            base = get(base)  # type: ignore[assignment]
        if not isinstance(base, WeightedAggregator) or not base.from_gramian:
            raise TypeError(
                f"CRMOGM smooths the weights of a method whose direction is w^T J with weights "
                f"from G or the losses (a WeightedAggregator, e.g. 'mgda', 'pcgrad', 'cagrad'); "
                f"got {base!r}")
        self.base = base
        self.alpha = alpha
        self.lam: Tensor | None = None  # [T]; NaN for a task not yet present

    @property
    def alpha(self) -> float:
        """The weight of the previous ``lambda`` (may be changed between calls)."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"alpha must be a number in [0, 1] (the weight of the previous "
                             f"lambda), got {value!r}")
        self._alpha = float(value)

    # Flags: the base's --------------------------------------------------------------------
    @property
    def gramian_only(self) -> bool:  # type: ignore[override]
        return bool(self.base.gramian_only)

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return bool(self.base.needs_losses)

    @property
    def random(self) -> bool:  # type: ignore[override]
        return bool(self.base.random)

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        T = num_tasks
        if self.lam is not None and self.lam.shape[0] != T:
            raise ValueError(f"CRMOGM holds weights for {self.lam.shape[0]} tasks, got {T}: "
                             "call reset() to start over with another number of tasks")
        lam_hat = self.base.weighting(G, losses, num_tasks=T, dtype=dtype, device=device)
        self.base.weights = lam_hat
        if self.lam is None:
            prev = lam_hat
        else:
            prev = self.lam.to(lam_hat)
            prev = torch.where(torch.isnan(prev), lam_hat, prev)
        lam = self.alpha * prev + (1.0 - self.alpha) * lam_hat
        self.lam = lam
        self.diagnostics = {**self.base.diagnostics, "lambda_hat": lam_hat}
        return lam

    # Absent tasks: ours sliced (NaN until first present), the base's by its own rules -----
    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"lam": ((0,), float("nan"))}

    def _known_num_tasks(self) -> int | None:
        own = None if self.lam is None else int(self.lam.shape[0])
        return own if own is not None else self.base._known_num_tasks()

    def _restrict(self, idx: Tensor, num_tasks: int) -> dict[str, Any]:
        saved = super()._restrict(idx, num_tasks)
        saved["base"] = self.base._restrict(idx, num_tasks)
        return saved

    def _unrestrict(self, saved: dict[str, Any]) -> None:
        self.base._unrestrict(saved["base"])
        super()._unrestrict(saved)

    def _scatter(self, saved: dict[str, Any], idx: Tensor, num_tasks: int) -> None:
        self.base._scatter(saved["base"], idx, num_tasks)
        super()._scatter(saved, idx, num_tasks)

    # State -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"lambda": None if self.lam is None else self.lam.clone(),
                "base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"lambda", "base"}
        if unknown:
            raise ValueError(f"CRMOGM state has unknown keys {sorted(unknown)}; expected "
                             "'lambda' and 'base'")
        lam = state.get("lambda")
        if lam is not None and (not isinstance(lam, Tensor) or lam.dim() != 1):
            raise ValueError(f"CRMOGM state: 'lambda' must be a [T] tensor or None, got "
                             f"{getattr(lam, 'shape', type(lam).__name__)}")
        self.base.load_state_dict(state.get("base", {}))
        self.lam = None if lam is None else lam.detach().clone()

    def reset(self) -> None:
        self.lam = None
        self.base.reset()

    def __repr__(self) -> str:
        return f"CRMOGM(base={self.base!r}, alpha={self.alpha})"
