"""DB-MTL: dual balancing of the loss scales and the gradient magnitudes (Lin et al., 2023).

Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, *Dual-Balancing for Multi-Task Learning*,
arXiv:2308.12029, 2023.

Two balancing steps, one per kind of imbalance between tasks:

* Loss-scale balancing: each task is trained on ``log L_t`` instead of ``L_t``, so that a loss
  multiplied by a constant only shifts its objective.  The gradient of ``log(L_t + eps)`` is
  ``h_t = g_t / (L_t + eps)`` (``g_t`` the row ``t`` of ``J``): this class takes ``J`` and the
  loss values and divides, which is the gradient the authors' code takes by backpropagating
  ``log(L_t + eps)``.
* Gradient-magnitude balancing: each task's log-loss gradient is tracked by an exponential moving
  average, and every tracked gradient is rescaled to the largest norm among them, so that no task
  dominates the direction:

      m_{k,t} = beta_k m_{k-1,t} + (1 - beta_k) h_{k,t},      beta_k = beta / k**beta_sigma
      d_k     = sum_t alpha_{k,t} m_{k,t},       alpha_{k,t} = max_s ||m_{k,s}|| / ||m_{k,t}||

  (call ``k = 1, 2, ...``; ``m_0 = 0``).

Defaults and the choices the paper leaves to its code, as LibMTL's ``DB_MTL`` makes them:
``beta = 0.9``, ``beta_sigma = 0`` (a constant average), ``eps = 1e-8`` in the logarithm, and
``m_0 = 0`` (so the first direction is ``(1 - beta)`` times that of the plain rescaled
log-gradients: the scale of the steps is the learning rate's to set).  One difference: LibMTL
writes ``alpha_t = max_s ||m_s|| / (||m_t|| + 1e-8)``; here ``alpha_t = max_s ||m_s|| /
||m_t||`` exactly, and a task whose tracked gradient is 0 gets ``alpha_t = 0`` (it contributes
nothing either way), so the direction is positively homogeneous in ``J`` at every scale (the two
differ by a relative ``1e-8 / ||m_t||``; tested against LibMTL's update re-derived in float64).

The direction is a combination of the tracked ``m``, not of the current rows, so ``weights`` is
``None``; ``diagnostics["alpha"]`` holds ``alpha_k`` and ``diagnostics["beta_k"]`` the average's
factor.  It reads ``J`` itself (the state ``m`` is ``[T, D]``: ``T`` times the memory of one
gradient) and the losses.  The scale convention is ``"unnormalised"``: the direction grows like
``1 / min_t L_t`` (``T (1 - beta) g / min_t L_t`` on ``T`` equal rows ``g`` at the first call).
Everything stays on ``J``'s device; the check that every ``L_t + eps > 0`` (``validate=True``)
reads the losses on the host.

Absent tasks: an absent task's ``m_t`` does not move; the call runs on the present tasks' ``m``;
a task first present later starts from ``m_0 = 0``; the step counter ``k`` advances on every call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import Aggregator

__all__ = ["DBMTL"]


class DBMTL(Aggregator):
    """DB-MTL (Lin et al., 2023): log-loss gradients, averaged over steps, rescaled to the
    largest norm and summed.

    Args:
        beta: factor of the moving average, ``beta_k = beta / k**beta_sigma`` (in ``[0, 1]``;
            default 0.9).
        beta_sigma: decay exponent of ``beta_k`` (``>= 0``; default 0: constant).
        eps: added to each loss inside the logarithm (``>= 0``; default 1e-8).
        validate: check every call that ``L_t + eps > 0`` (default); this reads the losses on
            the host, so pass ``False`` for a sync-free step on CUDA (a loss at or below ``-eps``
            then gives a meaningless direction instead of an error).

    Example:
        >>> import torch
        >>> agg = DBMTL()
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> agg(J, torch.tensor([1.0, 2.0]))   # m_1 = 0.1 (g_1 / 1, g_2 / 2): norms 0.1 and 0.2
        tensor([0.2000, 0.2000])
        >>> agg.diagnostics["alpha"]
        tensor([2., 1.])
    """

    stateful = True
    needs_losses = True
    paper = ("Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, *Dual-Balancing for Multi-Task "
             "Learning*, arXiv 2023")
    summary = ("gradients of log L_t, averaged over steps and each rescaled to the largest norm, "
               "summed")

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8,
                 validate: bool = True) -> None:
        super().__init__()

        def number(v: Any) -> bool:
            return not isinstance(v, bool) and isinstance(v, (int, float))

        if not (number(beta) and 0 <= beta <= 1):
            raise ValueError(f"beta must be a number in [0, 1] (the moving average's factor), "
                             f"got {beta!r}")
        for name, v in (("beta_sigma", beta_sigma), ("eps", eps)):
            if not (number(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.eps = float(eps)
        self.validate = bool(validate)
        self.k = 0
        self.m: Tensor | None = None  # [T, D]

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        T, D = J.shape
        if losses is None:
            raise ValueError("DBMTL needs the loss values: agg(J, losses)")
        if self.m is not None and tuple(self.m.shape) != (T, D):
            raise ValueError(
                f"DBMTL was tracking a [{self.m.shape[0]}, {self.m.shape[1]}] Jacobian, got "
                f"[{T}, {D}]; call reset() to start over")
        shifted = losses + self.eps
        if self.validate:
            bad = (~(shifted > 0)).nonzero().flatten()
            if bad.numel():
                t = int(bad[0])
                raise ValueError(
                    f"task {self._task_index(t)} has loss {float(losses[t])!r}: DB-MTL takes "
                    f"log(L + eps) with eps={self.eps!r}, so every loss must be above -eps (a "
                    "non-negative loss; pass None for a task that is absent this step)")
        h = J / shifted[:, None]
        k = self.k + 1
        beta_k = self.beta / k ** self.beta_sigma
        m = torch.zeros_like(J) if self.m is None else self.m.to(device=J.device, dtype=J.dtype)
        m = h + beta_k * (m - h)
        norms = m.norm(dim=1)
        top = norms.max()
        alpha = torch.where(norms > 0, top / norms.clamp_min(torch.finfo(J.dtype).tiny),
                            torch.zeros_like(norms))
        self.k, self.m = k, m
        self.weights = None
        self.diagnostics = {"alpha": alpha, "beta_k": torch.tensor(beta_k)}
        return alpha @ m

    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"m": ((0,), 0.0)}

    # State -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "m": None if self.m is None else self.m.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"k", "m"}
        if unknown:
            raise ValueError(f"DBMTL state has unknown keys {sorted(unknown)}; expected 'k', 'm'")
        m = state.get("m")
        if m is not None and (not isinstance(m, Tensor) or m.dim() != 2):
            raise ValueError(f"DBMTL state: 'm' must be a [T, D] tensor or None, got "
                             f"{getattr(m, 'shape', type(m).__name__)}")
        self.k = int(state.get("k", 0))
        self.m = None if m is None else m.detach().clone()

    def reset(self) -> None:
        self.k = 0
        self.m = None

    def __repr__(self) -> str:
        return (f"DBMTL(beta={self.beta}, beta_sigma={self.beta_sigma}, eps={self.eps}, "
                f"validate={self.validate})")
