"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao et al., NeurIPS
2023).

Xiao, Ban, Ji, *Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
Algorithms*, NeurIPS 2023 (arXiv:2305.18409).

SDMGrad looks for the direction that improves the worst task most while staying near a
preferred direction ``g_0`` (here the mean gradient, the paper's experiments' choice,
``w_tilde = 1/T``).  Its dual is a regularised min-norm problem over the simplex,

    min_{w in simplex}  1/2 || J^T w + lambda g_0 ||^2,       g_0 = J^T w_tilde,

and the direction is ``d = (J^T w + lambda g_0) / (1 + lambda)``, i.e. the task weights
``(w + lambda w_tilde) / (1 + lambda)`` (non-negative, summing to 1: scale convention
``"convex"``).  ``lambda -> 0`` gives MGDA's min-norm direction, ``lambda -> inf`` the mean.

The paper solves the inner problem by projected stochastic gradient steps on ``w``, whose
gradient ``G (w + lambda w_tilde)`` it estimates without bias by double sampling: ``G = J_xi
J_xi'^T`` from two independent mini-batches, and the direction from a third one, ``J_zeta``.  The
double sampling is the user's batches: this class takes one ``J`` and uses ``G = J J^T`` (pass
``aggregate_gramian(J_1 @ J_2.T)`` for the paper's estimate; the matrix need not be symmetric).

Each call runs ``niter`` (default 20) steps of the authors' solver on the scale-normalised
``A = G / s^2``, ``s = mean_i sqrt(max(G_ii, 0))`` (the paper's Sec. 6.1 normalisation, which
makes the step size independent of the gradients' scale; ``A = 0``, so that ``w`` stays, when no
``G_ii`` is positive, e.g. every row 0):

    v_k = A (w_k + lambda w_tilde) + momentum v_{k-1}    (v_1 without the momentum term)
    w_{k+1} = Pi_simplex(w_k - lr v_k)

(SGD with heavy-ball momentum as PyTorch writes it, the velocity reset at every call), and
``w`` is kept from call to call as the next call's start (``w_0 = 1/T``).  Defaults: the
authors' code and TorchJD's, ``lr = 10``, ``momentum = 0.5``, ``niter = 20``, ``lmbd = 0.3``
(the value of the authors' experiments and of LibMTL; their class default is 0.6).

The step size.  Heavy-ball steps converge to the inner problem's minimiser when
``lr < 2 (1 + momentum) / lambda_max(A)``; ``A``'s diagonal averages about 1, so
``lambda_max(A)`` is between about 1 and ``T``, and the authors' ``lr = 10`` is far beyond that
bound: each step jumps across the simplex and the iterates settle on a point that is not the
minimiser (on ``J = diag(1, 2)``, ``w = (0.034, 0.966)`` against the minimiser ``(0.89, 0.11)``,
which puts more weight on the smaller gradient, as MGDA does).  The default keeps the authors'
value, the one their results and the peer libraries use; ``lr = 0.5`` (stable for up to about 6
tasks of similar norms) solves the paper's inner problem, to which the tests compare it.

Conventions, against the peers (all checked in the tests):

* TorchJD 0.18 (``SDMGradWeighting``, stateful too) divides by ``s^2 + 1e-8`` and the authors'
  code by ``mean_i sqrt(G_ii + 1e-4)`` squared, so their steps shrink for small gradients; this
  class divides by ``s^2`` exactly, so its weights do not depend on the gradients' scale (ours
  at ``lr`` equals TorchJD at ``lr (s^2 + 1e-8) / s^2``).
* LibMTL uses ``lr = 5``: ``SDMGrad(lr=5)``.
* The authors' code multiplies the direction by ``T`` ("to match the sum loss"): that is
  ``"sdmgrad*T"``.

Everything stays on ``G``'s device: no host synchronisation.  ``diagnostics["w"]`` holds the
inner weights ``w`` (before the mixing with ``w_tilde``).

Absent tasks: the call runs on the present tasks' ``w`` renormalised to sum 1 (uniform when they
hold none of it), and writes their new ``w`` back scaled to the share of the simplex they held,
so the kept ``w`` stays on the simplex; an absent task's ``w`` does not move, and a task first
present later starts from its share ``1/T`` of the initial ``w``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._shares import present_share
from ._solvers import project_simplex

