"""FairGrad: alpha-fair resource allocation among the tasks (Ban and Ji, ICML 2024).

Ban, Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024 (arXiv:2402.15638).

The update ``d`` is a shared resource and task ``i``'s utility is its first-order improvement
``u_i = g_i . d``.  FairGrad maximises the alpha-fair utility over a ball of updates,
``max_d sum_i u_i^(1 - alpha) / (1 - alpha)`` (``sum_i log u_i`` at ``alpha = 1``), and shows
(its eq. 4) that the maximiser is ``d = sum_i w_i g_i`` with weights ``w > 0`` solving

    G w = w^(-1/alpha)          (element-wise power; G = J J^T, the paper's G^T G)

i.e. ``g_i . d = w_i^(-1/alpha)`` for every task.  ``alpha`` sets the kind of fairness:
``alpha -> 0`` tends to linear scalarisation (``w -> 1``, the sum of the gradients),
``alpha = 1`` is proportional fairness (the equation of Nash-MTL, Navon et al. 2022),
``alpha -> inf`` tends to max-min fairness (``G w = 1``).  Default ``alpha = 1.0``, the authors'
default (their code and LibMTL's); TorchJD has no default.

How the weights are computed (all from ``G``, never ``J``; float64 on the CPU, one host
synchronisation per call):

* **A convex problem.**  With ``p = 1/alpha`` and ``psi(x) = x^(1 - p) / (1 - p)`` (``log x`` at
  ``p = 1``), the equation is the stationarity condition of the strictly convex
  ``F(w) = 1/2 w^T G w - sum_i psi(w_i)`` on ``w > 0``, so its solution is unique when it exists.
  The authors solve the equation by least squares (SciPy's ``least_squares`` from
  ``w = 1/T`` with the bound ``w >= 0``); this class minimises ``F`` by Newton's method (Hessian
  ``G + p diag(w^(-p-1))``, positive definite on ``w > 0``), started from the solution for
  orthogonal gradients ``w_i = G_ii^(-alpha / (1 + alpha))``, each step shortened to stay positive
  and to lower ``F`` (or the residual below), at most ``max_iter`` (default 100) steps.
* **No solution.**  ``F`` is bounded below, and the equation solvable, exactly when no
  non-negative combination of the non-zero gradients is 0 (``v >= 0, v != 0, v^T J = 0``:
  Pareto-stationary gradients, e.g. two opposite ones), since ``g_i . d = w_i^(-p) > 0`` would
  have to hold for every task.  This is checked first, by Gordan's theorem, with Nash-MTL's test
  (the same equation at ``alpha = 1``): the min-norm point of the unit gradients' hull is 0 to the
  precision of ``G`` (squared norm at most ``1e-14`` for a float64 ``G``, ``8 eps`` of its dtype
  otherwise); there the call raises :class:`FairGradSolveError` saying so.
* **Checked.**  The weights are returned only when every task satisfies the equation to ``tol``
  (default ``1e-9``) relative to its utility: ``|(G w)_i - w_i^(-p)| <= tol w_i^(-p)``.  (Where
  the terms of ``(G w)_i`` cancel to far below ``w_i^(-p)``, nearly Pareto-stationary gradients,
  float64 cannot resolve it and the call raises.)  ``diagnostics["residual"]``
  holds the largest ``|(G w)_i - w_i^(-p)| / w_i^(-p)`` and ``diagnostics["iterations"]`` the
  Newton steps (the iterations go on to ``1e-3 tol`` or the rounding level of ``G w``, so the
  answer is accurate to rounding, not just to ``tol``).  Otherwise the call raises :class:`FairGradSolveError`: it never returns other
  weights (e.g. equal ones).  SciPy's least-squares answer, which the authors use as it comes,
  is often accurate to ``1e-8`` only, and far off for large ``alpha`` (e.g. ``alpha = 5``) or
  tasks of very different scales.
* **Zero rows** (``G_ii = 0``) have no positive utility to share: their equation cannot hold for
  any finite weight, and their weight does not change ``d``.  They get weight 0 and the others
  solve the equation among themselves; all rows zero gives ``d = 0``.
* ``alpha = 0`` is the limit ``w = 1`` (the sum of the gradients; TorchJD returns ``1/T`` there:
  ours is ``T`` times theirs).

Properties: every task improves, ``g_i . d = w_i^(-p) > 0`` (the direction
is non-conflicting); the weights do not depend on the order of the tasks; rescaling ``J`` by
``c > 0`` rescales ``w`` by ``c^(-2 alpha / (1 + alpha))`` and ``d`` by
``c^((1 - alpha) / (1 + alpha))`` (scale-free at ``alpha = 1``, where ``||d||^2 = T``).  The scale
convention is therefore ``"unnormalised"``: on ``T`` equal rows ``g``, ``w_i = (T ||g||^2)^(-alpha
/ (1 + alpha))``.

Compared with TorchJD 0.18's ``FairGrad`` (after the authors' code: least squares from ``1/T``):
the same weights wherever both solve (to the accuracy of SciPy's answer); TorchJD returns its
least-squares answer even where the equation has no solution.  The authors' training script also
clips the gradient norm (``max_norm``); that is the training loop's business, not the weighting's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ._base import WeightedAggregator
from .nashmtl import NashMTL

__all__ = ["FairGrad", "FairGradSolveError", "fairgrad_weights"]


class FairGradSolveError(RuntimeError):
    """No weights solve FairGrad's equation ``G w = w^(-1/alpha)`` to the stated tolerance."""


