"""Solvers shared by the aggregators: min-norm weights and the projection onto the dual cone.

Everything here reads the Gramian ``G = J J^T`` (``[T, T]``), never ``J`` itself.

One exact solver serves both problems: :func:`nnqp`, an active-set method of Lawson and Hanson
(*Solving Least Squares Problems*, 1974, ch. 23) for ``min_{x >= 0} 1/2 x^T Q x + c^T x`` in its
Gram form, run in float64 on the CPU.  It terminates in finitely many steps, copes with singular
``Q`` (rank-deficient, duplicate, colinear rows) through least-squares subproblems, and is exact up
to rounding.

* Min-norm on the simplex (tensioner paper eq. 2, MGDA) is the non-negative least-squares problem
  ``min_{x >= 0} ||J^T x||^2 + (1^T x - 1)^2`` rescaled: ``w* = x* / 1^T x*`` (the least-distance
  reduction of Lawson and Hanson, ch. 23).  See :func:`min_norm_weights`.
* The projection of a vector ``v`` onto ``{d : J d >= 0}`` is ``d = v + J^T lam`` with
  ``lam = argmin_{lam >= 0} 1/2 lam^T G lam + lam^T (J v)`` (its dual).  See
  :func:`dual_cone_weights`.  UPGrad, DualProj and the tensioner's feasibility step use it.

The fixed-iteration solvers :func:`min_norm_weights_pgd` and :func:`dual_cone_weights_pgd` stay
on the device of ``G`` and never synchronise with the host; they are approximate.  Both are one
loop, :func:`fista` (accelerated projected gradient), with their own gradient step and
projection (onto the simplex, :func:`project_simplex`, or the non-negative orthant).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "combine64",
    "dual_cone_weights",
    "dual_cone_weights_pgd",
    "fista",
    "gramian64",
    "min_norm_weights",
    "min_norm_weights_cvxpy",
    "min_norm_weights_pgd",
    "nnqp",
    "project_simplex",
    "smallest_min_norm_weights",
]

log = logging.getLogger(__name__)

MinNormMethod = Literal["auto", "active-set", "closed-form", "cvxpy", "pgd"]


def _support_solution(Q: np.ndarray, c: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The least-squares stationary point of the problem restricted to the indices ``idx``."""
    z = np.zeros(c.shape[0])
    # rcond drops directions that exist only through rounding (singular Q from dependent rows);
    # without it those give huge, cancelling multipliers.
    z[idx] = np.linalg.lstsq(Q[np.ix_(idx, idx)], -c[idx], rcond=1e-12)[0]
    return z


