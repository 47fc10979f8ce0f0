"""Relative multi-task improvement over a baseline, as the papers (and LibMTL) report it.

    Delta_m = (100 / K) * sum_k (-1)^{l_k} (M_k - B_k) / B_k

over ``K`` metrics ``M_k`` with baseline values ``B_k`` (usually single-task networks), where
``l_k = 1`` when lower is better for metric ``k`` (losses, errors) and ``0`` when higher is better
(accuracy).  Positive means better than the baseline on average (Maninis et al., CVPR 2019; used
by the CoNAL, MPPS and NORMAL papers' tables).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["delta_m"]


def delta_m(metrics: Sequence[float], baseline: Sequence[float],
            higher_is_better: Sequence[bool]) -> float:
    """``Delta_m`` in percent.

    Example:
        >>> delta_m([0.90, 0.20], [0.80, 0.25], [True, False])   # +12.5% and +20%
        16.25
    """
    if not (len(metrics) == len(baseline) == len(higher_is_better)) or not metrics:
        raise ValueError(
            f"metrics, baseline and higher_is_better must be non-empty and of equal length, got "
            f"{len(metrics)}, {len(baseline)}, {len(higher_is_better)}"
        )
    total = 0.0
    for k, (m, b, up) in enumerate(zip(metrics, baseline, higher_is_better)):
        if b == 0:
            raise ValueError(f"baseline value of metric {k} is 0: the relative change is undefined")
        sign = 1.0 if up else -1.0
        total += sign * (m - b) / abs(b)
    return round(100.0 * total / len(metrics), 12)
