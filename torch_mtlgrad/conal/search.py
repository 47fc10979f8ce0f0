"""First-order bilevel architecture search of CoNAL (paper eq. 1-2, Algorithm 1).

Problem (2): ``min_alpha L_val(theta*(alpha), alpha)`` s.t. ``theta*(alpha) = argmin L_tr``,
solved with the first-order approximation (DARTS, Liu et al. 2019): alternately

1. an ``alpha`` step on a validation batch: gradient of ``L_val = (1/T) sum_t L_t`` (eq. 1) with
   respect to ``alpha`` at the current weights (Algorithm 1, lines 3-4);
2. a weight step on a training batch: the task gradients of the shared chain are captured into
   ``J`` (eq. 4), :class:`~torch_mtlgrad.conal.ConflictNoticing` zeroes the modules from the first
   conflicting one on (eq. 5), the aggregator (``"sum"`` by default, eq. 5's sum) combines the
   rest, and the weight optimizer steps (lines 5-8).  Purely-specific modules and heads get the
   sum of the task gradients, i.e. each its own task's gradient.

The routine never owns the loop: call :meth:`BilevelSearch.alpha_step` and
:meth:`BilevelSearch.weight_step` with losses you computed, or :meth:`BilevelSearch.step` with two
closures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..aggregators import Aggregator
from ..optimizer import MultiTaskOptimizer
from .conflict import ConflictNoticing
from .space import SearchSpace

__all__ = ["BilevelSearch", "first_order_alpha_step"]

LossFn = Callable[[], Sequence[Tensor]]


def _holds(opt: torch.optim.Optimizer, p: Tensor) -> bool:
    return any(q is p for g in opt.param_groups for q in g["params"])


def first_order_alpha_step(val_losses: Sequence[Tensor], alpha: Tensor,
                           alpha_optimizer: torch.optim.Optimizer) -> Tensor:
    """One first-order upper-level step: ``alpha -= lr * d/dalpha mean_t L_t^val`` through
    ``alpha_optimizer``; only ``alpha`` receives a gradient.  A non-finite loss is an error and
    leaves ``alpha`` as it was.  Returns the detached mean validation loss."""
    loss = torch.stack([v.reshape(()) for v in val_losses]).mean()
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"validation loss is not finite ({float(loss.detach())}); alpha not updated")
    alpha_optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=[alpha])
    alpha_optimizer.step()
    return loss.detach()


class BilevelSearch:
    """Alternating first-order bilevel search over a :class:`SearchSpace` (Algorithm 1).

    Defaults (named so that they can be cited and overridden):

    * weight optimizer: ``torch.optim.Adam(space.weight_parameters(), lr=1e-3)``;
    * alpha optimizer: ``torch.optim.Adam([alpha], lr=3e-4, betas=(0.5, 0.999),
      weight_decay=1e-3)``, the DARTS architecture optimizer;
    * aggregator ``"sum"`` (eq. 5 gives the kept modules the sum of the task gradients);
    * conflict noticing on ``space.shared`` with a diagnostics window of 100 steps.

    Algorithm 1 starts from pre-trained weights; train the shared chain first (or pass
    pre-trained modules to :class:`SearchSpace`, whose specific copies then start from them).
    Adam normalises every alpha step, so noise-level differences between branches grow into
    decisions; ``torch.optim.SGD([alpha], lr=...)`` keeps the steps proportional to the
    validation-loss gradient (the planted-groups run on the documentation's Reproductions page
    uses it, lr 1).  A few weight-only steps before the first alpha step (call
    :meth:`weight_step` alone) let the copies train before they are compared.

    Args:
        space: the search space.
        weight_optimizer: optimizer over the weights (must not hold ``alpha``).
        alpha_optimizer: optimizer over ``alpha`` (must hold ``alpha`` and nothing else).
        aggregator: how the kept shared columns are combined (name or ``Aggregator``).
        conflict_noticing: ``False`` disables the zeroing (diagnostics are still recorded): the
            paper's "w/o conflict-notice" ablation.
        window: window of the conflict diagnostics.

    Attributes:
        noticing: the :class:`ConflictNoticing` plugin (diagnostics, ``to_dict()``).
        weight_optimizer: the :class:`~torch_mtlgrad.MultiTaskOptimizer` of the weight step.
        alpha_optimizer: the optimizer of the alpha step.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> space = SearchSpace([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)], num_tasks=2,
        ...                     heads=[torch.nn.Linear(4, 1) for _ in range(2)])
        >>> search = BilevelSearch(space)
        >>> x, ys = torch.randn(8, 4), [torch.randn(8, 1), -torch.randn(8, 1)]
        >>> def losses():
        ...     return [torch.nn.functional.mse_loss(o, y) for o, y in zip(space(x), ys)]
        >>> info = search.step(losses, losses)
        >>> sorted(info)
        ['pstar', 'train_losses', 'val_loss']
    """

    def __init__(
        self,
        space: SearchSpace,
        weight_optimizer: torch.optim.Optimizer | None = None,
        alpha_optimizer: torch.optim.Optimizer | None = None,
        *,
        aggregator: str | Aggregator = "sum",
        conflict_noticing: bool = True,
        window: int = 100,
    ) -> None:
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a SearchSpace, got {type(space).__name__}")
        self.space = space
        if weight_optimizer is None:
            weight_optimizer = torch.optim.Adam(list(space.weight_parameters()), lr=1e-3)
        if alpha_optimizer is None:
            alpha_optimizer = torch.optim.Adam(space.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        if _holds(weight_optimizer, space.alpha):
            raise ValueError("the weight optimizer holds alpha: give it space.weight_parameters() only")
        if not _holds(alpha_optimizer, space.alpha):
            raise ValueError("the alpha optimizer does not hold space.alpha")
        others = [q for g in alpha_optimizer.param_groups for q in g["params"] if q is not space.alpha]
        if others:
            raise ValueError(f"the alpha optimizer holds {len(others)} tensors besides alpha")
        self.noticing = ConflictNoticing(list(space.shared), window=window, zero=conflict_noticing)
        self.weight_optimizer = MultiTaskOptimizer(
            weight_optimizer, shared=space.shared, aggregator=aggregator, plugins=[self.noticing],
            num_tasks=space.num_tasks,
        )
        self.alpha_optimizer = alpha_optimizer
        self.steps = 0

    def _check(self, losses: Sequence[Tensor], which: str) -> list[Tensor]:
        losses = list(losses)
        if len(losses) != self.space.num_tasks:
            raise ValueError(f"{which}: expected {self.space.num_tasks} task losses, got {len(losses)}")
        return losses

    def alpha_step(self, val_losses: Sequence[Tensor]) -> Tensor:
        """Upper-level step: ``alpha -= lr * d/dalpha (1/T) sum_t L_t^val`` (first order).

        Only ``alpha`` receives a gradient; the weights' ``.grad`` are left as they are.
        Returns the detached validation loss.
        """
        return first_order_alpha_step(self._check(val_losses, "alpha_step"), self.space.alpha,
                                      self.alpha_optimizer)

    def weight_step(self, train_losses: Sequence[Tensor]) -> None:
        """Lower-level step with conflict noticing (eq. 4-5), then the weight optimizer's step."""
        losses = self._check(train_losses, "weight_step")
        self.weight_optimizer.zero_grad(set_to_none=True)
        self.weight_optimizer.backward(losses)
        self.weight_optimizer.step()
        self.steps += 1

    def step(self, val_losses: LossFn, train_losses: LossFn) -> dict[str, Tensor]:
        """One iteration of Algorithm 1: ``alpha_step(val_losses())`` then
        ``weight_step(train_losses())`` (each closure runs its own forward, so the training
        forward sees the updated ``alpha``).  Returns ``val_loss``, ``train_losses`` and ``pstar``.
        """
        v = self.alpha_step(val_losses())
        tr = self._check(train_losses(), "weight_step")
        self.weight_step(tr)
        return {
            "val_loss": v,
            "train_losses": torch.stack([t.detach().reshape(()) for t in tr]),
            "pstar": self.noticing.diagnostics["conflict_pstar"],
        }

    def state_dict(self) -> dict[str, Any]:
        """Both optimizers' state (the weight optimizer's includes the conflict diagnostics)."""
        return {
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the model's own weights and alpha are in the model's)."""
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.steps = int(state["steps"])
