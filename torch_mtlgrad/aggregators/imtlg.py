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

Numerics and singular cases (documented choices):

* It is computed on the cosine matrix ``C = N^{-1} G N^{-1}`` (``N = diag(n)``):
  ``G^{-1} n = N^{-1} C^{-1} 1``.  ``C`` does not change when rows are rescaled, so neither does
  the accuracy: on ``G`` itself, rows of very different norms square the condition number.
* Singular ``C`` (rank-deficient, duplicate or zero rows) uses the Moore-Penrose pseudo-inverse,
  eigenvalues at most ``T * eps * lambda_max`` (``eps`` of ``J``'s dtype) counting as zero; a zero
  gradient has no unit vector and gets weight 0.  This is the pseudo-inverse generalisation of
  Quinton and Rey ("Jacobian Descent for Multi-Objective Optimization", 2024) taken on ``C``
  instead of ``G``; TorchJD takes ``G^+ n``.  Both solve the equal-projection conditions and
  give the same weights whenever ``G`` is invertible; for dependent rows every solution gives
  the same line ``J^T G^+ n`` but ``sum alpha = 1`` fixes different multiples of it.
* When ``1`` has no component in the range of ``C`` (e.g. two exactly opposite gradients, where
  no weighting has equal non-zero projections) the weights are 0 and ``d = 0``, the
  Pareto-stationary answer.

Computed from ``G`` only, in float64 (a ``T x T`` eigendecomposition, which synchronises with a
CUDA device).  Rescaling the rows by ``k_t > 0`` leaves every ``u_t``, hence the direction,
unchanged up to the factor ``1 / sum_t (alpha_t / k_t)`` that restores ``sum alpha = 1``.  (For
``T >= 3`` with very unequal norms ``1^T G^{-1} n`` can be negative: the paper's normalisation
``sum alpha = 1`` then gives equal but negative projections; kept as the paper defines it, and
reported in ``diagnostics["projections"]``, the values ``d . u_t``.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import WeightedAggregator

__all__ = ["IMTLG", "cosines64", "imtlg_weights"]


def cosines64(G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``G`` in float64 (symmetrised), the inverse row norms ``1 / ||g_t||`` (0 for a zero row,
    which has no unit vector) and the cosine matrix ``C = N^{-1} G N^{-1}`` (its zero rows and
    columns at zero gradients): what the methods built on the unit gradients read.

    Example:
        >>> cosines64(torch.tensor([[4.0, 2.0], [2.0, 1.0]]))[2]
        tensor([[1., 1.],
                [1., 1.]], dtype=torch.float64)
    """
    G64 = G.to(torch.float64)
    G64 = 0.5 * (G64 + G64.T)
    n = torch.diagonal(G64).clamp_min(0).sqrt()
    nz = n > torch.finfo(G.dtype).tiny ** 0.5
    inv_n = torch.where(nz, 1.0 / torch.where(nz, n, torch.ones_like(n)), torch.zeros_like(n))
    return G64, inv_n, G64 * inv_n[:, None] * inv_n[None, :]


def imtlg_weights(G: Tensor, rtol: float | None = None) -> Tensor:
    """IMTL-G's weights ``alpha = G^{-1} n / (1^T G^{-1} n)`` (``n_t = sqrt(G_tt)``) from ``G``.

    Computed through the cosine matrix ``C = N^{-1} G N^{-1}`` (``N = diag(n)``), for which
    ``G^{-1} n = N^{-1} C^{-1} 1``; singular ``C`` uses its pseudo-inverse.  See the module
    docstring.

    Args:
        G: ``[T, T]`` Gramian.
        rtol: eigenvalues of ``C`` at most ``rtol * lambda_max`` are treated as zero; default
            ``T * eps`` of ``G``'s dtype.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]])   # g1 = e1, g2 = 2 e2
        >>> imtlg_weights(G)                              # d = (2/3, 2/3): equal projections
        tensor([0.6667, 0.3333])
    """
    T = G.shape[0]
    eps = torch.finfo(G.dtype).eps
    rtol = T * eps if rtol is None else rtol
    _, inv_n, C = cosines64(G)  # zero rows/columns of C for zero gradients
    evals, V = torch.linalg.eigh(C)
    keep = evals > rtol * evals.max().clamp_min(0)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)),
                      torch.zeros_like(evals))
    ones = (inv_n > 0).to(torch.float64)
    v_unit = V @ (inv * (V.T @ ones))  # weights of the unit gradients u_t
    v = v_unit * inv_n  # weights of the gradients g_t
    s = v.sum()
    # C is scale-free (|C_ij| <= 1), so v_unit at rounding level means 1 has no component in
    # C's range: no weighting has equal non-zero projections.  A sum at rounding level cannot
    # be normalised to 1 either.  Both give the zero weighting (d = 0).
    tol = 1e3 * T * eps
    ok = (v_unit.abs().sum() > tol) & (s.abs() > tol * v.abs().sum())
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

    paper = "Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021"
    summary = "IMTL-G: equal projections of the direction onto every unit task gradient"

    gramian_only = True

    def __init__(self, rtol: float | None = None) -> None:
        super().__init__()
        if rtol is not None and not (isinstance(rtol, (int, float)) and rtol >= 0):
            raise ValueError(f"rtol must be a non-negative number or None, got {rtol!r}")
        self.rtol = rtol

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
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