def nnqp(Q: np.ndarray, c: np.ndarray, tol: float = 1e-13, max_iter: int | None = None,
         warm: dict | None = None) -> np.ndarray:
    """Solve ``min_{x >= 0} 1/2 x^T Q x + c^T x`` for a symmetric PSD ``Q`` (float64 numpy).

    Lawson-Hanson active-set iterations in Gram form.  ``tol`` is relative to the problem's scale.

    ``warm``: a dict kept by the caller between solves of related problems (consecutive training
    steps).  Its ``"support"`` (from the last solve) is tried first: when the stationary point on
    that support is positive and no index off it may enter (the method's own stopping test), it
    is the solution, from one least-squares solve instead of one per active-set change.  It is
    the same point, to the bit, that the cold iterations end on whenever they end on that
    support.  Otherwise the cold iterations run.  The new support is written back.

    Example:
        >>> Q, c = np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([-2.0, 1.0])
        >>> warm = {}
        >>> nnqp(Q, c, warm=warm), warm["support"]
        (array([1., 0.]), array([ True, False]))
        >>> nnqp(Q, c, warm=warm)   # this time from the remembered support
        array([1., 0.])
    """
    Q = np.asarray(Q, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    n = c.shape[0]
    scale = max(1.0, float(np.abs(Q).max(initial=0.0)), float(np.abs(c).max(initial=0.0)))
    eps = tol * scale * n
    start = None if warm is None else warm.get("support")
    if start is not None and start.shape == (n,) and start.any():
        idx = np.flatnonzero(start)
        z = _support_solution(Q, c, idx)
        if np.all(z[idx] > 0) and not (~start & (-(Q @ z + c) > eps)).any():
            warm["support"] = z > 0
            return np.maximum(z, 0.0)
    x = _nnqp_cold(Q, c, eps, max_iter if max_iter is not None else 5 * n + 50)
    if warm is not None:
        warm["support"] = x > 0
    return x


def _nnqp_cold(Q: np.ndarray, c: np.ndarray, eps: float, max_iter: int) -> np.ndarray:
    n = c.shape[0]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    grad_neg = -(Q @ x + c)
    for _ in range(max_iter):
        candidates = ~passive & (grad_neg > eps)
        if not candidates.any():
            break
        j = int(np.argmax(np.where(candidates, grad_neg, -np.inf)))
        passive[j] = True
        for _inner in range(max_iter):
            idx = np.flatnonzero(passive)
            z = _support_solution(Q, c, idx)
            if np.all(z[idx] > 0):
                x = z
                break
            bad = idx[z[idx] <= 0]
            denom = x[bad] - z[bad]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = np.where(denom > 0, x[bad] / denom, np.inf)
            step = float(min(1.0, ratios.min())) if ratios.size else 1.0
            x = x + step * (z - x)
            drop = passive & (x <= eps * 1e-3)
            x[drop] = 0.0
            passive &= ~drop
            if not passive.any():
                break
        grad_neg = -(Q @ x + c)
    return np.maximum(x, 0.0)


def _as_numpy64(G: Tensor) -> np.ndarray:
    G64 = G.detach().to(device="cpu", dtype=torch.float64).numpy()
    return 0.5 * (G64 + G64.T)


# Columns per chunk in the float64 products below: at most ~2^24 float64 entries (128 MiB) at
# a time, whatever D is.
_CHUNK_ENTRIES = 1 << 24


def _column_chunks(J: Tensor) -> list[Tensor]:
    step = max(1, _CHUNK_ENTRIES // max(1, J.shape[0]))
    return list(J.split(step, dim=1)) if J.shape[1] else [J]


def gramian64(J: Tensor) -> Tensor:
    """``G = J J^T`` (``[T, T]``) accumulated in float64 on ``J``'s device, column block by
    column block (``J`` is never copied whole to float64).

    A product of two float32 numbers is exact in float64, so for a float32 ``J`` the only
    rounding is the float64 accumulation (~1e-16 relative): ``G`` of the rows in any order is
    the same matrix, permuted, to that accuracy.  A float32 ``J @ J.T`` rounds each entry to
    ~1e-7 and, blocked differently for different row orders, not always to the same bits;
    a solver on ``G`` then sees a different matrix for each order.

    Example:
        >>> gramian64(torch.tensor([[1.0, 2.0], [0.0, 3.0]]))
        tensor([[5., 6.],
                [6., 9.]], dtype=torch.float64)
    """
    T = J.shape[0]
    G = torch.zeros(T, T, dtype=torch.float64, device=J.device)
    for Jc in _column_chunks(J):
        Jc = Jc.to(torch.float64)
        G += Jc @ Jc.T
    return G


def combine64(w: Tensor, J: Tensor) -> Tensor:
    """``d = w^T J`` (``[D]``, in ``J``'s dtype) with the sum over the rows done in float64 (column
    block by column block) and rounded once at the end.

    The weights of a projection can be large and of both signs on rank-deficient ``J`` (their
    combination cancels): summed in float32 in the rows' order, ``w^T J`` then carries an error
    of ``eps ||w|| max|J|`` that changes with the order of the rows.  Summed in float64 the
    result is the correctly rounded sum, up to ties, whatever the order.

    Example:
        >>> combine64(torch.tensor([0.5, 0.5], dtype=torch.float64), torch.eye(2))
        tensor([0.5000, 0.5000])
    """
    w64 = w.to(device=J.device, dtype=torch.float64)
    parts = [(w64 @ Jc.to(torch.float64)).to(J.dtype) for Jc in _column_chunks(J)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _min_norm_two(G: Tensor) -> Tensor:
    """Closed form for two tasks: w1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)."""
    g11, g12, g22 = G[0, 0], G[0, 1], G[1, 1]
    denom = g11 + g22 - 2 * g12
    tiny = torch.finfo(G.dtype).tiny
    # denom == 0 means g1 == g2: every weighting gives the same direction; take 1/2.
    w1 = torch.where(denom > tiny, (g22 - g12) / denom.clamp_min(tiny), torch.full_like(denom, 0.5))
    w1 = w1.clamp(0.0, 1.0)
    return torch.stack([w1, 1 - w1])


def min_norm_weights(G: Tensor, method: MinNormMethod = "auto", *, iters: int = 250,
                     warm: dict | None = None) -> Tensor:
    """Weights ``w*`` of the min-norm element of the convex hull of the rows of ``J``.

    ``w* = argmin_{w in simplex} w^T G w`` (tensioner paper eq. 2; MGDA).  Methods:

    * ``"auto"``: closed form for T = 2 (on the device, no synchronisation), active-set otherwise.
    * ``"closed-form"``: T = 2 only.
    * ``"active-set"``: exact (float64, CPU; synchronises), see :func:`nnqp`.
    * ``"cvxpy"``: exact, through cvxpy's default QP solver.
    * ``"pgd"``: ``iters`` steps of projected gradient on the device (approximate, sync-free).

    ``warm``: for the active-set method, a dict the caller keeps between steps (see :func:`nnqp`).

    Returns weights on ``G``'s device and dtype, summing to 1.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> min_norm_weights(G)
        tensor([0.8000, 0.2000])
    """
    T = G.shape[0]
    if G.shape != (T, T):
        raise ValueError(f"G must be square [T, T], got shape {tuple(G.shape)}")
    if T == 1:
        return torch.ones(1, dtype=G.dtype, device=G.device)
    if method == "auto":
        method = "closed-form" if T == 2 else "active-set"
    if method == "closed-form":
        if T != 2:
            raise ValueError(f"the closed-form min-norm solution needs T = 2 tasks, got T = {T}")
        return _min_norm_two(G)
    if method == "pgd":
        return min_norm_weights_pgd(G, iters=iters)
    if method == "cvxpy":
        return min_norm_weights_cvxpy(G)
    if method != "active-set":
        raise ValueError(
            f"unknown min-norm method {method!r}; use 'auto', 'active-set', 'closed-form', "
            "'cvxpy' or 'pgd'"
        )
    G64 = _as_numpy64(G)
    s = float(np.max(np.diag(G64)))
    if not np.isfinite(s):
        raise ValueError("G has non-finite entries")
    if s <= 0.0:
        return torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
    Q = G64 / s + 1.0
    x = nnqp(Q, -np.ones(T), warm=warm)
    total = x.sum()
    if total <= 0:  # cannot happen for a PSD G; kept as a guard
        raise RuntimeError("min-norm solver failed: the active-set method returned x = 0")
    return torch.as_tensor(x / total, dtype=G.dtype, device=G.device)


def smallest_min_norm_weights(U: np.ndarray, k: np.ndarray, rel_tol: float) -> np.ndarray:
    """Among the minimisers of ``w^T U w`` on the simplex, the one of smallest Euclidean norm,
    given one minimiser ``k`` (float64 numpy; ``U`` symmetric PSD ``[m, m]``).

    Where ``U`` is singular (more rows than their rank, duplicate or colinear rows, or 0 in the
    rows' hull) the minimisers form a polytope; the point ``k^T J`` is the same for all of them,
    but not the weights, and which vertex an active-set solver ends on depends on the order of
    the rows.  The smallest one is unique (a strictly convex norm on a convex set) and
    permutes with the rows.

    The minimisers are ``{w >= 0 : 1^T w = 1, U w = U k}``; with ``U = V diag(s) V^T`` and
    ``V_r`` the eigenvectors of eigenvalues above ``rel_tol * max(s)`` (below it, ``U``'s
    rounding), that is ``C w = C k`` for ``C = [1^T; V_r^T]``.  Writing ``w = w0 + N z`` (``w0``
    the smallest solution of the equalities, ``N`` an orthonormal basis of ``C``'s null space),
    ``||w||^2 = ||w0||^2 + ||z||^2`` and the problem is the least-distance problem
    ``min ||z|| s.t. N z >= -w0``, solved by non-negative least squares (Lawson and Hanson,
    *Solving Least Squares Problems*, 1974, ch. 23, Thm. 23.4) with :func:`nnqp`.  The result
    is checked to be a minimiser (to the same tolerance); otherwise ``k`` is returned.

    Example:
        >>> U = np.ones((3, 3))   # one direction three times: every w on the simplex minimises
        >>> smallest_min_norm_weights(U, np.array([1.0, 0.0, 0.0]), 1e-12)
        array([0.33333333, 0.33333333, 0.33333333])
    """
    m = k.shape[0]
    if m <= 1:
        return k
    U = 0.5 * (U + U.T)
    s, V = np.linalg.eigh(U)
    top = max(float(s[-1]), 0.0)
    Vr = V[:, s > rel_tol * max(top, 1e-300)]
    C = np.vstack([np.full((1, m), m ** -0.5), Vr.T])
    _, sv, Vt = np.linalg.svd(C, full_matrices=True)
    q = int((sv > 1e-9 * sv[0]).sum())
    R, N = Vt[:q], Vt[q:].T
    w0 = R.T @ (R @ k)
    w = w0
    if N.shape[1] > 0 and w0.min() < 0:
        u = nnqp(N @ N.T + np.outer(w0, w0), w0)
        top_r, last_r = N.T @ u, -float(w0 @ u) - 1.0
        if last_r < 0:  # always for a feasible problem (k is feasible)
            w = w0 - N @ (top_r / last_r)
    w = np.maximum(w, 0.0)
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        return k
    w = w / total
    f_k, f_w = float(k @ U @ k), float(w @ U @ w)
    if not f_w <= f_k + 10 * rel_tol * max(top, 1e-300):
        return k
    return w


def min_norm_weights_cvxpy(G: Tensor, solver: str | None = None) -> Tensor:
    """Exact min-norm weights from cvxpy (a QP over the simplex on the normalised Gramian)."""
    import cvxpy as cp

    T = G.shape[0]
    G64 = _as_numpy64(G)
    s = float(np.max(np.diag(G64)))
    if s <= 0.0:
        return torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
    # Factor G / s = L L^T (eigendecomposition: robust to rank deficiency) for a sum-of-squares form.
    evals, evecs = np.linalg.eigh(G64 / s)
    L = evecs * np.sqrt(np.clip(evals, 0.0, None))
    w = cp.Variable(T)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(L.T @ w)), [w >= 0, cp.sum(w) == 1])
    prob.solve(solver=solver)
    if w.value is None or prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"cvxpy min-norm solve failed with status {prob.status!r}")
    x = np.clip(w.value, 0.0, None)
    return torch.as_tensor(x / x.sum(), dtype=G.dtype, device=G.device)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` (``[T]``) onto the probability simplex, sync-free."""
    T = v.shape[-1]
    u, _ = torch.sort(v, descending=True, dim=-1)
    css = torch.cumsum(u, dim=-1) - 1
    k = torch.arange(1, T + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / k) > 0
    rho = cond.sum(dim=-1, keepdim=True).clamp_min(1)
    theta = torch.gather(css, -1, rho - 1) / rho.to(v.dtype)
    w = (v - theta).clamp_min(0)
    # For large |v| the subtraction cancels digits and the sum drifts from 1 by ~|v| eps:
    # renormalise so the result lies on the simplex to rounding (the largest entry is > 0).
    return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def fista(step: Callable[[Tensor], Tensor], project: Callable[[Tensor], Tensor], x0: Tensor,
          iters: int) -> Tensor:
    """``iters`` accelerated projected-gradient steps (FISTA, Beck and Teboulle, SIAM J. Imaging
    Sciences 2009): ``x_{k+1} = project(step(y_k))`` with Nesterov's momentum on ``y``.  ``step``
    is the gradient step ``y - grad f(y) / L``; no host synchronisation.

    Example:
        >>> fista(lambda y: y - (y - 3.0) / 1.0, lambda x: x.clamp_max(2.0), torch.zeros(1), 5)
        tensor([2.])
    """
    x, y, t = x0, x0, 1.0
    for _ in range(iters):
        x_next = project(step(y))
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = x_next + ((t - 1) / t_next) * (x_next - x)
        x, t = x_next, t_next
    return x


def min_norm_weights_pgd(G: Tensor, iters: int = 250) -> Tensor:
    """Approximate min-norm weights by ``iters`` accelerated projected-gradient steps (sync-free).

    The step is ``1 / L`` with ``L`` the trace of the normalised Gramian (an upper bound of its
    largest eigenvalue), so every step stays on the device.
    """
    T = G.shape[0]
    s = torch.diagonal(G).amax().clamp_min(torch.finfo(G.dtype).tiny)
    Gn = G / s
    lip = torch.diagonal(Gn).sum().clamp_min(1e-12)
    w = torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
    return fista(lambda y: y - (Gn @ y) / lip, project_simplex, w, iters)


def dual_cone_weights(G: Tensor, b: Tensor, warm: dict | None = None) -> Tensor:
    """``lam = argmin_{lam >= 0} 1/2 lam^T G lam + lam^T b`` (exact, float64 active set).

    With ``b = J v`` this is the dual of projecting ``v`` onto ``{d : J d >= 0}``: the projection
    is ``d = v + J^T lam``.  ``b`` may be ``[T]`` or ``[T, K]`` (one problem per column; the
    result has the same shape).  ``warm``: a dict the caller keeps between steps, one warm start
    per column (see :func:`nnqp`).

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> v = torch.tensor([1.0, -2.0])
        >>> lam = dual_cone_weights(J @ J.T, J @ v)
        >>> v + lam @ J
        tensor([1., 0.])
    """
    T = G.shape[0]
    squeeze = b.dim() == 1
    B = b.reshape(T, -1)
    G64 = _as_numpy64(G)
    B64 = B.detach().to(device="cpu", dtype=torch.float64).numpy()
    s = float(np.max(np.diag(G64))) if T else 0.0
    out = np.zeros_like(B64)
    if s > 0.0 and np.isfinite(s):
        for k in range(B64.shape[1]):
            out[:, k] = nnqp(G64 / s, B64[:, k] / s,
                             warm=None if warm is None else warm.setdefault(k, {}))
    elif not np.isfinite(s):
        raise ValueError("G has non-finite entries")
    res = torch.as_tensor(out, dtype=G.dtype, device=G.device)
    return res.reshape(T) if squeeze else res


def dual_cone_weights_pgd(G: Tensor, b: Tensor, iters: int = 200) -> Tensor:
    """Approximate :func:`dual_cone_weights` by ``iters`` accelerated projected-gradient steps on
    the device of ``G``, with no host synchronisation.  ``b`` is ``[T]`` or ``[T, K]``.

    The problem is scaled by ``max_i G_ii``; the step is ``1 / trace`` of the scaled Gramian.  From
    ``lam = 0`` a feasible point (``b >= 0``) stays at ``lam = 0`` exactly.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> v = torch.tensor([1.0, -2.0])
        >>> lam = dual_cone_weights_pgd(J @ J.T, J @ v)
        >>> torch.allclose(v + lam @ J, torch.tensor([1.0, 0.0]), atol=1e-5)
        True
    """
    squeeze = b.dim() == 1
    B = b.reshape(G.shape[0], -1)
    s = torch.diagonal(G).amax().clamp_min(torch.finfo(G.dtype).tiny)
    Gn, Bn = G / s, B / s
    lip = torch.diagonal(Gn).sum().clamp_min(1e-12)
    lam = fista(lambda y: y - (Gn @ y + Bn) / lip, lambda x: x.clamp_min(0), torch.zeros_like(Bn),
                iters)
    return lam.reshape(b.shape) if squeeze else lam
