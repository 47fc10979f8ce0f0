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
  few.
* **Verified solutions.**  A convex problem's answer is used only when it passes a check of the
  problem's optimality (KKT) conditions, whatever status the solver reported (``optimal`` or
  ``optimal_inaccurate``; any other status is a failure).  The problem at the linearisation
  point ``a^(tau)`` is ``min_a c^T a  s.t.  f_i(a) = -log a_i - log (C a)_i <= 0`` (``a > 0`` is
  implied by the logarithms), and ``a`` is optimal iff some multipliers ``mu`` satisfy

      primal feasibility     a > 0,  a_i (C a)_i >= 1
      dual feasibility       mu >= 0
      stationarity           c = mu / a + C (mu / (C a))          (element-wise divisions)
      complementarity        mu_i log(a_i (C a)_i) = 0

  (for a convex problem these are sufficient; with stationarity exact,
  ``sum_i mu_i log(a_i (C a)_i)`` bounds ``c^T a - min``).  The check takes two candidates for
  ``mu``: the solver's multipliers (clipped at 0) and the non-negative least-squares solution of
  the stationarity equation, and accepts ``a`` when, for one of them, the largest of the
  infeasibility ``max(0, 1 - min_i a_i (C a)_i)``, the stationarity residual
  ``||c - mu/a - C (mu/(C a))||_inf / max(1, ||c||_inf)`` and the complementarity gap
  ``|sum_i mu_i log(a_i (C a)_i)| / max(1, |c^T a|)`` is at most ``kkt_tol`` (default
  ``1e-6``).  When the solver's answer fails the check (or the solver fails), the same problem
  is solved again by the next solver of ``fallback_solvers`` (by default the other installed
  cvxpy solvers with exponential cones, among ``CLARABEL``, ``ECOS``, ``SCS``, in that order;
  ``SCS`` with tight tolerances).  When none gives a verified answer, the best unverified
  candidate (positive and finite) gets the Newton polish below, a *polished restart*, and is
  accepted only if it then solves the bargaining conditions ``a * (C a) = 1`` to
  ``max(tol, 1e-9)``.
  Otherwise the convex problem has failed (see Failure).  The final answer is verified too: it
  must satisfy ``a > 0`` and ``max_i |a_i (C a)_i - 1| <= max(tol, 1e-9)`` after the polish (the KKT
  conditions of the bargaining problem ``max_d sum_i log(u_i^T d)`` on ``||d||^2 <= T'``),
  else the solve has failed.  ``diagnostics["fallbacks"]`` counts the convex problems answered
  by a fallback solver or a polished restart; ``last_solve_log`` lists ``(solver, status,
  kkt residual)`` for every attempt of the last solve.
* **Polish.**  The result then takes up to 5 Newton steps on ``F(a) = a * (C a) - 1 = 0`` (whose
  Jacobian ``diag(C a) + diag(a) C`` is non-singular wherever ``a > 0`` and ``C a > 0``), each
  kept only if it stays positive and lowers ``max |F|``: this brings the cvxpy solution (accurate
  to about ``1e-6``) to the fixed point to rounding.  It changes no solution, only its accuracy.
* **Zero rows** take no part in the game (their utility ``g_i^T d`` is 0 for every ``d``); they
  get weight 0.  All rows zero gives ``d = 0``.
* **Failure.**  The bargaining problem has no solution when no ``d`` improves every task with a
  non-zero gradient (Pareto-stationary points, e.g. two opposite gradients).  Unless the starting
  point already improves every task by a margin (``min_i (C a)_i^2 > tol * a^T C a`` with the
  tolerance below, which bounds the min-norm point's squared norm from below by ``tol``), this
  is checked first, by Gordan's theorem:
  the min-norm point of the unit gradients' hull (the shared min-norm solver) is 0, to within
  the precision of ``G``: its squared norm at most ``1e-14`` for a float64 ``G`` and
  ``8 * eps`` of the dtype otherwise (``9.5e-7`` for float32, whose rounding of ``G`` alone moves
  that squared norm by about ``1e-7``: a float32 Jacobian with opposite or cancelling rows,
  e.g. a ``3 x 1`` matrix with entries of both signs, is reported as stationary rather than
  handed to the solver as a barely solvable problem).
  ``on_failure="previous"`` (default) logs a warning and reuses the previous step's weights
  ``alpha`` (``diagnostics["solve_failed"] = 1``; they are clipped to ``max_norm`` against the
  current ``G``); when there are none (first solve) it raises :class:`NashMTLSolveError`.
  A convex problem or a final answer without a verified solution (every solver and the
  polished restart failed, see Verified solutions) is handled the same way, and the error names
  each solver's status.  ``on_failure="raise"`` always raises.  It never falls back to equal
  weights.

  TorchJD's ``NashMTL`` (``torchjd.aggregation.NashMTL``, after the authors' code) differs
  here: where its ECOS solve fails (singular Gramians, Pareto-stationary inputs such as a
  float32 ``3 x 1`` matrix with entries of both signs) it keeps its previous weights, which are
  all ones on the first call, i.e. it returns equal weights without notice; this class raises
  (or reuses previous weights it did solve for).  Where both solve, the weights agree (same
  convention ``G alpha = 1/alpha``, before the same ``max_norm`` clipping; TorchJD divides ``G``
  by its Frobenius norm instead of working on the unit-diagonal ``C`` and stops its sequence at
  ``||G alpha - 1/alpha|| < 1e-3``, so its weights are only that accurate).
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
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._solvers import min_norm_weights

__all__ = ["NashMTL", "NashMTLSolveError"]

log = logging.getLogger(__name__)

OnFailure = Literal["previous", "raise"]

# cvxpy solvers with exponential cones, in the order they are tried by default, and the options
# each is called with: tight tolerances (Clarabel's defaults, 1e-8 on its scaled conic form, often
# leave a KKT residual of 1e-5 in the problem's own terms; a tight solve that ends
# "optimal_inaccurate" is still checked and usually accepted).
_EXP_CONE_SOLVERS = ("CLARABEL", "ECOS", "SCS")
_SOLVER_OPTIONS: dict[str, dict[str, Any]] = {
    "CLARABEL": {"tol_feas": 1e-10, "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10},
    "ECOS": {"max_iters": 200},
    "SCS": {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 20000},
}
_OK_STATUSES = ("optimal", "optimal_inaccurate")


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
        tol: stop the sequence when ``max_i |a_i (C a)_i - 1| <= tol`` (before the polish); the
            final answer must meet ``max(tol, 1e-9)`` after the polish (else the solve has
            failed).
        fallback_solvers: the cvxpy solvers tried, in order, when ``solver``'s answer to a
            convex problem fails the KKT check; ``None`` (default): the other installed ones
            among ``CLARABEL``, ``ECOS``, ``SCS``; ``()`` for none.
        kkt_tol: the tolerance of the KKT check of each convex problem's answer (default
            ``1e-6``; see the module docstring).

    Diagnostics of the last call: ``solved`` (1 if a solve ran), ``solve_failed``,
    ``iterations`` (convex problems solved), ``fallbacks`` (convex problems answered by a
    fallback solver or a polished restart), ``residual`` (``max_i |alpha_i (G alpha)_i - 1|``
    before clipping), ``norm`` (``||d||`` before clipping).  ``last_solve_log``: ``(solver,
    status, kkt residual)`` of every attempt of the last solve.

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

    paper = "Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022"
    summary = ("Nash bargaining solution (cvxpy with CLARABEL, warm-started; a failed solve "
               "raises or logs the documented fallback, never equal weights)")

    gramian_only = True
    stateful = True

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20,
                 solver: str = "CLARABEL", on_failure: OnFailure = "previous",
                 tol: float = 1e-5, fallback_solvers: Sequence[str] | None = None,
                 kkt_tol: float = 1e-6) -> None:
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
        if not (isinstance(kkt_tol, (int, float)) and kkt_tol > 0):
            raise ValueError(f"kkt_tol must be a positive number, got {kkt_tol!r}")
        import cvxpy as cp

        installed = cp.installed_solvers()
        if solver.upper() not in installed:
            raise ValueError(
                f"cvxpy solver {solver!r} is not installed; installed: {installed} "
                "(CLARABEL ships with cvxpy)")
        if fallback_solvers is None:
            fallbacks = [s for s in _EXP_CONE_SOLVERS if s in installed and s != solver.upper()]
        else:
            if isinstance(fallback_solvers, str):
                raise ValueError("fallback_solvers must be a sequence of solver names, e.g. "
                                 f"['ECOS'], not the string {fallback_solvers!r}")
            fallbacks = [str(f).upper() for f in fallback_solvers]
            missing = [f for f in fallbacks if f not in installed]
            if missing:
                raise ValueError(f"fallback solver(s) {missing} not installed; installed: "
                                 f"{installed}")
        self.fallback_solvers: tuple[str, ...] = tuple(fallbacks)
        self.kkt_tol = float(kkt_tol)
        self.last_solve_log: list[tuple[str, str, float]] = []
        self._fallbacks = 0
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
        self._fallbacks = 0
        if solve_now:
            self.last_solve_log = []
            alpha, iters, failed = self._solve(G64, self._stationary_tol(dtype))
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
            "fallbacks": torch.tensor(float(self._fallbacks)),
            "residual": torch.tensor(residual),
            "norm": torch.tensor(norm),
        }
        return w.to(device=G.device, dtype=G.dtype)

    @property
    def _accept_tol(self) -> float:
        """The bargaining residual a final answer (or a polished restart) must meet."""
        return max(self.tol, 1e-9)

    @staticmethod
    def _stationary_tol(dtype: torch.dtype) -> float:
        """The squared min-norm at or below which the unit rows count as Pareto-stationary:
        ``1e-14`` for float64, ``8 * eps`` for a less precise ``G`` (float32: ``9.5e-7``)."""
        return max(1e-14, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-14

    def _solve(self, G64: Tensor, stationary_tol: float = 1e-14) -> tuple[Tensor, int, bool]:
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
        elif not self._clearly_improvable(C, start, stationary_tol) and self._stationary(
                C, stationary_tol):
            a, iters, status = None, 0, "stationary"
        else:
            a, iters, status = self._sequence(C, start)
            if a is not None:
                r = self._nash_residual(C, a)
                if not r <= self._accept_tol:
                    a, status = None, (f"an unverified final answer (max |a (C a) - 1| = {r:.3g} "
                                       f"> {self._accept_tol:g} after {iters} convex problems)")
        if a is None:
            return self._fallback(T, iters, status)
        a_full[idx] = torch.from_numpy(a)
        alpha[idx] = torch.from_numpy(a) / nk
        self.alpha, self.a = alpha, a_full
        return alpha, iters, False

    @staticmethod
    def _clearly_improvable(C: np.ndarray, a: np.ndarray, tol: float) -> bool:
        """Whether ``d = U^T a`` proves the unit rows ``U`` far from stationarity: for every
        ``w`` of the simplex ``||U^T w|| >= min_i (C a)_i / ||d||``, so the squared min-norm is at
        least ``min_i (C a)_i^2 / a^T C a``; true when that bound exceeds ``tol``."""
        Ca = C @ a
        m, q = float(Ca.min()), float(a @ Ca)
        return m > 0 and q > 0 and m * m > tol * q

    @staticmethod
    def _stationary(C: np.ndarray, tol: float = 1e-14) -> bool:
        """Gordan: no ``d`` with ``J d > 0`` iff the min-norm point of the unit rows' hull is 0.

        Only asked when the starting point does not already improve every task by a margin
        (:meth:`_clearly_improvable`), so the common warm-started step skips it.
        """
        Ct = torch.from_numpy(C)
        w = min_norm_weights(Ct, "active-set")
        return float(w @ Ct @ w) <= tol

    @staticmethod
    def _nash_residual(C: np.ndarray, a: np.ndarray) -> float:
        """``max_i |a_i (C a)_i - 1|`` (infinite unless ``a > 0`` and finite): the bargaining
        problem's KKT conditions hold iff it is 0."""
        if not (np.all(np.isfinite(a)) and np.all(a > 0)):
            return float("inf")
        r = float(np.abs(a * (C @ a) - 1).max())
        return r if np.isfinite(r) else float("inf")

    @staticmethod
    def _kkt_residual(C: np.ndarray, c: np.ndarray, value: Any, dual: Any) -> float:
        """The KKT residual of ``a`` for ``min c^T a s.t. log a_i + log (C a)_i >= 0`` (see the
        module docstring): the worst of infeasibility, stationarity residual and complementarity
        gap, for the better of two multiplier candidates (the solver's and the non-negative
        least-squares one).  Infinite when ``a`` is not finite and positive with ``C a > 0``."""
        from scipy.optimize import nnls

        if value is None:
            return float("inf")
        a = np.asarray(value, dtype=np.float64).reshape(-1)
        if not (np.all(np.isfinite(a)) and np.all(a > 0)):
            return float("inf")
        Ca = C @ a
        if not (np.all(np.isfinite(Ca)) and np.all(Ca > 0)):
            return float("inf")
        s = a * Ca
        infeasible = max(0.0, 1.0 - float(s.min()))
        M = np.diag(1.0 / a) + C / Ca[None, :]  # M mu = mu / a + C (mu / (C a))
        c_scale = max(1.0, float(np.abs(c).max()))
        obj_scale = max(1.0, abs(float(c @ a)))
        log_s = np.log(s)
        candidates = []
        if dual is not None:
            mu = np.asarray(dual, dtype=np.float64).reshape(-1)
            if mu.shape == a.shape and np.all(np.isfinite(mu)):
                candidates.append(np.maximum(mu, 0.0))
        try:
            candidates.append(nnls(M, c)[0])
        except (RuntimeError, ValueError):  # nnls did not converge (not expected)
            pass
        best = float("inf")
        for mu in candidates:
            stat = float(np.abs(M @ mu - c).max()) / c_scale
            gap = abs(float(mu @ log_s)) / obj_scale
            r = max(infeasible, stat, gap)
            if np.isfinite(r):
                best = min(best, r)
        return best

    def _solve_convex(self, prob: _Problem, C: np.ndarray,
                      c: np.ndarray) -> tuple[np.ndarray | None, str]:
        """One convex problem (``prob.C`` and ``prob.c`` set), verified by its KKT conditions:
        ``solver``, then each fallback solver, then a polished restart of the best candidate.
        Returns the verified solution (``None`` if none) and a summary of the statuses."""
        attempts: list[str] = []
        best: tuple[float, np.ndarray] | None = None
        for i, name in enumerate((self.solver, *self.fallback_solvers)):
            try:
                with warnings.catch_warnings():  # "solution may be inaccurate": checked below
                    warnings.simplefilter("ignore")
                    prob.problem.solve(solver=name, warm_start=False,
                                       **_SOLVER_OPTIONS.get(name, {}))
                status = str(prob.problem.status)
                value = None if prob.a.value is None else np.array(prob.a.value, dtype=np.float64)
                dual = prob.problem.constraints[0].dual_value
            except Exception as exc:  # noqa: BLE001  (cvxpy: SolverError, ValueError, ...)
                status, value, dual = f"error: {exc}", None, None
            kkt = (self._kkt_residual(C, c, value, dual) if status in _OK_STATUSES
                   else float("inf"))
            self.last_solve_log.append((name, status, kkt))
            attempts.append(f"{name}: {status!r}" + (f" (KKT residual {kkt:.2g})"
                                                      if np.isfinite(kkt) else ""))
            if kkt <= self.kkt_tol:
                assert value is not None
                self._fallbacks += int(i > 0)
                return value, status
            if value is not None and np.all(np.isfinite(value)) and np.all(value > 0):
                r = self._nash_residual(C, value)
                if best is None or r < best[0]:
                    best = (r, value)
        if best is not None:  # polished restart: accepted only as a verified Nash solution
            polished = self._polish(C, best[1])
            r = self._nash_residual(C, polished)
            self.last_solve_log.append(("polished restart", "verified" if r <= self._accept_tol
                                        else "unverified", r))
            if r <= self._accept_tol:
                self._fallbacks += 1
                return polished, "polished restart"
            attempts.append(f"polished restart: max |a (C a) - 1| = {r:.2g} > tol")
        return None, "; ".join(attempts)

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
            c = C1 + grad_phi
            prob.c.value = c
            value, status = self._solve_convex(prob, C, c)
            iters += 1
            if value is None:
                if best is None:
                    return None, iters, status
                log.warning("Nash-MTL: convex problem %d of the sequence has no verified "
                            "solution (%s); keeping the previous iterate", iters, status)
                break
            if status == "polished restart":  # already the bargaining solution (verified)
                best = value
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

    def _fallback(self, T: int, iters: int, status: str) -> tuple[Tensor, int, bool]:
        if status == "stationary":
            reason = ("no direction improves every task with a non-zero gradient (0 is in the "
                      "convex hull of the normalised gradients: a Pareto-stationary point, e.g. "
                      "opposite gradients), so the bargaining problem has no solution")
        elif status.startswith("an unverified final answer"):
            reason = f"the sequence of convex problems ended with {status}"
        else:
            reason = ("no verified solution of the first convex problem (KKT residual <= "
                      f"{self.kkt_tol:g}); statuses: {status}")
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
                f"optim_niter={self.optim_niter}, solver={self.solver!r}, "
                f"fallback_solvers={self.fallback_solvers!r})")
