"""CAGrad, conflict-averse gradient descent (Liu et al., "Conflict-Averse Gradient Descent for
Multi-task Learning", NeurIPS 2021, Algorithm 1).

With ``g_0 = (1/T) sum_t g_t`` the average gradient, CAGrad's direction maximises the worst
task's improvement in a ball around ``g_0``:

    max_d min_t g_t . d   subject to   ||d - g_0|| <= c ||g_0||.

Its dual (Algorithm 1) is a problem over the simplex that reads only the Gramian:

    w* = argmin_{w in simplex} F(w) = g_w . g_0 + sqrt(phi) ||g_w||,
    g_w = sum_t w_t g_t,   phi = c^2 ||g_0||^2,

and the direction is ``d = g_0 + (sqrt(phi) / ||g_w*||) g_w*`` (Algorithm 1's update).  In
Gramian terms ``g_w . g_0 = w^T G 1 / T``, ``||g_w||^2 = w^T G w`` and
``||g_0||^2 = 1^T G 1 / T^2``, so the weights of ``d`` are ``1/T + (sqrt(phi)/||g_w*||) w*``.

Solvers for the dual (``method=``):

* ``"closed-form"`` (T = 2; what ``"auto"`` uses there): with ``w = (x, 1 - x)`` the dual is
  ``a x + k sqrt(A x^2 + 2 B x + C) + const``, convex in ``x``; its stationary point has a closed
  form (a quadratic), clipped to ``[0, 1]``.  Pure tensor code on ``G``'s device, no host
  synchronisation.
* ``"cvxpy"`` (what ``"auto"`` uses for T > 2): the dual as a second-order cone program
  ``min b^T w + ||M w||`` (``M = sqrt(phi) L^T`` with ``G = L L^T``) solved by cvxpy with
  ``cvxpy_solver`` (default CLARABEL, which ships with cvxpy), in float64 on the CPU, then
  refined by an active-set Newton method on the KKT system, started from the solver's support
  (kept only when it satisfies the KKT conditions and does not raise the objective): the interior-point answer
  alone is accurate to ~1e-5 in ``w*`` on flat duals, and ``d`` depends linearly on ``w*``.
  The problem is built once per task count with cvxpy parameters and re-solved.  A failed
  solve raises.

Conventions (documented choices):

* ``c`` defaults to 0.4, the value the paper recommends for its NYUv2/Cityscapes experiments;
  ``c = 0`` gives ``d = g_0``; large ``c`` tends to the min-norm (MGDA) direction.
* ``rescale="none"`` (default) is Algorithm 1's update.  The authors' code divides the direction
  by ``1 + c^2`` by default (``rescale="1+c^2"``; LibMTL's default) and offers ``1 + c``
  (``rescale="1+c"``); TorchJD does not rescale.
* Degenerate dual, ``||g_w*|| = 0`` with ``g_0 != 0`` (the optimal value is 0, reached by every
  ``d`` in the ball with ``J d >= 0``; only possible when 0 is in the convex hull of the
  gradients): ``d`` is the point of that set nearest ``g_0``, the projection of ``g_0`` onto
  ``{d : J d >= 0}`` (shared dual-cone solver).  ``g_0 = 0`` gives ``d = 0``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._solvers import dual_cone_weights

__all__ = ["CAGrad", "cagrad_dual_weights"]

Method = Literal["auto", "closed-form", "cvxpy"]
Rescale = Literal["none", "1+c^2", "1+c"]

# Below this norm of g_w* (relative to the largest gradient norm) the dual is degenerate.
_DEGENERATE = 1e-7


def _closed_form_two(Gn: Tensor, b: Tensor, k: Tensor) -> Tensor:
    """Minimiser over the simplex of ``b^T w + k sqrt(w^T Gn w)`` for T = 2 (sync-free)."""
    g11, g12, g22 = Gn[0, 0], Gn[0, 1], Gn[1, 1]
    A = (g11 + g22 - 2 * g12).clamp_min(0)  # ||g1 - g2||^2
    B = g12 - g22  # g2 . (g1 - g2)
    C = g22
    tiny = torch.finfo(Gn.dtype).tiny
    eps = torch.finfo(Gn.dtype).eps
    # Cauchy-Schwarz: A C - B^2 >= 0, = 0 for colinear gradients; from G it is known to about
    # eps A C only, so below that it is 0 (else sqrt turns rounding into ~sqrt(eps) errors).
    delta = A * C - B * B
    delta = torch.where(delta > 16 * eps * A * C, delta, torch.zeros_like(delta))
    a = b[0] - b[1]
    k_safe = k.clamp_min(tiny)
    r = -a / k_safe  # f'(x) = k ((A x + B) / sqrt(q(x)) - r)
    sqrtA = A.sqrt()
    interior = r * r < A
    y = r * torch.sqrt(delta / (A - r * r).clamp_min(tiny))
    x_int = (y - B) / A.clamp_min(tiny)
    x_end = torch.where(r >= sqrtA, torch.ones_like(r), torch.zeros_like(r))  # f' of one sign
    x = torch.where(interior, x_int, x_end)
    # g1 == g2 (A = 0): every weighting gives the same F; take 1/2.
    x = torch.where(A > eps * (g11 + g22), x, torch.full_like(x, 0.5)).clamp(0.0, 1.0)
    return torch.stack([x, 1 - x])


_PROBLEMS: dict[tuple[int, str], Any] = {}


def _cone_projection_two(Gn: Tensor, b: Tensor) -> Tensor:
    """``argmin_{lam >= 0} 1/2 lam^T Gn lam + lam^T b`` for T = 2 by its KKT cases (sync-free).

    With ``b = J g_0`` (here in normalised units) ``g_0 + lam^T J`` is the projection of ``g_0``
    onto ``{d : J d >= 0}``.
    """
    g11, g12, g22 = Gn[0, 0], Gn[0, 1], Gn[1, 1]
    tiny = torch.finfo(Gn.dtype).tiny
    tol = 1e3 * torch.finfo(Gn.dtype).eps * (g11 + g22)
    zero = torch.zeros_like(g11)
    # Case 1: only constraint 1 active; case 2: only constraint 2; case 3: both.
    l1 = torch.where(g11 > tiny, (-b[0]).clamp_min(0) / g11.clamp_min(tiny), zero)
    ok1 = g12 * l1 + b[1] >= -tol
    l2 = torch.where(g22 > tiny, (-b[1]).clamp_min(0) / g22.clamp_min(tiny), zero)
    ok2 = g12 * l2 + b[0] >= -tol
    det = g11 * g22 - g12 * g12
    det_safe = torch.where(det.abs() > tiny, det, torch.ones_like(det))
    m1 = ((-b[0]) * g22 + b[1] * g12) / det_safe
    m2 = ((-b[1]) * g11 + b[0] * g12) / det_safe
    both = torch.stack([m1, m2]).clamp_min(0)
    free = (b >= -tol).all()
    lam = torch.where(free, torch.zeros_like(b),
                      torch.where(ok1, torch.stack([l1, zero]),
                                  torch.where(ok2, torch.stack([zero, l2]), both)))
    return lam


def _cvxpy_dual(Gn: np.ndarray, b: np.ndarray, k: float, solver: str) -> np.ndarray:
    """Minimiser over the simplex of ``b^T w + k sqrt(w^T Gn w)`` by cvxpy (float64, CPU)."""
    import cvxpy as cp

    T = Gn.shape[0]
    key = (T, solver)
    if key not in _PROBLEMS:
        w = cp.Variable(T)
        b_p = cp.Parameter(T)
        M_p = cp.Parameter((T, T))
        prob = cp.Problem(cp.Minimize(b_p @ w + cp.norm(M_p @ w, 2)), [w >= 0, cp.sum(w) == 1])
        _PROBLEMS[key] = (prob, w, b_p, M_p)
    prob, w, b_p, M_p = _PROBLEMS[key]
    evals, evecs = np.linalg.eigh(Gn)
    L = evecs * np.sqrt(np.clip(evals, 0.0, None))  # Gn = L L^T
    b_p.value = b
    M_p.value = k * L.T
    try:
        prob.solve(solver=solver)
    except Exception as e:  # cvxpy raises SolverError and others
        raise RuntimeError(f"CAGrad: the cvxpy solve of the dual ({solver}) failed: {e}") from e
    if w.value is None or prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"CAGrad: the cvxpy solve of the dual ({solver}) ended with status "
                           f"{prob.status!r}")
    x = np.clip(np.asarray(w.value, dtype=np.float64), 0.0, None)
    return _polish(Gn, b, k, x / x.sum())


def _dual_objective(Gn: np.ndarray, b: np.ndarray, k: float, w: np.ndarray) -> float:
    return float(w @ b + k * np.sqrt(max(float(w @ Gn @ w), 0.0)))


def _polish(Gn: np.ndarray, b: np.ndarray, k: float, w: np.ndarray, iters: int = 60) -> np.ndarray:
    """Active-set Newton refinement of the dual's minimiser, started from the solver's ``w``.

    An interior-point solution is accurate to ~1e-5 in ``w`` on flat duals, and ``d`` depends
    linearly on ``w``.  On a support ``S`` the dual is smooth (``g_w != 0``) and its optimum
    solves ``b_S + k G_SS w_S / ||g_w|| = mu 1``, ``1^T w_S = 1``; Newton converges in a few
    steps.  A step that would leave the simplex stops at its boundary and drops the weight that
    reaches zero; at a stationary point a weight off the support whose partial derivative is
    below ``mu`` (a violated KKT condition) joins the support.  The refined point is kept only if
    it satisfies the KKT conditions and does not increase the objective; otherwise ``w`` is
    returned unchanged.
    """
    T = w.size
    tol = 1e-9 * (np.abs(b).max() + k)
    S = w > 1e-7
    if not S.any():
        return w
    x = np.where(S, w, 0.0)
    x /= x.sum()
    for _ in range(iters):
        idx = np.flatnonzero(S)
        m = idx.size
        xs = x[idx]
        Gs = Gn[np.ix_(idx, idx)]
        Gw = Gs @ xs
        n = float(np.sqrt(max(xs @ Gw, 0.0)))
        if n <= _DEGENERATE:
            return w
        grad = b[idx] + k * Gw / n
        mu = float(grad.mean())
        if np.abs(grad - mu).max() > tol:  # not stationary on S yet: a Newton step
            H = k * (Gs / n - np.outer(Gw, Gw) / n**3)
            K = np.zeros((m + 1, m + 1))
            K[:m, :m] = H
            K[:m, m] = -1.0
            K[m, :m] = 1.0
            rhs = -np.concatenate([grad - mu, [xs.sum() - 1.0]])
            step = np.linalg.lstsq(K, rhs, rcond=None)[0][:m]
            neg = step < 0
            ratio = np.full(m, np.inf)
            ratio[neg] = xs[neg] / -step[neg]
            t = min(1.0, float(ratio.min()))
            xs = xs + t * step
            if t < 1.0:  # the step hit the boundary: drop the weight that reached zero
                j = int(np.argmin(ratio))
                xs[j] = 0.0
                S[idx[j]] = False
            xs = np.clip(xs, 0.0, None)
            x = np.zeros(T)
            x[idx] = xs / xs.sum()
            S &= x > 0
            continue
        full = b + k * (Gn @ x) / n  # stationary on S: check the weights off the support
        off = np.flatnonzero(~S)
        if off.size == 0 or full[off].min() >= mu - tol:
            break
        S[off[int(np.argmin(full[off]))]] = True
    n = float(np.sqrt(max(x @ Gn @ x, 0.0)))
    if n <= _DEGENERATE:
        return w
    grad = b + k * (Gn @ x) / n
    mu = float(grad[S].mean())
    kkt = np.abs(grad[S] - mu).max() <= tol and np.all(grad[~S] >= mu - tol)
    if kkt and _dual_objective(Gn, b, k, x) <= _dual_objective(Gn, b, k, w) + 1e-15:
        return x
    return w


def cagrad_dual_weights(G: Tensor, c: float, method: Method = "auto",
                        cvxpy_solver: str = "CLARABEL") -> tuple[Tensor, Tensor]:
    """Solve CAGrad's dual on the Gramian; returns ``(w*, weights of d)``.

    ``w*`` is on the simplex (Algorithm 1's ``w``); the weights ``alpha`` give
    ``d = alpha^T J = g_0 + (sqrt(phi) / ||g_w*||) g_w*`` (no rescaling).

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 1.0]])   # orthogonal unit gradients
        >>> w, alpha = cagrad_dual_weights(G, c=0.4)
        >>> w, alpha                                      # symmetric: d = (0.7, 0.7)
        (tensor([0.5000, 0.5000]), tensor([0.7000, 0.7000]))
    """
    T = G.shape[0]
    if G.shape != (T, T):
        raise ValueError(f"G must be square [T, T], got shape {tuple(G.shape)}")
    if method == "auto":
        method = "closed-form" if T == 2 else "cvxpy"
    if method not in ("closed-form", "cvxpy"):
        raise ValueError(f"unknown CAGrad method {method!r}; use 'auto', 'closed-form' or 'cvxpy'")
    if method == "closed-form" and T != 2:
        raise ValueError(f"CAGrad's closed form needs T = 2 tasks, got T = {T}")
    uniform = torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
    if T == 1:
        return torch.ones_like(uniform), uniform * (1 + c)
    G64 = G.to(torch.float64)
    G64 = 0.5 * (G64 + G64.T)
    s = torch.diagonal(G64).max()
    tiny = torch.finfo(torch.float64).tiny
    Gn = G64 / s.clamp_min(tiny)  # scale-free: the weights do not depend on the scale of J
    b = Gn.mean(dim=1)  # g_t . g_0
    k = c * b.mean().clamp_min(0).sqrt()  # sqrt(phi) = c ||g_0||
    if method == "closed-form":
        w = _closed_form_two(Gn, b, k)
        gw = (w @ Gn @ w).clamp_min(0).sqrt()
        u = uniform.to(torch.float64)
        alpha = u + (k / gw.clamp_min(tiny)) * w
        # Degenerate dual (g_w* = 0: a zero row, or opposite colinear rows with c >= 1):
        # the projection of g_0 onto {d : J d >= 0}.
        alpha = torch.where(gw > _DEGENERATE, alpha, u + _cone_projection_two(Gn, b))
        alpha = torch.where((k > 0) & (s > 0), alpha, u)  # g_0 = 0 or c = 0: d = g_0
        return w.to(G.dtype), alpha.to(G.dtype)
    if not bool(torch.isfinite(s)):
        raise ValueError("G has non-finite entries")
    if float(s) <= 0.0 or float(k) <= 0.0:  # J = 0, g_0 = 0 or c = 0: d = g_0
        return uniform.clone(), uniform.clone()
    Gn_np = Gn.cpu().numpy()
    w_np = _cvxpy_dual(Gn_np, b.cpu().numpy(), float(k), cvxpy_solver)
    gw = math.sqrt(max(float(w_np @ Gn_np @ w_np), 0.0))
    if gw > _DEGENERATE:
        alpha_np = 1.0 / T + (float(k) / gw) * w_np
        alpha = torch.as_tensor(alpha_np, dtype=G.dtype, device=G.device)
    else:
        alpha = uniform + dual_cone_weights(Gn, b).to(G.dtype).to(G.device)
    return torch.as_tensor(w_np, dtype=G.dtype, device=G.device), alpha


class CAGrad(WeightedAggregator):
    """Conflict-averse gradient descent (CAGrad, Algorithm 1).

    Args:
        c: radius of the ball around ``g_0``, relative to ``||g_0||``; ``c >= 0``, default 0.4.
        rescale: ``"none"`` (default, Algorithm 1), ``"1+c^2"`` or ``"1+c"``: divide ``d`` by
            that factor as the authors' code does (see the module docstring).
        method: dual solver: ``"auto"`` (closed form for T = 2, cvxpy otherwise),
            ``"closed-form"`` or ``"cvxpy"``.
        cvxpy_solver: the cvxpy solver for ``method="cvxpy"`` (default ``"CLARABEL"``).

    Computed from ``G = J J^T`` only.  With ``rescale="none"`` the direction satisfies
    ``||d - g_0|| <= c ||g_0||`` and ``min_t g_t . d >= min_t g_t . g_0``.
    ``diagnostics``: ``dual_weights`` (``w*``) and ``min_improvement`` (``min_t g_t . d``).

    Example:
        >>> import torch
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> CAGrad(c=0.5)(J)
        tensor([0.1835, 1.2041, 1.2041])
    """

    paper = "Liu et al., *Conflict-Averse Gradient Descent for Multi-task Learning*, NeurIPS 2021"
    summary = "conflict-averse gradient descent, `c = 0.4` (closed form for T=2, cvxpy otherwise)"

    gramian_only = True

    def __init__(self, c: float = 0.4, rescale: Rescale = "none", method: Method = "auto",
                 cvxpy_solver: str = "CLARABEL") -> None:
        super().__init__()
        if not (isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0
                and math.isfinite(c)):
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        if rescale not in ("none", "1+c^2", "1+c"):
            raise ValueError(f"rescale must be 'none', '1+c^2' or '1+c', got {rescale!r}")
        if method not in ("auto", "closed-form", "cvxpy"):
            raise ValueError(f"method must be 'auto', 'closed-form' or 'cvxpy', got {method!r}")
        self.c = float(c)
        self.rescale = rescale
        self.method = method
        self.cvxpy_solver = cvxpy_solver

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        w, alpha = cagrad_dual_weights(G, self.c, self.method, self.cvxpy_solver)
        if self.rescale == "1+c^2":
            alpha = alpha / (1 + self.c**2)
        elif self.rescale == "1+c":
            alpha = alpha / (1 + self.c)
        self.diagnostics = {"dual_weights": w, "min_improvement": (G @ alpha).min()}
        return alpha

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c}, rescale={self.rescale!r}, method={self.method!r})"