__all__ = ["SDMGrad"]


class SDMGrad(WeightedAggregator):
    """SDMGrad (Xiao et al., 2023): projected heavy-ball steps on the regularised min-norm problem.

    Args:
        lmbd: the pull ``lambda >= 0`` toward the mean gradient (default 0.3).
        niter: projected-gradient steps per call (default 20).
        lr: their step size on the normalised Gramian (default 10).
        momentum: heavy-ball momentum in ``[0, 1)`` (default 0.5).

    Computed from ``G = J J^T`` only; stateful (the inner weights ``w``, the next call's start).
    ``weights`` are ``(w + lmbd / T) / (1 + lmbd)``.  See the module docstring.

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> agg = SDMGrad(lr=0.5, niter=100)   # a stable step: w solves the inner problem
        >>> agg(J)                      # the larger gradient gets less weight, as in MGDA
        tensor([0.8000, 0.4000])
        >>> agg.diagnostics["w"], agg.weights, agg.weights.sum()
        (tensor([0.8900, 0.1100]), tensor([0.8000, 0.2000]), tensor(1.))
        >>> SDMGrad()(J)                # the authors' lr = 10: far from it (module docstring)
        tensor([0.1417, 1.7166])
    """

    gramian_only = True
    stateful = True
    paper = ("Xiao, Ban & Ji, *Direction-oriented Multi-objective Learning: Simple and Provable "
             "Stochastic Algorithms*, NeurIPS 2023")
    summary = ("projected heavy-ball steps on the min-norm problem regularised toward the mean "
               "gradient (lmbd), warm-started across steps")

    def __init__(self, lmbd: float = 0.3, niter: int = 20, lr: float = 10.0,
                 momentum: float = 0.5) -> None:
        super().__init__()
        if isinstance(lmbd, bool) or not isinstance(lmbd, (int, float)) \
                or not (math.isfinite(lmbd) and lmbd >= 0):
            raise ValueError(f"lmbd must be a finite number >= 0 (the pull toward the mean "
                             f"gradient, e.g. 0.3), got {lmbd!r}")
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 1:
            raise ValueError(f"niter must be a positive int (e.g. 20), got {niter!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) \
                or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number (e.g. 10), got {lr!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1) (e.g. 0.5), got {momentum!r}")
        self.lmbd = float(lmbd)
        self.niter = niter
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.w: Tensor | None = None  # [T], on the simplex

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        T = num_tasks
        if self.w is not None and self.w.shape[0] != T:
            raise ValueError(f"SDMGrad was solving for {self.w.shape[0]} tasks, got {T}; call "
                             "reset() to start over")
        w, mass = present_share(self.w, T, self._subset_total or T, G)
        uniform = G.new_full((T,), 1.0 / T)
        s2 = torch.diagonal(G).clamp_min(0).sqrt().mean() ** 2
        A = torch.where(s2 > 0, G / torch.where(s2 > 0, s2, 1.0), 0.0)  # 0: no positive G_ii
        pull = self.lmbd * uniform
        v: Tensor | None = None
        for _ in range(self.niter):
            grad = A @ (w + pull)
            v = grad if v is None else self.momentum * v + grad
            w = project_simplex(w - self.lr * v)
        self.w = w * mass
        self.diagnostics = {"w": w}
        return (w + pull) / (1.0 + self.lmbd)

    # State -----------------------------------------------------------------------------------
    def _task_state(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {"w": ((0,), lambda: 1.0 / (self._subset_total or 1))}

    def state_dict(self) -> dict[str, Any]:
        return {"w": None if self.w is None else self.w.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"w"}
        if unknown:
            raise ValueError(f"SDMGrad state has unknown keys {sorted(unknown)} (expected 'w')")
        w = state.get("w")
        if w is not None and not (isinstance(w, Tensor) and w.dim() == 1 and w.is_floating_point()):
            raise ValueError(f"SDMGrad state: 'w' must be a 1-D float tensor [T] or None, got "
                             f"{type(w).__name__ if not isinstance(w, Tensor) else tuple(w.shape)}")
        self.w = None if w is None else w.detach().clone()

    def reset(self) -> None:
        self.w = None

    def __repr__(self) -> str:
        return (f"SDMGrad(lmbd={self.lmbd}, niter={self.niter}, lr={self.lr}, "
                f"momentum={self.momentum})")
