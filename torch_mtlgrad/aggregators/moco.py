"""MoCo: multi-objective gradient with correction (Fernando et al., ICLR 2023).

Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, *Mitigating Gradient Bias in Multi-objective
Learning: A Provably Convergent Approach*, ICLR 2023 (arXiv:2210.12624), Algorithm 1.

MGDA's weights computed from stochastic gradients are biased; MoCo tracks each task's gradient
with a variable ``y_m`` and moves the weights ``lambda`` by one projected-gradient step per
iteration instead of solving the min-norm problem.  At call ``k = 1, 2, ...`` with the task
gradients ``h_{k,m}`` (the rows of ``J``):

    y_{k+1,m}   = Pi_{L_m}( y_{k,m} - beta_k (y_{k,m} - h_{k,m}) )          (tracking)
    lambda_{k+1} = Pi_simplex( lambda_k - gamma_k (Y Y^T + rho I) lambda_k ),  Y = Y_{k+1}
    d           = lambda_{k+1}^T Y_{k+1}        (the update x_{k+1} = x_k - alpha_k d)

(the paper writes ``Y`` as the ``D x M`` matrix with columns ``y_m``; ours is its transpose,
``[T, D]``).  ``Pi_{L_m}`` is the projection onto the ball of radius ``L_m`` (the paper's bound
on the gradients); ``bound=None`` (default) leaves it out.

Step sizes ``beta_k = beta / k**beta_sigma`` and ``gamma_k = gamma / k**gamma_sigma``.
Defaults: ``beta = 0.9, beta_sigma = 0`` (a constant tracking step), ``gamma = 0.1,
gamma_sigma = 0.5, rho = 0`` (``rho`` is the paper's regulariser).  Initial state: ``y_0 = 0``
and ``lambda_0 = 1/T`` (as in LibMTL).

Why a constant tracking step.  The paper's analysis is two-time-scale: its step sizes are
constant over the run (set from the horizon) with the model's step ``alpha`` small against the
tracking step ``beta``, so that ``y`` follows the gradients faster than the parameters move.  The
former defaults, LibMTL's ``beta = 0.5, beta_sigma = 0.5`` (``beta_k = 0.5 / sqrt(k)``), break that
under a constant learning rate: at step ``k``, ``y`` averages about the last ``1 / beta_k =
2 sqrt(k)`` gradients (``beta_k = 0.022`` at step 500, a window of about 45 steps), gradients of parameters
that have since moved, and the stale direction trains badly.  On a 3-task digits MLP
(``benchmarks/moco_digits.py``, SGD with momentum, 10 epochs, mean of 3 seeds) the former
defaults reach test accuracies of 0.76 / 0.88 / 0.90 against 0.96 / 0.99 / 0.97 for the plain
sum and 0.94 / 0.95 / 0.97 for MGDA; the constant ``beta = 0.9`` reaches 0.96 / 0.99 / 0.97.  The former schedule stays available:
``MoCo(beta=0.5, beta_sigma=0.5)``.

``normalize="loss"`` replaces each ``h_m`` by ``L_m h_m / ||h_m||`` (zero rows stay zero), the
gradient normalisation LibMTL always applies; ``"none"`` (default) is Algorithm 1 as printed.
With LibMTL's decaying schedule it helps (0.94 / 0.97 / 0.96 on the benchmark), less than the
constant step does; with the constant step it hurts in a trial run (the step then scales with
the losses, which shrink), so it is not the default; LibMTL's setting in full is ``MoCo(beta=0.5, beta_sigma=0.5, normalize="loss")``.
LibMTL also replaces the simplex projection by a softmax; this class keeps the paper's
projection.

The direction is a combination of the tracked ``y``, not of the current rows, so ``weights`` is
``None``; ``diagnostics["lambda"]`` holds ``lambda_{k+1}``.  It needs ``J`` itself (the state
``y`` is ``[T, D]``: T times the memory of one gradient).  Everything stays on ``J``'s device;
no host synchronisation.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ._base import Aggregator
from ._simplex import SimplexState
from ._solvers import project_simplex

__all__ = ["MoCo"]

Normalize = Literal["none", "loss"]


class MoCo(SimplexState, Aggregator):
    """MoCo (Fernando et al., 2023, Algorithm 1): tracked gradients ``y`` and weights ``lambda``.

    Args:
        beta: tracking step size scale, ``beta_k = beta / k**beta_sigma`` (default 0.9; the
            former default, LibMTL's, was 0.5).
        beta_sigma: decay exponent of ``beta_k`` (default 0: constant; formerly 0.5).
        gamma: weight step size scale, ``gamma_k = gamma / k**gamma_sigma`` (default 0.1).
        gamma_sigma: decay exponent of ``gamma_k`` (default 0.5).
        rho: the regulariser ``rho`` of the ``lambda`` update (default 0).
        normalize: ``"none"`` (Algorithm 1) or ``"loss"`` (rows scaled to ``L_m h_m / ||h_m||``,
            needs the losses).
        bound: radius ``L`` of the ball each ``y_m`` is projected onto; ``None`` for no projection.

    Absent tasks: an absent task's tracked ``y_m`` and its ``lambda_m`` do not move.  The call
    runs on the present tasks' ``y`` and on their ``lambda`` renormalised to sum 1 (uniform if
    it is all 0); the new ``lambda`` of the present tasks is scaled back to the share of the
    simplex they held, so the full ``lambda`` stays on the simplex.  A task first present later
    starts from ``y_m = 0`` and its share ``1/T`` of the initial ``lambda``; the step counter
    ``k`` advances on every call.

    Example:
        >>> import torch
        >>> agg = MoCo()
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> agg(J)   # y_1 = 0.9 J (beta_1 = 0.9); lambda moves from (1/2, 1/2)
        tensor([0.5047, 0.7906])
        >>> agg.diagnostics["lambda"]   # the larger gradient gets less weight, as in MGDA
        tensor([0.5608, 0.4392])
    """

    paper = ("Fernando et al., *Mitigating Gradient Bias in Multi-objective Learning: A Provably "
             "Convergent Approach*, ICLR 2023")
    summary = "MoCo: tracked gradient estimates with a corrected min-norm weighting"

    stateful = True

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0, normalize: Normalize = "none",
                 bound: float | None = None) -> None:
        super().__init__()
        for name, v in (("beta", beta), ("gamma", gamma)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name, v in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if normalize not in ("none", "loss"):
            raise ValueError(f"normalize must be 'none' or 'loss', got {normalize!r}")
        if bound is not None and not (isinstance(bound, (int, float)) and bound > 0):
            raise ValueError(f"bound must be a positive number or None, got {bound!r}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.gamma = float(gamma)
        self.gamma_sigma = float(gamma_sigma)
        self.rho = float(rho)
        self.normalize: Normalize = normalize
        self.bound = None if bound is None else float(bound)
        self.k = 0
        self.y: Tensor | None = None  # [T, D]
        self.lam: Tensor | None = None  # [T]

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return self.normalize == "loss"

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        T, D = J.shape
        if self.y is not None and tuple(self.y.shape) != (T, D):
            raise ValueError(
                f"MoCo was tracking a [{self.y.shape[0]}, {self.y.shape[1]}] Jacobian, got "
                f"[{T}, {D}]; call reset() to start over")
        h = J
        if self.normalize == "loss":
            if losses is None:
                raise ValueError("MoCo(normalize='loss') needs the loss values: agg(J, losses)")
            norms = J.norm(dim=1)
            scale = torch.where(norms > 0, losses / norms.clamp_min(torch.finfo(J.dtype).tiny),
                                torch.zeros_like(norms))
            h = J * scale[:, None]
        y = torch.zeros_like(J) if self.y is None else self.y.to(device=J.device, dtype=J.dtype)
        lam = (J.new_full((T,), 1.0 / T) if self.lam is None
               else self.lam.to(device=J.device, dtype=J.dtype))
        k = self.k + 1
        beta_k = self.beta / k ** self.beta_sigma
        gamma_k = self.gamma / k ** self.gamma_sigma
        y = y - beta_k * (y - h)
        if self.bound is not None:
            ny = y.norm(dim=1, keepdim=True)
            tiny = torch.finfo(J.dtype).tiny
            y = y * torch.where(ny > self.bound, self.bound / ny.clamp_min(tiny),
                                torch.ones_like(ny))
        Gy = y @ y.T
        lam = project_simplex(lam - gamma_k * (Gy @ lam + self.rho * lam))
        self.k, self.y, self.lam = k, y, lam
        self.weights = None
        self.diagnostics = {"lambda": lam, "beta_k": torch.tensor(beta_k),
                            "gamma_k": torch.tensor(gamma_k)}
        return lam @ y

    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"y": ((0,), 0.0)}

    # State -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "y": None if self.y is None else self.y.clone(),
            "lambda": None if self.lam is None else self.lam.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"k", "y", "lambda"}
        if unknown:
            raise ValueError(f"MoCo state has unknown keys {sorted(unknown)}")
        y, lam = state.get("y"), state.get("lambda")
        if (y is None) != (lam is None):
            raise ValueError("MoCo state must hold both 'y' and 'lambda' or neither")
        if y is not None and (y.dim() != 2 or lam.dim() != 1 or lam.shape[0] != y.shape[0]):
            raise ValueError(
                f"MoCo state: 'y' must be [T, D] and 'lambda' [T], got {tuple(y.shape)} and "
                f"{tuple(lam.shape)}")
        self.k = int(state.get("k", 0))
        self.y = None if y is None else y.detach().clone()
        self.lam = None if lam is None else lam.detach().clone()

    def reset(self) -> None:
        self.k = 0
        self.y = None
        self.lam = None

    def __repr__(self) -> str:
        return (f"MoCo(beta={self.beta}, beta_sigma={self.beta_sigma}, gamma={self.gamma}, "
                f"gamma_sigma={self.gamma_sigma}, rho={self.rho}, normalize={self.normalize!r})")