_EPS = float(np.finfo(np.float64).eps)


def _errors(G: np.ndarray, absG: np.ndarray, w: np.ndarray, p: float) -> tuple[np.ndarray, ...]:
    """Per task: the equation's error ``|(G w)_i - w_i^-p|``, the utility ``w_i^-p`` and the
    rounding level ``8 T eps (|G| w)_i`` of ``(G w)_i`` in float64."""
    rhs = w ** -p
    return np.abs(G @ w - rhs), rhs, 8 * G.shape[0] * _EPS * (absG @ w)


def _objective(G: np.ndarray, w: np.ndarray, p: float) -> float:
    psi = np.log(w) if p == 1.0 else w ** (1.0 - p) / (1.0 - p)
    return float(0.5 * w @ G @ w - psi.sum())


def _newton(G: np.ndarray, p: float, tol: float, max_iter: int) -> tuple[np.ndarray, bool, float,
                                                                          int]:
    """Newton's method on ``F``; returns the last iterate, whether it solves the equation to
    ``tol`` (relative to the utilities ``w_i^-p``), its largest relative error and the steps."""
    absG = np.abs(G)
    w = np.diag(G) ** (-1.0 / (1.0 + p))  # G_ii^(-alpha / (1 + alpha)): exact for orthogonal rows
    err, rhs, noise = _errors(G, absG, w, p)
    f = _objective(G, w, p)
    k = 0
    # Iterate until the error is far below tol (or stops falling): the answer is then accurate
    # to rounding, not just to tol.
    while k < max_iter and not np.all(err <= 1e-3 * tol * rhs + noise):
        k += 1
        grad = G @ w - rhs
        H = G + np.diag(p * w ** (-p - 1.0))
        s = 1.0 / np.sqrt(np.diag(H))  # Jacobi scaling: tasks of very different norms
        try:
            step = s * np.linalg.solve(H * s[:, None] * s[None, :], -grad * s)
        except np.linalg.LinAlgError:
            break
        neg = step < 0
        t = min(1.0, 0.99 * float(np.min(-w[neg] / step[neg]))) if neg.any() else 1.0
        slope = float(grad @ step)
        rel = float((err / rhs).max())
        for _ in range(60):
            w_new = w + t * step
            if np.all(w_new > 0) and np.all(np.isfinite(w_new)):
                f_new = _objective(G, w_new, p)
                new = _errors(G, absG, w_new, p)
                # Armijo on F, or (near the solution, where F's change is below its rounding)
                # a smaller largest relative error.
                if f_new <= f + 1e-4 * t * slope or float((new[0] / new[1]).max()) < rel:
                    break
            t *= 0.5
        else:
            break
        w, f = w_new, f_new
        err, rhs, noise = new
    ok = bool(np.all(np.isfinite(w)) and np.all(w > 0) and np.all(err <= tol * rhs))
    return w, ok, float((err / rhs).max()), k


