"""Central direction (Nakamura, Grassi and Wolf, *Leveraging convergence behavior to balance
conflicting tasks in multi-task learning*, arXiv:2204.06698, 2022: the tensioner paper, eq. 3-4).

With unit rows ``u_m = g_m / ||g_m||``, ``k* = argmin_{k in simplex} ||k^T U||^2`` (eq. 3) and

    v = gamma * sum_m k*_m u_m,   gamma = 1 / sum_m (k*_m / ||g_m||)          (eq. 4)

so ``v = sum_m c_m g_m`` with ``c_m = gamma k*_m / ||g_m||`` >= 0 summing to 1: a convex
combination of the gradients that lies in the central region of their cone.  (The paper prints
``||u_m||`` in gamma, which is 1; the authors' code uses ``||g_m||``, and so does this one.)  For two tasks
it is the bisector ``(g1 ||g2|| + g2 ||g1||) / (||g1|| + ||g2||)``.  Computed from ``G`` only.

Eq. 3's minimiser is not unique where the unit rows' Gramian is singular (more tasks than the
rank of ``J``, colinear rows, 0 in their hull), and eq. 4's ``gamma`` depends on the one taken:
this implementation takes the minimiser of smallest Euclidean norm, which is unique and does not
depend on the order of the tasks (see :func:`central_weights`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._solvers import (
    MinNormMethod,
    combine64,
    gramian64,
    min_norm_weights,
    smallest_min_norm_weights,
)

__all__ = ["Central", "central_weights"]


def central_weights(G: Tensor, method: MinNormMethod = "auto", iters: int = 250) -> Tensor:
    """The convex weights ``c`` of the central direction ``v = c^T J`` from ``G`` (eq. 3-4).

    Tasks with a zero gradient get weight 0 (no unit vector exists; any direction is feasible for
    them); when every row is zero the weights are uniform and ``v = 0``.

    Which minimiser of eq. 3: where the unit rows' Gramian is singular (more tasks than the rank
    of ``J``, duplicate or colinear rows, 0 in the unit rows' hull) eq. 3 has many minimisers
    ``k*``: they give the same point ``k*^T U`` but not the same ``gamma`` (eq. 4), so ``v``
    would depend on the one the solver ends on, and so on the order of the tasks.  The exact
    methods (``"auto"``, ``"active-set"``, ``"cvxpy"``) take the minimiser of smallest Euclidean
    norm (:func:`~torch_mtlgrad.aggregators._solvers.smallest_min_norm_weights`), which is
    unique and permutes with the tasks: e.g. ``n`` colinear rows share their weight equally, as
    ``n`` equal rows do.  Eigenvalues of the unit Gramian below ``10 T eps`` of its largest
    (``eps`` of ``G``'s dtype) are taken as its rounding.  ``"pgd"`` is approximate and keeps
    whatever minimiser its iterations approach.  Computed in float64 (``"pgd"``: in ``G``'s
    dtype, on its device); returned in ``G``'s dtype.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> central_weights(G)
        tensor([0.6667, 0.3333])
    """
    T = G.shape[0]
    out_dtype = G.dtype
    if method != "pgd":
        G = G.to(torch.float64)
    norms = torch.diagonal(G).clamp_min(0).sqrt()
    tiny = torch.finfo(G.dtype).tiny
    nz = norms > tiny * 1e3
    safe = torch.where(nz, norms, torch.ones_like(norms))
    U = G / (safe[:, None] * safe[None, :])
    U = torch.where(nz[:, None] & nz[None, :], U, torch.zeros_like(U))
    if T == 2 and method == "auto":
        # Bisector (eq. 4 for T = 2): k* = (1/2, 1/2) on unit vectors, c_m proportional to 1/||g_m||
        # (also the smallest minimiser when u_1 = u_2 and every k minimises).
        k = torch.where(nz, torch.ones_like(norms), torch.zeros_like(norms))
    elif method == "pgd":
        # Sync-free: a zero row gets a large self-product so the solve leaves it out.
        k = min_norm_weights(U + torch.diag((~nz).to(G.dtype) * 1e4), method, iters=iters) * nz
    else:
        idx = nz.nonzero().flatten()
        k = torch.zeros_like(norms)
        if idx.numel() > 0:
            Us = U[idx][:, idx]
            k1 = min_norm_weights(Us, method, iters=iters)
            rel_tol = 10 * T * torch.finfo(out_dtype).eps
            Un = Us.detach().cpu().numpy()
            kc = smallest_min_norm_weights(Un, k1.detach().cpu().numpy(), rel_tol)
            k[idx] = torch.as_tensor(kc, dtype=G.dtype, device=G.device)
    inv = torch.where(nz, k / safe, torch.zeros_like(k))
    total = inv.sum()
    uniform = torch.full_like(norms, 1.0 / T)
    c = torch.where(total > 0, inv / total.clamp_min(tiny), uniform)
    return c.to(out_dtype)


class Central(WeightedAggregator):
    """The central direction of the task gradients (tensioner paper eq. 3-4).

    Args:
        method: min-norm solver for eq. 3 (see :class:`MinNorm`); T = 2 uses the bisector.
        iters: iterations for ``method="pgd"``.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> Central()(J)   # the bisector: equal angles to both gradients
        tensor([0.6667, 0.6667])
    """

    paper = ("Nakamura, Grassi & Wolf, *Leveraging convergence behavior to balance conflicting "
             "tasks in multi-task learning*, arXiv 2022, eq. 3-4")
    summary = "central direction: min-norm of the unit gradients, rescaled to a convex combination"

    gramian_only = True

    def __init__(self, method: MinNormMethod = "auto", iters: int = 250) -> None:
        super().__init__()
        self.method = method
        self.iters = iters

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        # G accumulated and v = c^T J summed in float64 (see UPGrad): a float32 G rounds the unit
        # Gramian to ~1e-7, and eq. 3's minimum moves by that much, the direction by its root.
        G = gramian64(J)
        c = central_weights(G, self.method, self.iters)
        self.weights = c.to(J.dtype)
        self.gramian = G
        return combine64(c, J)

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        return central_weights(G, self.method, self.iters)

    def __repr__(self) -> str:
        return f"Central(method={self.method!r})"
