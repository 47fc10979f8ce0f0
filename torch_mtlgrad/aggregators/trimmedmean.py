"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran and Bartlett, *Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates*, ICML 2018, Definition 2 and
Algorithm 1 "option II").

For each coordinate ``k`` of the gradients, sort the ``T`` values ``J[:, k]``, remove the ``b``
largest and the ``b`` smallest and average the ``T - 2b`` that remain:

    d_k = 1 / (T - 2b) * sum_{t in U_k} J[t, k],

``U_k`` the rows left in column ``k`` after the trimming.  The paper writes the trimming as a
fraction ``beta`` of the ``m`` machines (``b = beta m``, ``beta < 1/2``) and proves the robustness
for ``beta`` at least the fraction of Byzantine machines; this class takes the count ``b``
(``trim_number``), as TorchJD does.  ``b = 0`` is the mean of the rows; the largest ``b`` that
leaves a value, ``floor((T - 1) / 2)``, is the coordinate-wise median (the paper's other
estimator, "option I").

Choices the paper leaves open:

* ``trim_number=None`` (the default) trims one value at each end where there are at least 3
  rows, and nothing for 1 or 2 rows (where there is nothing to trim away from): the method then
  builds for any number of tasks.  An explicit ``trim_number=b`` needs ``T >= 2b + 1`` rows
  (present tasks), else a ``ValueError``.
* Ties (equal values in a column) need no rule: the trimmed values are the same whichever of
  the tied rows is dropped, so the result does not depend on the order of the tasks, bit for
  bit.

It reads ``J`` itself (each coordinate separately) and is not a combination of the rows:
``weights`` is ``None``.  Each coordinate of ``d`` lies between the smallest and the largest
value of its column, so ``d`` has a mean's scale (``g`` on equal rows ``g``), but it is no
convex combination of the rows: its scale convention is ``"unnormalised"``.  Not
non-conflicting; invariant under permutations of the tasks and positively homogeneous.  No
host synchronisation (one sort along the task axis).

Agreement with TorchJD 0.18 (``torchjd.aggregation.TrimmedMean(trim_number=b)``): the same
rule and the same count convention; the same numbers for every explicit ``b`` (its
``trim_number`` is required, ours defaults as above).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Aggregator

__all__ = ["TrimmedMean"]


def _check_count(value: object, name: str) -> int:
    """A non-negative ``int`` (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the
    ``trim_number`` largest and smallest values of the ``T`` rows and average the rest.

    Args:
        trim_number: ``b``, the number of values removed at each end of every column (``2b``
            in all); ``None`` (default): 1 when there are at least 3 rows, else 0.  An explicit
            ``b`` needs at least ``2b + 1`` rows.

    Reads ``J`` itself; ``weights`` is ``None`` (the result is not a combination of the rows).

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 10.0], [2.0, -3.0], [100.0, 0.0]])
        >>> TrimmedMean()(J)              # per column the middle value of three
        tensor([2., 0.])
        >>> TrimmedMean(trim_number=0)(J) # the mean of the rows
        tensor([34.3333,  2.3333])
    """

    paper = ("Yin, Chen, Ramchandran & Bartlett, *Byzantine-Robust Distributed Learning: "
             "Towards Optimal Statistical Rates*, ICML 2018")
    summary = ("coordinate-wise trimmed mean: per coordinate, drop the b largest and b smallest "
               "task values and average the rest")

    def __init__(self, trim_number: int | None = None) -> None:
        super().__init__()
        self.trim_number = None if trim_number is None else _check_count(trim_number,
                                                                          "trim_number")

    def trim_for(self, T: int) -> int:
        """The ``b`` used for ``T`` rows (the default's rule, or the explicit value checked)."""
        if self.trim_number is None:
            return 1 if T >= 3 else 0
        b = self.trim_number
        if T < 2 * b + 1:
            raise ValueError(
                f"TrimmedMean(trim_number={b}) needs at least 2 * {b} + 1 = {2 * b + 1} rows "
                f"(present tasks) to leave a value after trimming, got {T}: pass a smaller "
                "trim_number, or trim_number=None (1 from 3 rows on, else 0)")
        return b

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        T = J.shape[0]
        b = self.trim_for(T)
        self.weights = None
        self.diagnostics = {}
        # Sorted even for b = 0: the sum then runs in one order whatever the order of the tasks.
        return torch.sort(J, dim=0).values[b:T - b].mean(dim=0)

    def __repr__(self) -> str:
        return f"TrimmedMean(trim_number={self.trim_number})"
