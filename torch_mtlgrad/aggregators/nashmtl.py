"""Nash-MTL: the Nash bargaining solution of the task gradients (Navon et al., ICML 2022).

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, *Multi-Task Learning as a
Bargaining Game*, ICML 2022 (arXiv:2202.01017).

The tasks bargain over the update ``d`` in a ball: ``max_d sum_i log(g_i^T d)``.  The paper
shows (Sec. 3) that the maximiser is ``d = sum_i alpha_i g_i`` with ``alpha > 0`` solving

    G alpha = 1 / alpha        (element-wise; the paper's ``G^T G alpha = 1/alpha``, its ``G``
                                being the ``D x T`` matrix of gradients, so its ``G^T G`` is our
                                Gramian ``G = J J^T``)

The paper solves this with a sequence of convex problems (Sec. 3): with ``beta_i(alpha) = (G alpha)_i`` and ``phi_i(alpha) = log alpha_i + log beta_i``,

    min_alpha  sum_i beta_i(alpha) + phi(alpha)   s.t.  -phi_i(alpha) <= 0,  alpha >= 0,

where the concave ``phi = sum_i phi_i`` is replaced by its first-order expansion at the previous
iterate ``alpha^(tau)`` (a majorisation, so each convex problem improves the objective); at most
``optim_niter`` (the authors' 20) such problems per step, and the weights are recomputed every
``update_weights_every`` steps (the authors' name; 1 by default), reused in between.

How this implementation solves it (all from ``G``, never ``J``):

* **Scale-free form.**  The bargaining solution does not depend on the gradients' norms (Nash's
  scale-invariance axiom, which the paper relies on): with ``n_i = ||g_i||`` and the unit-diagonal
  ``C = diag(1/n) G diag(1/n)``, if ``C a = 1/a`` then ``alpha = a / n`` solves ``G alpha =
  1/alpha`` and gives the same ``d``.  The convex problems are solved on ``C``; this replaces the
  authors' division of ``G`` by its Frobenius norm, and makes tasks of very different scales
  (1e-6 .. 1e6) equally well conditioned.
* **One cvxpy problem per task count**, built once with ``cp.Parameter`` for ``C`` and for the
  linear cost ``c = C 1 + grad phi(a^(tau))`` (DPP: repeated solves skip cvxpy's
  canonicalisation and only refill the parameters), solved with a solver that ships with cvxpy
  (``"CLARABEL"`` by default, an interior-point exponential-cone solver).  The warm start is the
  starting point of the sequence: the previous step's solution (``a = 1`` on the first solve),
  from which the sequence usually stops after one problem.  The solver's own workspace is not
  reused (cvxpy ``warm_start=False``): Clarabel, an interior-point method, cannot start from a
  previous iterate anyway, and reusing its workspace changes the last bits of the result, which
  would break bit-identical resumption from a checkpoint (``state_dict``).  If the start has
  some ``(C a)_i <= 0`` the first convex problem linearises only the ``log a_i`` part of
  ``phi`` (``log beta_i`` is undefined there); every later iterate is feasible, so every later
  problem uses the full expansion.
* **Stopping.**  After each convex problem, stop when ``max_i |a_i (C a)_i - 1| <= tol`` (the
  fixed-point condition itself; default ``1e-5``, above the interior-point solver's accuracy on
  ill-conditioned ``C``) or when ``a`` moved by less than ``1e-9`` relative.  When the convex
  problem's optimum has every constraint active it is already the solution, the common case:
  usually one problem suffices, and ill-conditioned inputs (nearly opposite gradients) take a
  few.  A solution is accepted only if finite, positive and feasible to ``1e-3``.
* **Polish.**  The result then takes up to 5 Newton steps on ``F(a) = a * (C a) - 1 = 0`` (whose
  Jacobian ``diag(C a) + diag(a) C`` is non-singular wherever ``a > 0`` and ``C a > 0``), each
  kept only if it stays positive and lowers ``max |F|``: this brings the cvxpy solution (accurate
  to about ``1e-6``) to the fixed point to rounding.  It changes no solution, only its accuracy.
* **Zero rows** take no part in the game (their utility ``g_i^T d`` is 0 for every ``d``); they
  get weight 0.  All rows zero gives ``d = 0``.
* **Failure.**  The bargaining problem has no solution when no ``d`` improves every task with a
  non-zero gradient (Pareto-stationary points, e.g. two opposite gradients).  Unless the starting
  point already improves every task (``C a > 0``), this is checked first, by Gordan's theorem:
  the min-norm point of the unit gradients' hull (the shared min-norm solver) is 0.
  ``on_failure="previous"`` (default) logs a warning and reuses the previous step's weights
  ``alpha`` (``diagnostics["solve_failed"] = 1``; they are clipped to ``max_norm`` against the
  current ``G``); when there are none (first solve) it raises :class:`NashMTLSolveError`.
  A solver error or a solution that is not feasible is handled the same way.
  ``on_failure="raise"`` always raises.  It never falls back to equal weights.
  If a later convex problem of the sequence fails after an earlier one succeeded, the last
  successful iterate (feasible; the sequence is monotone) is kept and a warning is logged.
* **Norm clipping.**  At the solution ``||d||^2 = alpha^T G alpha = T'`` (the number of non-zero
  rows).  As in the authors' code, ``max_norm`` (default 1.0) clips ``||d||`` to at most
  ``max_norm`` (``0`` disables it); the clipping is applied to the weights (computed from ``G``),
  so ``agg.weights`` are the coefficients of the returned ``d``.

The solve runs in float64 on the CPU (one host synchronisation per solve).

State (``state_dict``): the step counter, the last solution ``a`` (warm start) and the last
weights ``alpha`` (reused between updates and as the failure fallback).

Absent tasks: the bargaining runs among the present tasks, warm-started from their own last
``a`` (1 for a task never present); an absent task's ``a`` and ``alpha`` do not move, and the
step counter advances as on any call.  A call with a task never present before always solves
(even between ``update_weights_every`` updates), and a failed solve with such a task has no
previous weights for it to fall back to (:class:`NashMTLSolveError`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._solvers import min_norm_weights

__all__ = ["NashMTL", "NashMTLSolveError"]

log = logging.getLogger(__name__)

OnFailure = Literal["previous", "raise"]


class NashMTLSolveError(RuntimeError):
    """The Nash-MTL bargaining problem could not be solved (and no fallback was allowed)."""


class _Problem:
    """The convex subproblem for ``n`` active tasks, built once (parameters ``C`` and ``c``)."""

    def __init__(self, n: int) -> None:
        import cvxpy as cp

        self.a = cp.Variable(n, nonneg=True)
        self.C = cp.Parameter((n, n))
        self.c = cp.Parameter(n)
        # -phi_i(a) <= 0  <=>  log a_i + log (C a)_i >= 0   (convex: log of affine is concave)
        self.problem = cp.Problem(cp.Minimize(self.c @ self.a),
                                  [cp.log(self.a) + cp.log(self.C @ self.a) >= 0])


class NashMTL(WeightedAggregator):
    """Nash-MTL (Navon et al., 2022): ``alpha`` with ``G alpha = 1/alpha``, ``d = alpha^T J``.

    Computed from the Gramian ``G = J J^T`` only.  See the module docstring for the exact
    procedure, the failure policy and the state kept.

    Args:
        max_norm: clip ``||d||`` to at most this (the authors' default 1.0; 0 disables).
        update_weights_every: solve every this many calls, reuse the weights in between (the
            authors' default 1).
        optim_niter: at most this many convex problems per solve (the authors' default 20).
        solver: a cvxpy solver with exponential cones that ships with cvxpy (default
            ``"CLARABEL"``; ``"SCS"`` also works); must be in ``cvxpy.installed_solvers()``.
        on_failure: ``"previous"`` (log and reuse the previous weights; raise if there are none)
            or ``"raise"``.
        tol: stop the sequence when ``max_i |a_i (C a)_i - 1| <= tol`` (before the polish).

    Diagnostics of the last call: ``solved`` (1 if a solve ran), ``solve_failed``,
    ``iterations`` (convex problems solved), ``residual`` (``max_i |alpha_i (G alpha)_i - 1|``
    before clipping), ``norm`` (``||d||`` before clipping).

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> agg = NashMTL(max_norm=0.0)
        >>> d = agg(J)   # alpha = (1, 1/4): each task gets the same gain g_i^T d = 1
        >>> d.round(decimals=6)
        tensor([1., 1.], dtype=torch.float64)
        >>> agg.weights.round(decimals=6)
        tensor([1.0000, 0.2500], dtype=torch.float64)
    """

    gramian_only = True
    stateful = True

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20,
                 solver: str = "CLARABEL", on_failure: OnFailure = "previous",
                 tol: float = 1e-5) -> None:
        super().__init__()
        if not (isinstance(max_norm, (int, float)) and max_norm >= 0):
            raise ValueError(
                f"max_norm must be a non-negative number (0 disables), got {max_norm!r}")
        if not (isinstance(update_weights_every, int) and update_weights_every >= 1):
            raise ValueError(
                f"update_weights_every must be a positive integer, got {update_weights_every!r}")
        if not (isinstance(optim_niter, int) and optim_niter >= 1):
            raise ValueError(f"optim_niter must be a positive integer, got {optim_niter!r}")
        if on_failure not in ("previous", "raise"):
            raise ValueError(f"on_failure must be 'previous' or 'raise', got {on_failure!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        import cvxpy as cp

        if solver.upper() not in cp.installed_solvers():
            raise ValueError(
                f"cvxpy solver {solver!r} is not installed; installed: {cp.installed_solvers()} "
                "(CLARABEL ships with cvxpy)")
        self.max_norm = float(max_norm)
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self.solver = solver.upper()
        self.on_failure: OnFailure = on_failure
        self.tol = float(tol)
        self._problems: dict[int, _Problem] = {}
        self.step = 0
        self.alpha: Tensor | None = None  # [T] float64, last weights before clipping
        self.a: Tensor | None = None  # [T] float64, last scale-free solution (0 on zero rows)

    # ---------------------------------------------------------------------------------------
    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        T = G.shape[0]
        if self.alpha is not None and self.alpha.shape[0] != T:
            raise ValueError(
                f"NashMTL was tracking {self.alpha.shape[0]} tasks, got J with {T} rows; "
                "call reset() to start over with a different number of tasks")
        G64 = G.detach().to(device="cpu", dtype=torch.float64)
        G64 = 0.5 * (G64 + G64.T)
        if not bool(torch.isfinite(G64).all()):
            raise ValueError("NashMTL: the Gramian J J^T has non-finite entries")
        unseen = self.alpha is not None and bool(torch.isnan(self.alpha).any())
        solve_now = self.step % self.update_weights_every == 0 or self.alpha is None or unseen
        self.step += 1
        iters, failed = 0, False
        if solve_now:
            alpha, iters, failed = self._solve(G64)
        else:
            alpha = self.alpha
        assert alpha is not None
        Ga = G64 @ alpha
        norm = float(alpha @ Ga) ** 0.5 if float(alpha @ Ga) > 0 else 0.0
        active = alpha > 0
        residual = float((alpha * Ga - 1)[active].abs().max()) if bool(active.any()) else 0.0
        w = alpha
        if self.max_norm > 0 and norm > self.max_norm:
            w = alpha * (self.max_norm / norm)
        self.diagnostics = {
            "solved": torch.tensor(float(solve_now)),
            "solve_failed": torch.tensor(float(failed)),
            "iterations": torch.tensor(float(iters)),
            "residual": torch.tensor(residual),
            "norm": torch.tensor(norm),
        }
        return w.to(device=G.device, dtype=G.dtype)

    def _solve(self, G64: Tensor) -> tuple[Tensor, int, bool]:
        """Solve ``G alpha = 1/alpha`` on the non-zero rows; returns (alpha, iterations, failed)."""
        T = G64.shape[0]
        diag = torch.diagonal(G64).clamp_min(0)
        active = diag > torch.finfo(torch.float64).tiny
        n = diag.sqrt()
        alpha = torch.zeros(T, dtype=torch.float64)
        a_full = torch.zeros(T, dtype=torch.float64)
        idx = active.nonzero().flatten()
        k = idx.numel()
        if k == 0:
            self.alpha, self.a = alpha, a_full
            return alpha, 0, False
        nk = n[idx]
        C = (G64[idx][:, idx] / (nk[:, None] * nk[None, :])).numpy()
        start = np.ones(k)
        if self.a is not None and self.a.shape[0] == T:
            prev = self.a[idx].numpy()
            if np.all(prev > 0):
                start = prev.copy()
        if k == 1:
            a, iters, status = np.ones(1), 0, "optimal"
        elif not np.all(C @ start > 0) and self._stationary(C):
            a, iters, status = None, 0, "stationary"
        else:
            a, iters, status = self._sequence(C, start)
        if a is None:
            return self._fallback(T, iters, status)
        a_full[idx] = torch.from_numpy(a)
        alpha[idx] = torch.from_numpy(a) / nk
        self.alpha, self.a = alpha, a_full
        return alpha, iters, False

    @staticmethod
    def _stationary(C: np.ndarray) -> bool:
        """Gordan: no ``d`` with ``J d > 0`` iff the min-norm point of the unit rows' hull is 0.

        Only asked when the starting point does not already improve every task (``C a > 0``
        proves the problem solvable), so the common warm-started step skips it.
        """
        Ct = torch.from_numpy(C)
        w = min_norm_weights(Ct, "active-set")
        return float(w @ Ct @ w) <= 1e-14

    def _sequence(self, C: np.ndarray, start: np.ndarray) -> tuple[np.ndarray | None, int, str]:
        """The paper's sequence of convex problems on the unit-diagonal ``C``.

        Returns the solution (``None`` if the first problem failed), the number of problems
        solved and the solver status of the last one.
        """
        k = C.shape[0]
        prob = self._problems.get(k)
        if prob is None:
            prob = self._problems[k] = _Problem(k)
        prob.C.value = C
        ones = np.ones(k)
        C1 = C @ ones
        a_t = start
        best: np.ndarray | None = None
        iters = 0
        for _ in range(self.optim_niter):
            Ca = C @ a_t
            grad_phi = 1.0 / a_t
            if np.all(Ca > 0):
                grad_phi = grad_phi + C.T @ (1.0 / Ca)
            prob.c.value = C1 + grad_phi
            try:
                with warnings.catch_warnings():  # "solution may be inaccurate": checked below
                    warnings.simplefilter("ignore")
                    prob.problem.solve(solver=self.solver, warm_start=False)
                status = prob.problem.status
                value = prob.a.value
            except Exception as exc:  # cvxpy raises SolverError, ValueError, ... on bad data
                status, value = f"error: {exc}", None
            iters += 1
            if not self._acceptable(C, value, status):
                if best is None:
                    return None, iters, str(status)
                log.warning("Nash-MTL: convex problem %d of the sequence failed (status %s); "
                            "keeping the previous iterate", iters, status)
                break
            a_new = np.maximum(np.asarray(value, dtype=np.float64), 1e-300)
            best = a_new
            residual = np.abs(a_new * (C @ a_new) - 1).max()
            moved = np.abs(a_new - a_t).max() <= 1e-9 * np.abs(a_new).max()
            a_t = a_new
            if residual <= self.tol or moved:
                break
        assert best is not None
        return self._polish(C, best), iters, str(status)

    @staticmethod
    def _polish(C: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Newton steps on ``a * (C a) = 1``, each kept only if positive and more accurate."""
        r = a * (C @ a) - 1
        for _ in range(5):
            if np.abs(r).max() <= 1e-14:
                break
            Ca = C @ a
            if not np.all(Ca > 0):
                break
            try:
                step = np.linalg.solve(np.diag(Ca) + a[:, None] * C, -r)
            except np.linalg.LinAlgError:
                break
            a_new = a + step
            if not (np.all(np.isfinite(a_new)) and np.all(a_new > 0)):
                break
            r_new = a_new * (C @ a_new) - 1
            if np.abs(r_new).max() >= np.abs(r).max():
                break
            a, r = a_new, r_new
        return a

    @staticmethod
    def _acceptable(C: np.ndarray, value: Any, status: str) -> bool:
        """A solution is used only if optimal (or inaccurate), positive and feasible to 1e-3."""
        if value is None or status not in ("optimal", "optimal_inaccurate"):
            return False
        a = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(a)) or not np.all(a > 0):
            return False
        return bool(np.min(a * (C @ a)) >= 1 - 1e-3)

    def _fallback(self, T: int, iters: int, status: str) -> tuple[Tensor, int, bool]:
        if status == "stationary":
            reason = ("no direction improves every task with a non-zero gradient (0 is in the "
                      "convex hull of the normalised gradients: a Pareto-stationary point, e.g. "
                      "opposite gradients), so the bargaining problem has no solution")
        else:
            reason = (f"the cvxpy solver {self.solver} returned status {status!r} on the first "
                      "convex problem")
        prev = self.alpha
        if self.on_failure == "raise":
            raise NashMTLSolveError(f"Nash-MTL solve failed: {reason}")
        if prev is None or prev.shape[0] != T:
            raise NashMTLSolveError(
                f"Nash-MTL solve failed: {reason}; there are no previous weights to fall back "
                "to (first solve)")
        if bool(torch.isnan(prev).any()):
            tasks = [self._task_index(int(t)) for t in torch.isnan(prev).nonzero().flatten()]
            raise NashMTLSolveError(
                f"Nash-MTL solve failed: {reason}; there are no previous weights to fall back "
                f"to for task(s) {tasks} (first solve with them present)")
        log.warning("Nash-MTL solve failed (%s); reusing the previous weights", reason)
        return prev, iters, True

    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"alpha": ((0,), float("nan")), "a": ((0,), 1.0)}

    # State -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "alpha": None if self.alpha is None else self.alpha.clone(),
            "a": None if self.a is None else self.a.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"step", "alpha", "a"}
        if unknown:
            raise ValueError(f"NashMTL state has unknown keys {sorted(unknown)}")
        alpha, a = state.get("alpha"), state.get("a")
        for name, v in (("alpha", alpha), ("a", a)):
            if v is not None and (not isinstance(v, Tensor) or v.dim() != 1):
                raise ValueError(f"NashMTL state {name!r} must be a 1-D tensor or None")
        self.step = int(state.get("step", 0))
        self.alpha = None if alpha is None else alpha.detach().to("cpu", torch.float64).clone()
        self.a = None if a is None else a.detach().to("cpu", torch.float64).clone()

    def reset(self) -> None:
        self.step = 0
        self.alpha = None
        self.a = None

    def __repr__(self) -> str:
        return (f"NashMTL(max_norm={self.max_norm}, "
                f"update_weights_every={self.update_weights_every}, "
                f"optim_niter={self.optim_niter}, solver={self.solver!r})")