def fairgrad_weights(G: Tensor, alpha: float = 1.0, *, tol: float = 1e-9, max_iter: int = 100,
                     task_index: Callable[[int], int] = int) -> tuple[Tensor, float, int]:
    """FairGrad's weights from ``G``: ``w > 0`` with ``G w = w^(-1/alpha)`` (0 for zero rows).

    Returns ``(w, relative error, iterations)`` (``w`` in ``G``'s dtype on its device).  Raises
    :class:`FairGradSolveError` when the non-zero rows are Pareto-stationary or the equation is
    not solved to ``tol`` (see the module docstring); the message names a task by
    ``task_index(row of G)``.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]])   # orthogonal: w_i = G_ii^(-1/2)
        >>> fairgrad_weights(G)[0]
        tensor([1.0000, 0.5000])
    """
    T = G.shape[0]
    G64 = G.detach().to(device="cpu", dtype=torch.float64).numpy()
    G64 = 0.5 * (G64 + G64.T)
    active = np.diag(G64) > 0
    rows = [task_index(int(r)) for r in np.flatnonzero(active)]
    w = np.zeros(T)
    rel, k = 0.0, 0
    if active.any() and alpha == 0:
        w[active] = 1.0
    elif active.any():
        Ga = G64[np.ix_(active, active)]
        n = np.sqrt(np.diag(Ga))
        C = Ga / n[:, None] / n[None, :]
        if len(rows) > 1 and NashMTL._stationary(C, NashMTL._stationary_tol(G.dtype)):
            raise FairGradSolveError(
                f"FairGrad(alpha={alpha}): no weights w > 0 solve G w = w^(-1/alpha): the "
                f"non-zero gradients (tasks {rows}) are Pareto-stationary (some non-negative "
                "combination of them is 0, e.g. two opposite gradients), so no update improves "
                "every task.  Skip this step, or use a method defined at such points (e.g. "
                "'mgda' or 'upgrad')")
        wa, ok, rel, k = _newton(Ga, 1.0 / alpha, tol, max_iter)
        if not ok:
            err, rhs, noise = _errors(Ga, np.abs(Ga), wa, 1.0 / alpha)
            worst = int(np.argmax(err / rhs))
            why = ("the terms of (G w)_i cancel so far that float64 cannot resolve its utility "
                   f"(rounding {noise[worst] / rhs[worst]:.3g} of it): nearly Pareto-stationary "
                   "gradients, or alpha far from 1 with tasks of very different scales"
                   if noise[worst] > tol * rhs[worst] else
                   "raising max_iter may help")
            raise FairGradSolveError(
                f"FairGrad(alpha={alpha}): Newton's method did not solve G w = w^(-1/alpha) to "
                f"tol={tol} in {k} steps (largest relative error {rel:.3g}, at task "
                f"{rows[worst]}): {why}.  Skip this step, or use a larger tol")
        w[active] = wa
    return torch.as_tensor(w, dtype=G.dtype, device=G.device), rel, k


class FairGrad(WeightedAggregator):
    """FairGrad (Ban and Ji, 2024): weights ``w > 0`` with ``G w = w^(-1/alpha)``, ``d = w^T J``.

    Args:
        alpha: the fairness parameter, ``>= 0`` (default 1.0: proportional fairness; 0: the sum
            of the gradients).
        tol: the relative error every task's equation must reach (default ``1e-9``; see the
            module docstring), else :class:`FairGradSolveError`.
        max_iter: the most Newton steps per call (default 100).

    Computed from ``G = J J^T`` only (see the module docstring).  Stateless: each call solves
    from the same start, as the authors' code does.  ``diagnostics``: ``"residual"`` (the
    largest relative error of the equation) and ``"iterations"``.  Absent tasks: the present tasks share the
    update among themselves (nothing is kept between calls).

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> agg = FairGrad()
        >>> agg(J)                      # w = (1, 1/2): g_i . d = 1 / w_i
        tensor([1., 1.])
        >>> J @ agg(J) * agg.weights    # every task's equation w_i (G w)_i = 1 holds
        tensor([1., 1.])
    """

    gramian_only = True
    paper = "Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024"
    summary = "alpha-fair shares of the update: weights solving G w = w^(-1/alpha) (Newton, checked)"

    def __init__(self, alpha: float = 1.0, tol: float = 1e-9, max_iter: int = 100) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0 (the fairness parameter; 1 is "
                             f"proportional fairness), got {alpha!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"tol must be a positive number (e.g. 1e-9), got {tol!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int (e.g. 100), got {max_iter!r}")
        self.alpha = float(alpha)
        self.tol = float(tol)
        self.max_iter = max_iter

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        w, rel, k = fairgrad_weights(G, self.alpha, tol=self.tol, max_iter=self.max_iter,
                                          task_index=self._task_index)
        self.diagnostics = {"residual": torch.tensor(rel, dtype=torch.float64),
                            "iterations": torch.tensor(k)}
        return w

    def __repr__(self) -> str:
        return f"FairGrad(alpha={self.alpha}, tol={self.tol}, max_iter={self.max_iter})"
