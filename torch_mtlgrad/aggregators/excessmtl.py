"""ExcessMTL: task weights driven by excess risks (He et al., ICML 2024).

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi, Zhao, *Robust Multi-Task Learning with Excess Risks*,
ICML 2024 (arXiv:2402.02009).

Loss-based weightings give label-noisy tasks, whose Bayes error is large, too much weight.
ExcessMTL weights the tasks by their distance to convergence instead, the excess risk
``L_i(theta) - L_i(theta_i*)``, estimated by a second-order Taylor expansion around the task's
optimum (eqs. 6-7): ``E_i ~ g_i^T H_i^{-1} g_i`` with the Hessian ``H_i`` replaced by the diagonal
AdaGrad approximation built from the task's accumulated squared gradients,

    S_i <- S_i + g_i * g_i            (element-wise, over the steps so far, this one included)
    H_i  = diag(sqrt(S_i + eps))
    E_i  = sum_j g_ij^2 / sqrt(S_ij + eps)

(the Taylor expansion's factor 1/2 cancels in the scale processing below; the authors' code
omits it too).  Scale processing (Sec. 3.2): each task's estimate is divided by its first one,
``r_i = E_i / E_i^(0)``, so that tasks with gradients of different scales compete on equal terms.
The weights then take an exponentiated-gradient step on the simplex (eq. 9),

    alpha_i <- alpha_i exp(eta r_i) / sum_j alpha_j exp(eta r_j),      alpha^(0) = 1/T,

with ``eta = robust_step_size``, and the direction is ``d = alpha^T J`` (weights summing to 1:
scale convention ``"convex"``).

Defaults and choices (documented; checked in the tests):

* ``robust_step_size = 1e-2``, the default of the authors' code (its configuration; their
  README's example runs use 1, TorchJD's default is 1.0); ``eps = 1e-7``, the authors' constant
  inside the square root (``eps = 0`` makes the weights exactly invariant to the gradients' scale;
  an entry with ``S_ij = 0`` then adds 0).
* The baseline ``E_i^(0)`` is the task's first positive estimate.  On the first call every
  ratio is 1, so the weights stay uniform, as in the authors' code (which skips the update on
  its first call).  A task whose gradient has been 0 so far has excess risk 0 and ratio 0 (it
  is converged) and sets its baseline when its gradient first is not; no division by 0.
* The authors' code (and LibMTL's copy) keeps loss weights summing to ``T``: theirs are ``T``
  times ours (``"excessmtl*T"``).
* TorchJD 0.18's ``ExcessMTL`` (with ``n_warmup_steps = 0``) also takes the first call's
  estimates as the baseline, but already steps on them unscaled at that call, so its weights are
  ours times ``exp(eta E^(0))``, renormalised, at every later call; it divides by
  ``E^(0) + 1e-7``.
* ``warmup`` (default 0; TorchJD's ``n_warmup_steps``): the paper (Appendix C.1) collects the
  statistics over the first epochs before the weights move.  During the first ``warmup`` calls
  the weights stay uniform while the squared gradients accumulate, and a task's baseline is then
  the mean of its estimates over the warmup calls it was present in (its first positive estimate
  after them if it had none).  With ``warmup = 0`` the first call's estimate is the baseline.

State (``state_dict``): ``sq_grad_sum`` (``[T, D]``, the squared gradients so far: ``T`` times
the memory of one gradient, as the method needs), ``baseline`` (``[T]``, 0 until set),
``alpha`` (``[T]``, on the simplex), the call counter ``step`` and, with ``warmup``,
``warmup_sum`` and ``warmup_count`` (``[T]``, each task's estimates during the warmup).  No host synchronisation.  ``diagnostics``:
``"excess_risk"`` (``E``) and ``"ratio"`` (``r``).

Absent tasks: an absent task's squared-gradient sum, baseline and ``alpha`` do not move; the
present tasks' ``alpha`` is renormalised to sum 1 for the step (uniform when they hold none of
it) and written back scaled to the share of the simplex they held, so ``alpha`` stays on the
simplex.  A task first present later starts from ``S = 0``, no baseline, and its share ``1/T``
of the initial ``alpha``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import Aggregator
from ._shares import present_share

__all__ = ["ExcessMTL"]

_KEYS = ("sq_grad_sum", "baseline", "alpha")
_WARMUP_KEYS = ("warmup_sum", "warmup_count")


class ExcessMTL(Aggregator):
    """ExcessMTL (He et al., 2024): exponentiated weights of the tasks' scaled excess risks.

    Args:
        robust_step_size: the step ``eta > 0`` of the exponentiated update (default 1e-2).
        eps: added to the accumulated squared gradients under the square root (default 1e-7;
            ``>= 0``).
        warmup: calls during which the weights stay uniform and the baselines are averaged
            (default 0: the first estimate is the baseline).

    Stateful (the squared gradients so far, each task's baseline excess risk, the weights).  It
    reads ``J`` itself (element-wise squares), not only ``G``.  See the module docstring.

    Example:
        >>> import torch
        >>> agg = ExcessMTL(robust_step_size=1.0)
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> agg(J), agg.weights          # the first call sets the baselines: uniform
        (tensor([0.5000, 1.0000]), tensor([0.5000, 0.5000]))
        >>> J2 = torch.tensor([[1.0, 0.0], [0.0, 0.2]])   # task 1 is near convergence
        >>> _ = agg(J2)
        >>> agg.diagnostics["ratio"], agg.weights   # task 0 further from it: more weight
        (tensor([0.7071, 0.0100]), tensor([0.6676, 0.3324]))
    """

    stateful = True
    paper = ("He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, *Robust Multi-Task Learning with "
             "Excess Risks*, ICML 2024")
    summary = ("exponentiated weights of excess risks estimated from AdaGrad's diagonal Hessian, "
               "each scaled by its first estimate")

    def __init__(self, robust_step_size: float = 1e-2, eps: float = 1e-7,
                 warmup: int = 0) -> None:
        super().__init__()
        if isinstance(robust_step_size, bool) or not isinstance(robust_step_size, (int, float)) \
                or not (math.isfinite(robust_step_size) and robust_step_size > 0):
            raise ValueError(f"robust_step_size must be a positive number (e.g. 1e-2), got "
                             f"{robust_step_size!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
                or not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0 (e.g. 1e-7), got {eps!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (calls before the weights move), got "
                             f"{warmup!r}")
        self.robust_step_size = float(robust_step_size)
        self.eps = float(eps)
        self.warmup = warmup
        self.step = 0
        self.warmup_sum: Tensor | None = None  # [T], with warmup only
        self.warmup_count: Tensor | None = None  # [T]
        self.sq_grad_sum: Tensor | None = None  # [T, D]
        self.baseline: Tensor | None = None  # [T], 0 until set
        self.alpha: Tensor | None = None  # [T], on the simplex

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        T, D = J.shape
        if self.sq_grad_sum is not None and tuple(self.sq_grad_sum.shape) != (T, D):
            raise ValueError(
                f"ExcessMTL was accumulating a [{self.sq_grad_sum.shape[0]}, "
                f"{self.sq_grad_sum.shape[1]}] Jacobian, got [{T}, {D}]; call reset() to start "
                "over")
        sq = J * J
        S = sq if self.sq_grad_sum is None else self.sq_grad_sum.to(J) + sq
        h = torch.sqrt(S + self.eps)
        E = torch.where(h > 0, sq / torch.where(h > 0, h, 1.0), 0.0).sum(dim=1)
        base = torch.zeros_like(E) if self.baseline is None else self.baseline.to(J)
        a, mass = present_share(self.alpha, T, self._subset_total or T, J)
        if self.step < self.warmup:  # collect the estimates; the weights stay
            zeros = torch.zeros_like(E)
            self.warmup_sum = (zeros if self.warmup_sum is None else self.warmup_sum.to(J)) + E
            self.warmup_count = (zeros if self.warmup_count is None
                                 else self.warmup_count.to(J)) + 1
            ratio = torch.zeros_like(E)
        else:
            if self.warmup_sum is not None and self.warmup_count is not None:
                cnt = self.warmup_count.to(J)
                mean = self.warmup_sum.to(J) / torch.where(cnt > 0, cnt, 1.0)
                base = torch.where(base > 0, base, mean)  # the warmup's mean, when positive
            base = torch.where(base > 0, base, E)  # else the first positive estimate
            ratio = torch.where(base > 0, E / torch.where(base > 0, base, 1.0), 0.0)
            a = torch.softmax(torch.log(a) + self.robust_step_size * ratio, dim=0)  # eq. 9
        self.sq_grad_sum, self.baseline, self.alpha = S, base, a * mass
        self.step += 1
        self.weights = a
        self.diagnostics = {"excess_risk": E, "ratio": ratio}
        return a @ J

    # State -----------------------------------------------------------------------------------
    def _task_state(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {"sq_grad_sum": ((0,), 0.0), "baseline": ((0,), 0.0),
                "alpha": ((0,), lambda: 1.0 / (self._subset_total or 1)),
                "warmup_sum": ((0,), 0.0), "warmup_count": ((0,), 0.0)}

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: None if getattr(self, k) is None else getattr(self, k).clone()
                               for k in (*_KEYS, *_WARMUP_KEYS)}
        out["step"] = self.step
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = (*_KEYS, *_WARMUP_KEYS, "step")
        unknown = set(state) - set(known)
        if unknown:
            raise ValueError(f"ExcessMTL state has unknown keys {sorted(unknown)} (expected "
                             f"{list(known)})")
        vals = [state.get(k) for k in _KEYS]
        if any(v is None for v in vals) and not all(v is None for v in vals):
            raise ValueError(f"ExcessMTL state must hold all of {list(_KEYS)} or none")
        S, base, alpha = vals
        if S is not None and not (isinstance(S, Tensor) and isinstance(base, Tensor)
                                  and isinstance(alpha, Tensor) and S.dim() == 2
                                  and base.shape == (S.shape[0],)
                                  and alpha.shape == (S.shape[0],)):
            raise ValueError("ExcessMTL state: 'sq_grad_sum' must be a [T, D] tensor and "
                             "'baseline' and 'alpha' [T] tensors")
        extra = [state.get(k) for k in _WARMUP_KEYS]
        for k, v in zip(_WARMUP_KEYS, extra):
            if v is not None and not (isinstance(v, Tensor) and v.dim() == 1):
                raise ValueError(f"ExcessMTL state: {k!r} must be a [T] tensor or None")
        step = state.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"ExcessMTL state: 'step' must be an int >= 0, got {step!r}")
        for k, v in zip((*_KEYS, *_WARMUP_KEYS), (*vals, *extra)):
            setattr(self, k, None if v is None else v.detach().clone())
        self.step = step

    def reset(self) -> None:
        self.sq_grad_sum = self.baseline = self.alpha = None
        self.warmup_sum = self.warmup_count = None
        self.step = 0

    def __repr__(self) -> str:
        return (f"ExcessMTL(robust_step_size={self.robust_step_size}, eps={self.eps}, "
                f"warmup={self.warmup})")
