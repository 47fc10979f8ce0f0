"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer, *Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent*, NeurIPS 2017, Sec. 4 and Sec. 5).

Of ``n = T`` gradients at most ``f`` (``n_byzantine``) may be arbitrary.  For each row ``i``, let
``i -> j`` mean that ``g_j`` is one of the ``n - f - 2`` rows closest to ``g_i`` (``j != i``); the
score of ``i`` is

    s(i) = sum_{i -> j} ||g_i - g_j||^2,

and Krum returns the row of smallest score, ``d = g_{i*}``.  Multi-Krum (``n_selected = m``)
returns the average of the ``m`` rows of smallest scores.  The paper proves Krum
``(alpha, f)``-Byzantine resilient for ``2f + 2 < n``.

The distances come from the Gramian, ``||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij`` (clamped at 0
against rounding), so the weights are computed from ``G = J J^T`` only: one-hot (``1/m`` on the
``m`` selected rows), summing to 1, a ``"convex"`` scale.  Everything stays on ``G``'s device:
no host synchronisation.

Choices the paper leaves open:

* ``n_byzantine`` defaults to 0 (no adversary assumed: the score then sums the squared distances
  to the ``n - 2`` closest other rows, and Krum picks the most central row).  With
  ``n_byzantine = f >= 1`` a call needs ``n >= 2f + 3`` rows (present tasks), the paper's
  condition, else a ``ValueError``.  With ``f = 0`` and ``n <= 2`` rows no neighbour is counted:
  every score is 0 and the rows tie (next point).
* Ties.  Scores equal up to rounding (within ``8 n k eps max_t G_tt``, ``k`` the number of
  neighbours counted) are one score: the rows of a tie at the ``m``-th place share the weight
  left for them equally.  So the weights do not depend on the order of the tasks (duplicate
  rows tie exactly), and ``n`` equal rows ``g`` give ``g``.

Against TorchJD 0.18 (``torchjd.aggregation.Krum(n_byzantine, n_selected)``): TorchJD's score
sums the distances ``||g_i - g_j||``, not their squares, and breaks ties by position; it requires
only ``n >= f + 3``.  Both give the same weights whenever the two scores select the same rows
(the test checks it); where they differ, this class follows the paper's squared distances.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import WeightedAggregator
from .trimmedmean import _check_count

__all__ = ["Krum", "krum_scores"]


def krum_scores(G: Tensor, n_byzantine: int = 0) -> Tensor:
    """Each row's score ``s(i)``: the sum of the squared distances to its ``n - f - 2`` closest
    other rows (none when that count is below 1), from the Gramian ``G`` (``[n, n]``).

    Example:
        >>> J = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
        >>> krum_scores(J @ J.T)   # n - 2 = 1 neighbour each
        tensor([1., 1., 9.])
    """
    n = G.shape[0]
    k = n - n_byzantine - 2
    if k < 1:
        return G.new_zeros(n)
    sq = torch.diagonal(G)
    dist2 = (sq[:, None] + sq[None, :] - 2.0 * G).clamp_min(0.0)
    dist2 = dist2.fill_diagonal_(float("inf"))  # j != i
    return torch.sort(dist2, dim=1).values[:, :k].sum(dim=1)


class Krum(WeightedAggregator):
    """Krum / Multi-Krum (Blanchard et al., NeurIPS 2017): the row (or the average of the
    ``n_selected`` rows) whose squared distances to its ``n - f - 2`` closest rows sum least.

    Args:
        n_byzantine: ``f``, the number of rows that may be adversarial (default 0); ``f >= 1``
            needs at least ``2f + 3`` rows.
        n_selected: ``m``, the number of rows averaged (default 1: Krum; ``m > 1``: Multi-Krum);
            at most the number of rows.

    Computed from ``G = J J^T`` only.  ``weights``: ``1/m`` on the selected rows (ties at the
    ``m``-th place share, see the module docstring); ``diagnostics["scores"]``: the scores.

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.9, -0.1], [-5.0, 8.0]])
        >>> Krum(n_byzantine=0)(J)    # the most central of the three close rows
        tensor([1., 0.])
        >>> Krum(n_selected=3)(J)     # Multi-Krum: the mean of the three best
        tensor([1., 0.])
    """

    gramian_only = True
    paper = ("Blanchard, El Mhamdi, Guerraoui & Stainer, *Machine Learning with Adversaries: "
             "Byzantine Tolerant Gradient Descent*, NeurIPS 2017")
    summary = ("Krum / Multi-Krum: the row(s) whose squared distances to the n - f - 2 closest "
               "other rows sum least (Byzantine-robust selection)")

    def __init__(self, n_byzantine: int = 0, n_selected: int = 1) -> None:
        super().__init__()
        self.n_byzantine = _check_count(n_byzantine, "n_byzantine")
        self.n_selected = _check_count(n_selected, "n_selected")
        if self.n_selected < 1:
            raise ValueError(f"n_selected must be at least 1, got {n_selected!r}")

    def _check_rows(self, n: int) -> None:
        f, m = self.n_byzantine, self.n_selected
        if f >= 1 and n < 2 * f + 3:
            raise ValueError(
                f"Krum(n_byzantine={f}) needs at least 2 * {f} + 3 = {2 * f + 3} rows (present "
                f"tasks; Blanchard et al. require n > 2f + 2), got {n}: pass a smaller "
                "n_byzantine")
        if m > n:
            raise ValueError(f"Krum(n_selected={m}) needs at least {m} rows (present tasks), got "
                             f"{n}: pass a smaller n_selected")

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        n, m = num_tasks, self.n_selected
        self._check_rows(n)
        scores = krum_scores(G, self.n_byzantine)
        k = max(n - self.n_byzantine - 2, 1)
        eps = torch.finfo(G.dtype).eps
        tol = 8 * n * k * eps * torch.diagonal(G).max().clamp_min(0.0)
        cut = torch.kthvalue(scores, m).values  # the m-th smallest score
        better = scores < cut - tol
        tied = (scores - cut).abs() <= tol
        share = (m - better.sum()).to(G.dtype) / tied.sum().to(G.dtype)
        w = torch.where(better, 1.0, torch.where(tied, share, 0.0)).to(G.dtype) / m
        self.diagnostics = {"scores": scores}
        return w

    def __repr__(self) -> str:
        return f"Krum(n_byzantine={self.n_byzantine}, n_selected={self.n_selected})"
