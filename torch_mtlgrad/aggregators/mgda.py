"""Min-norm direction (MGDA; Sener and Koltun, *Multi-Task Learning as Multi-Objective
Optimization*, NeurIPS 2018; the tensioner paper, Nakamura, Grassi and Wolf, arXiv:2204.06698,
eq. 2).

``w* = argmin_{w in simplex} ||w^T J||^2`` and ``d = w*^T J``: the minimal-norm element of the
convex hull of the task gradients, a common descent direction unless the point is
Pareto-stationary (then ``d = 0``).  Computed from the Gramian ``G = J J^T`` only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._solvers import MinNormMethod, min_norm_weights

__all__ = ["MinNorm"]

Normalization = Literal["none", "l2", "loss", "loss+"]
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MinNorm(WeightedAggregator):
    """MGDA's min-norm direction (tensioner paper eq. 2).

    Args:
        normalization: how the rows are scaled before the solve, as in Sener and Koltun's code:
            ``"none"`` (default), ``"l2"`` (each row by its norm), ``"loss"`` (by its loss value)
            or ``"loss+"`` (by loss value times norm).  The weights solved on the scaled rows
            are then applied to the rows as given, divided by the same scales:
            ``d = sum_t (w*_t / s_t) g_t``, so ``d`` is the min-norm element of the scaled
            gradients' hull.  Zero rows keep scale 1 (no division by zero).
        method: ``"auto"`` (closed form for T = 2, exact active set otherwise), ``"active-set"``,
            ``"closed-form"``, ``"cvxpy"`` or ``"pgd"`` (fixed iterations, sync-free, approximate);
            see :func:`torch_mtlgrad.aggregators._solvers.min_norm_weights`.
        iters: iterations for ``"pgd"``.

    ``weights`` after a call are the coefficients of ``d`` in the rows of ``J`` (for
    ``"none"`` they are ``w*`` on the simplex).

    The solvers here are exact: at a vertex of the simplex they return exactly ``(1, 0, ...)``.
    Sener and Koltun's reference Frank-Wolfe solver stops near it (e.g. ``0.999 / 0.001``), and
    that residue matters: on the tensioner paper's XOR/AND ablation with ``c = 10`` the exact
    min-norm direction stalls at a Pareto-stationary point (0% of runs converge) where the
    reference solver's leftover 0.001 of the large XOR gradient lets 100% converge
    (the documentation's Reproductions page).

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> MinNorm()(J)
        tensor([0.8000, 0.4000])
    """

    paper = ("Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*, NeurIPS "
             "2018; tensioner paper eq. 2")
    summary = ("min-norm direction in the convex hull of the task gradients (row normalisation "
               "`none`/`l2`/`loss`/`loss+`; closed form for T=2, exact active-set solver, cvxpy, "
               "or fixed-iteration on the device)")

    gramian_only = True

    def __init__(self, normalization: Normalization = "none", method: MinNormMethod = "auto",
                 iters: int = 250) -> None:
        super().__init__()
        # Last supports of the active-set solves: a speed-only cache (each warm start is
        # verified, see _solvers.nnqp), so it is not part of the state.
        self._warm: dict = {}
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization
        self.method = method
        self.iters = iters

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return self.normalization in ("loss", "loss+")

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        scale = self._scales(G, losses)
        Gs = G / (scale[:, None] * scale[None, :])
        w = min_norm_weights(Gs, self.method, iters=self.iters, warm=self._warm)
        self.diagnostics = {"simplex_weights": w, "scales": scale}
        return w / scale

    def _scales(self, G: Tensor, losses: Tensor | None) -> Tensor:
        T = G.shape[0]
        if self.normalization == "none":
            return G.new_ones(T)
        norms = torch.diagonal(G).clamp_min(0).sqrt()
        if self.normalization == "l2":
            s = norms
        else:
            if losses is None:
                raise ValueError(f"normalization {self.normalization!r} needs the loss values")
            s = losses.abs() if self.normalization == "loss" else losses.abs() * norms
        return torch.where(s > 0, s, torch.ones_like(s))

    def __repr__(self) -> str:
        return f"MinNorm(normalization={self.normalization!r}, method={self.method!r})"
