"""PCD, priority-constrained descent (Varam and AlHajri, *Not All Objectives Are Born Equal:
Priority-Constrained Descent for Hierarchical Multi-Objective Optimization*, TMLR 2026,
arXiv:2606.29521).

Task 0 (the first row of ``J``) is the primary objective, the others are secondary.  With the
scale-normalised gradients ``g~_i = s_i g_i``, PCD follows the primary gradient as closely as it
can while giving every secondary objective at least the fraction ``tau`` of the first-order
progress a step along its own normalised gradient would give:

    d~ = argmin_d  1/2 ||d - g~_1||^2   s.t.   g~_j^T d >= tau_j ||g~_j||^2,   j = 2..T.

It is the Euclidean projection of ``g~_1`` onto a polyhedron; by its KKT conditions
``d~ = g~_1 + sum_j mu_j g~_j`` with multipliers ``mu_j >= 0`` (zero where a constraint is
slack), the primary's coefficient pinned to 1.  For ``T = 2`` the closed form is
``d~ = g~_1 + max(0, tau - g~_2^T g~_1 / ||g~_2||^2) g~_2``.

Scales: ``s_i = 1 / sqrt(v^_i + eps)`` with ``v^_i`` the bias-corrected exponential moving
average of ``||g_i||^2`` over the calls (decay ``beta``): ``v_i <- beta v_i + (1 - beta)
||g_i||^2``, ``v^_i = v_i / (1 - beta^k_i)`` after ``k_i`` updates, so ``||g~_i|| ~ 1`` and
``tau`` is a scale-free fraction: multiplying a secondary row by the same constant at every call
leaves the result unchanged (up to ``eps``).  The output is ``d~`` rescaled to the norm of the
raw primary gradient, ``d = ||g_1|| d~ / ||d~||`` (so ``d = g_1`` when no constraint is active).

From the Gramian.  With ``G~ = S G S`` (``S = diag(s)``) the multipliers come from Lawson and
Hanson's least-distance reduction to a non-negative least-squares problem in Gram form
(:func:`pcd_multipliers`, the library's exact active-set solver, float64 on the CPU: one host
synchronisation per call), which also tells infeasible constraints apart; the weights of the
rows of ``J`` are
``w = [1, mu] o s ||g_1|| / sqrt(w~^T G~ w~)``: a :class:`WeightedAggregator` with
``gramian_only``.

Defaults ``tau = 0.02``, ``beta = 0.999``, ``eps = 1e-8`` (TorchJD 0.18's, whose ``PCD`` cites
the same paper).  Special cases, as TorchJD documents them:

* ``g_1 = 0``: ``d = 0``.
* Infeasible constraints (only for ``T >= 3``, e.g. two exactly opposite secondary gradients with
  ``tau > 0``; found as a zero residual of the least-distance problem,
  ``||r||^2 <= 1e-9 (1 + |h|^T u)``, see :func:`pcd_multipliers`): they are dropped and
  ``d = g_1``; ``diagnostics["feasible"]`` is then 0.
* A non-finite ``G`` (a call with ``check_finite=False``): NaN weights, the averages untouched.
* ``d~ = 0`` up to the rounding of ``G`` (``||d~||^2 <= 10 eps (sum_i |w~_i| ||g~_i||)^2``):
  ``d = 0``.

Not symmetric in the tasks (the first is the primary): invariant under permutations of the
secondary tasks only.  State: each task's moving average and its count of updates
(:meth:`state_dict`); an absent task's are left as they are.  With ``present=``, the call runs
on the present tasks as if they were all the tasks: when task 0 is absent, the first present
task is the primary of that call (a per-task ``tau`` then drops that task's entry).
TorchJD keeps one count for all tasks and starts over when the number of rows changes; here a
change without ``present=`` is an error (call :meth:`reset`).

Scale: ``||d|| = ||g_1||`` (``g`` on equal rows ``g``) with weights that do not sum to 1 once a
constraint is active: ``"unnormalised"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._solvers import nnqp

__all__ = ["PCD", "pcd_multipliers"]

# ||r||^2 of the least-distance problem (in [0, 1]) at most this times 1 + |h|^T u (the scale
# of its rounding, and of the solver's tolerance): no feasible point.
INFEASIBLE_TOL = 1e-9


def pcd_multipliers(G: Tensor, taus: Tensor) -> tuple[Tensor, bool]:
    """The multipliers ``mu >= 0`` of ``argmin_d 1/2 ||d - g_1||^2`` subject to
    ``g_j^T d >= tau_j ||g_j||^2`` (``j >= 2``), ``d = g_1 + sum_j mu_j g_j``, from the Gramian
    ``G`` of ``g_1, ..., g_T`` (float64, ``[T, T]``, ``G_11 > 0``), and whether the constraints
    are feasible (``mu = 0`` where they are not).

    Lawson and Hanson's least-distance reduction (*Solving Least Squares Problems*, 1974,
    ch. 23): with ``x = d - g_1``, ``A`` the rows ``g_j`` and ``h = tau o diag(G_ss) - G_s1``,
    the problem is ``min ||x||`` s.t. ``A x >= h``; the non-negative least-squares problem
    ``u = argmin_{u >= 0} ||[A^T; h^T] u - e_{n+1}||^2`` (Gram form ``Q = G_ss + h h^T``,
    ``c = -h``: the library's :func:`~torch_mtlgrad.aggregators._solvers.nnqp`) has residual
    ``||r||^2 = 1 - h^T u``; it is 0 exactly when no ``x`` is feasible, else
    ``x = A^T u / (1 - h^T u)``: ``mu = u / (1 - h^T u)``.  Unlike the plain dual
    (``min_{mu >= 0} 1/2 mu^T G_ss mu - mu^T h``), which is unbounded for infeasible
    constraints and whose linear term need not lie in the range of a singular ``G_ss`` (more
    secondary tasks than dimensions), this problem is always bounded and consistent.  It is
    solved on ``G / max_i G_ii`` (``mu`` does not change when every row is scaled alike).

    Example:
        >>> G = torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
        >>> pcd_multipliers(G, torch.tensor([0.5], dtype=torch.float64))  # g_2 . d = 0.5 * 2
        (tensor([1.], dtype=torch.float64), True)
    """
    Gh = G / torch.diagonal(G).max()
    Gs = Gh[1:, 1:]
    h = taus * torch.diagonal(Gs) - Gh[1:, 0]
    Q = (Gs + h[:, None] * h[None, :]).numpy()
    u = torch.from_numpy(nnqp(0.5 * (Q + Q.T), -h.numpy()))
    res = 1.0 - float(h @ u)
    if res <= INFEASIBLE_TOL * (1.0 + float(h.abs() @ u)):
        return torch.zeros_like(h), False
    return u / res, True


class PCD(WeightedAggregator):
    """Priority-constrained descent (Varam and AlHajri, TMLR 2026): the projection of the
    normalised primary gradient (row 0) onto ``{d : g~_j^T d >= tau_j ||g~_j||^2}``, rescaled to
    ``||g_1||``.

    Args:
        tau: the guaranteed fraction ``tau`` in ``[0, 1]`` of normalised progress for each
            secondary task: one number, or one per secondary task (``T - 1`` values). Default
            0.02.
        beta: the decay in ``[0, 1)`` of the moving average of the squared norms (default
            0.999).
        eps: the non-negative constant added to that average before the inverse square root
            (default 1e-8).

    Computed from ``G = J J^T`` only.  ``diagnostics``: ``"mu"`` (``[T]``: the multipliers
    ``mu_j``, 0 at the primary, whose coefficient is 1), ``"scales"`` (``s``), ``"feasible"``
    (1 or 0).

    Example:
        >>> import torch
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> agg = PCD(tau=0.5)
        >>> agg(J)   # d~ = g~_1 + 0.5 g~_2 = (1, 0.5), rescaled to ||g_1|| = 2
        tensor([1.7889, 0.8944])
        >>> agg.diagnostics["mu"]
        tensor([0.0000, 0.5000])
    """

    gramian_only = True
    stateful = True
    paper = ("Varam & AlHajri, *Not All Objectives Are Born Equal: Priority-Constrained Descent "
             "for Hierarchical Multi-Objective Optimization*, TMLR 2026")
    summary = ("the normalised primary gradient (task 0) projected so that each secondary task "
               "gets a fraction tau of its own progress, rescaled to the primary's norm")

    def __init__(self, tau: float | Sequence[float] | Tensor = 0.02, beta: float = 0.999,
                 eps: float = 1e-8) -> None:
        super().__init__()
        if isinstance(tau, (int, float)) and not isinstance(tau, bool):
            if not 0.0 <= tau <= 1.0:
                raise ValueError(f"tau must be in [0, 1], got {tau!r}")
            self.tau: float | None = float(tau)
            self._tau_all: Tensor | None = None
        else:
            t = torch.as_tensor(tau, dtype=torch.float64).detach().cpu()
            if t.dim() != 1 or not bool(((t >= 0) & (t <= 1)).all()):
                raise ValueError("tau must be a number in [0, 1] or a 1-D sequence of them (one "
                                 f"per secondary task, T - 1 values), got {tau!r}")
            self.tau = None
            # One entry per task; the primary's (NaN) is never read.
            self._tau_all = torch.cat([t.new_full((1,), float("nan")), t])
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0.0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.sq_norm_ema: Tensor | None = None  # [T] float64, CPU
        self.task_steps: Tensor | None = None  # [T] int64, CPU: updates of each task's average

    # Absent tasks ----------------------------------------------------------------------------
    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"sq_norm_ema": ((0,), 0.0), "task_steps": ((0,), 0.0)}

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        return {"_tau_all": (0,)}

    # The method ------------------------------------------------------------------------------
    def _taus(self, T: int) -> Tensor:
        if self._tau_all is None:
            return torch.full((T - 1,), self.tau, dtype=torch.float64)
        if self._tau_all.shape[0] != T:
            raise ValueError(f"PCD has {self._tau_all.shape[0] - 1} values of tau (one per "
                             f"secondary task) but J has {T} rows ({T - 1} secondary tasks): "
                             f"pass {T - 1} values, or one number")
        return self._tau_all[1:]

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        T = num_tasks
        if self.sq_norm_ema is not None and self.sq_norm_ema.shape[0] != T:
            raise ValueError(
                f"PCD tracks the gradient norms of {self.sq_norm_ema.shape[0]} tasks, got {T} "
                "rows: pass present= for a step with fewer tasks, or call reset() to start over")
        taus = self._taus(T)
        G64 = G.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(G64).all()):  # unchecked call: NaN out, the averages kept
            nan = torch.full((T,), float("nan"), dtype=dtype, device=device)
            self.diagnostics = {"mu": nan, "scales": nan,
                                "feasible": torch.tensor(float("nan"), dtype=dtype, device=device)}
            return nan
        G64 = 0.5 * (G64 + G64.T)
        sq = torch.diagonal(G64).clamp_min(0.0)
        ema = torch.zeros(T, dtype=torch.float64) if self.sq_norm_ema is None else self.sq_norm_ema
        steps = (torch.zeros(T, dtype=torch.int64) if self.task_steps is None
                 else self.task_steps)
        ema = self.beta * ema + (1.0 - self.beta) * sq
        steps = steps + 1
        vhat = ema / (1.0 - self.beta ** steps.to(torch.float64))
        root = (vhat + self.eps).sqrt()
        s = torch.where(root > 0, 1.0 / torch.where(root > 0, root, torch.ones_like(root)),
                        torch.zeros_like(root))  # always-zero gradient, eps = 0: scale 0
        self.sq_norm_ema, self.task_steps = ema, steps

        Gn = G64 * s[:, None] * s[None, :]
        mu, feasible = torch.zeros(T - 1, dtype=torch.float64), True
        if T > 1 and float(sq[0]) > 0.0:
            mu, feasible = pcd_multipliers(Gn, taus)
        wt = torch.cat([torch.ones(1, dtype=torch.float64), mu])
        w = torch.zeros(T, dtype=torch.float64)
        if float(sq[0]) > 0.0:
            dsq = wt @ Gn @ wt
            magnitude = (wt.abs() @ torch.diagonal(Gn).sqrt()) ** 2
            precision = 10.0 * torch.finfo(G.dtype).eps
            if float(dsq) > precision * float(magnitude):
                w = wt * s * (sq[0] / dsq).sqrt()
        mu_all = torch.cat([mu.new_zeros(1), mu])
        self.diagnostics = {"mu": mu_all.to(device=device, dtype=dtype),
                            "scales": s.to(device=device, dtype=dtype),
                            "feasible": torch.tensor(float(feasible), dtype=dtype, device=device)}
        return w.to(device=device, dtype=dtype)

    # State -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"sq_norm_ema": None if self.sq_norm_ema is None else self.sq_norm_ema.clone(),
                "task_steps": None if self.task_steps is None else self.task_steps.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"sq_norm_ema", "task_steps"}
        if unknown:
            raise ValueError(f"PCD state has unknown keys {sorted(unknown)}; expected "
                             "'sq_norm_ema' and 'task_steps'")
        ema, steps = state.get("sq_norm_ema"), state.get("task_steps")
        if (ema is None) != (steps is None):
            raise ValueError("PCD state must hold both 'sq_norm_ema' and 'task_steps' or neither")
        if ema is not None:
            if not (isinstance(ema, Tensor) and isinstance(steps, Tensor) and ema.dim() == 1
                    and steps.shape == ema.shape):
                raise ValueError("PCD state: 'sq_norm_ema' and 'task_steps' must be 1-D tensors "
                                 "of one entry per task")
            if self._tau_all is not None and ema.shape[0] != self._tau_all.shape[0]:
                raise ValueError(f"PCD state is for {ema.shape[0]} tasks but tau has "
                                 f"{self._tau_all.shape[0] - 1} values (one per secondary task)")
            ema = ema.detach().to(device="cpu", dtype=torch.float64).clone()
            steps = steps.detach().to(device="cpu", dtype=torch.int64).clone()
        self.sq_norm_ema, self.task_steps = ema, steps

    def reset(self) -> None:
        self.sq_norm_ema = None
        self.task_steps = None

    def __repr__(self) -> str:
        tau = self.tau if self._tau_all is None else self._tau_all[1:].tolist()
        return f"PCD(tau={tau}, beta={self.beta}, eps={self.eps})"
