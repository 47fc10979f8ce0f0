"""IMTL-G, impartial gradient balancing (Liu et al., "Towards Impartial Multi-task Learning",
ICLR 2021, Section 3.2 (gradient balance) and Algorithm 1).

IMTL-G seeks the aggregated gradient ``d = sum_t alpha_t g_t`` with ``sum_t alpha_t = 1`` whose
projections onto every task's unit gradient ``u_t = g_t / ||g_t||`` are equal:
``d . u_1 = d . u_t`` for all ``t``.  The paper's closed form is

    alpha_{2:T} = g_1 U^T (D U^T)^{-1},   alpha_1 = 1 - sum_{t >= 2} alpha_t,

with ``U`` the rows ``u_1 - u_t`` and ``D`` the rows ``g_1 - g_t`` (``t = 2..T``).  In Gramian
terms the conditions read ``(G alpha)_t / ||g_t|| = c`` for all ``t``, i.e.
``alpha = c G^{-1} n`` with ``n_t = ||g_t|| = sqrt(G_tt)``, so

    alpha = G^{-1} n / (1^T G^{-1} n),

the same vector whenever ``G`` is invertible (the paper's ``D U^T`` is invertible exactly then).
For singular ``G`` (rank-deficient, duplicate, zero rows) the inverse becomes the Moore-Penrose
pseudo-inverse, as in the generalisation of Quinton and Rey ("Jacobian Descent for
Multi-Objective Optimization", 2024) that TorchJD implements: eigenvalues below
``T * eps * lambda_max`` (``eps`` of ``J``'s dtype) count as zero.  When ``1^T G^+ n`` vanishes
(e.g. two exactly opposite gradients, where no weighting has equal non-zero projections) the
weights are 0 and ``d = 0``, the Pareto-stationary answer.

Computed from ``G`` only, in float64 (a ``T x T`` eigendecomposition, which synchronises with a
CUDA device).  Rescaling the rows by ``k_t > 0`` leaves every ``u_t``, hence the direction, unchanged
up to the factor ``1 / sum_t (alpha_t / k_t)`` that restores ``sum alpha = 1``.  (For ``T >= 3`` with
very unequal norms ``1^T G^{-1} n`` can be negative: the paper's normalisation ``sum alpha = 1``
then gives equal but negative projections; kept as the paper defines it, and reported in
``diagnostics["projections"]``, the values ``d . u_t``.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import WeightedAggregator

__all__ = ["IMTLG", "imtlg_weights"]


def imtlg_weights(G: Tensor, rtol: float | None = None) -> Tensor:
    """IMTL-G's weights ``alpha = G^+ n / (1^T G^+ n)`` (``n_t = sqrt(G_tt)``) from the Gramian.

    Args:
        G: ``[T, T]`` Gramian.
        rtol: eigenvalues at most ``rtol * lambda_max`` are treated as zero; default
            ``T * eps`` of ``G``'s dtype.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]])   # g1 = e1, g2 = 2 e2
        >>> imtlg_weights(G)                              # d = (2/3, 2/3): equal projections
        tensor([0.6667, 0.3333])
    """
    T = G.shape[0]
    eps = torch.finfo(G.dtype).eps
    rtol = T * eps if rtol is None else rtol
    G64 = G.to(torch.float64)
    G64 = 0.5 * (G64 + G64.T)
    n = torch.diagonal(G64).clamp_min(0).sqrt()
    evals, V = torch.linalg.eigh(G64)
    keep = evals > rtol * evals.max().clamp_min(0)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)),
                      torch.zeros_like(evals))
    v = V @ (inv * (V.T @ n))
    s = v.sum()
    # |1^T v| is compared with the size v would have if n were in the range of G; below a
    # rounding-level fraction of it the sum is zero (no equal-projection weighting exists).
    lam_max = evals.max().clamp_min(torch.finfo(torch.float64).tiny)
    scale = n.sum() / lam_max
    ok = s.abs() > 1e3 * T * eps * scale
    w = torch.where(ok, v / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(v))
    return w.to(G.dtype)


class IMTLG(WeightedAggregator):
    """IMTL-G (Liu et al. 2021, Section 3.2): equal projections onto every task's unit gradient.

    Args:
        rtol: relative eigenvalue cut-off of the pseudo-inverse (default ``T * eps`` of the
            dtype of ``J``).

    Computed from ``G = J J^T`` only (see the module docstring for the closed form and the
    pseudo-inverse generalisation).  ``weights`` sum to 1 (or are all 0 when no weighting with
    equal projections exists).  ``diagnostics["projections"]``: ``d . u_t`` per task (0 for a
    zero row); all equal, to ``1 / (1^T G^+ n)``, whenever an equal-projection weighting exists
    (the pseudo-inverse gives the least-squares solution otherwise).

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> d = IMTLG()(J)
        >>> d
        tensor([0.6667, 0.6667])
        >>> J @ d / J.norm(dim=1)      # equal projections onto u_1 and u_2
        tensor([0.6667, 0.6667])
    """

    gramian_only = True

    def __init__(self, rtol: float | None = None) -> None:
        super().__init__()
        if rtol is not None and not (isinstance(rtol, (int, float)) and rtol >= 0):
            raise ValueError(f"rtol must be a non-negative number or None, got {rtol!r}")
        self.rtol = rtol

    def weighting(self, J: Tensor, G: Tensor | None, losses: Tensor | None) -> Tensor:
        assert G is not None
        w = imtlg_weights(G, self.rtol)
        n = torch.diagonal(G).clamp_min(0).sqrt()
        nz = n > 0
        proj = torch.where(nz, (G @ w) / torch.where(nz, n, torch.ones_like(n)),
                           torch.zeros_like(n))
        self.diagnostics = {"projections": proj}
        return w

    def __repr__(self) -> str:
        return f"IMTLG(rtol={self.rtol})"
