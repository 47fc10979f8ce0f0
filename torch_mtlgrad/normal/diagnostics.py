"""What NORMAL reports about its positions (paper section 5.4): their history, the task distances.

The paper reads task relatedness off the learned positions: tasks whose positions end close
together are related (Fig. 2).  :func:`distance_matrix` gives ``|p_i - p_j|``,
:func:`group_positions` cuts the sorted positions at their largest gaps (the exact optimum of
single-linkage clustering in one dimension), and :class:`PositionHistory` keeps the positions
per step for plotting Fig. 2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["distance_matrix", "group_positions", "PositionHistory"]


def _as_vector(positions: Tensor) -> Tensor:
    if not isinstance(positions, Tensor):
        positions = torch.as_tensor(positions)
    if positions.dim() != 1:
        raise ValueError(f"positions must have shape [T], got shape {tuple(positions.shape)}")
    return positions.detach()


def distance_matrix(positions: Tensor) -> Tensor:
    """The ``[T, T]`` matrix ``|p_i - p_j|`` of task distances (NORMAL section 5.4).

    Example:
        >>> distance_matrix(torch.tensor([0.0, 1.0, 3.0]))
        tensor([[0., 1., 3.],
                [1., 0., 2.],
                [3., 2., 0.]])
    """
    p = _as_vector(positions)
    return (p[:, None] - p[None, :]).abs()


def group_positions(positions: Tensor, num_groups: int) -> list[list[int]]:
    """Split the tasks into ``num_groups`` groups by cutting the sorted positions at the largest gaps.

    Groups are returned in increasing position, each as sorted task indices.

    Example:
        >>> group_positions(torch.tensor([0.1, 2.0, 0.2, 2.2]), 2)
        [[0, 2], [1, 3]]
    """
    p = _as_vector(positions)
    T = p.shape[0]
    if not isinstance(num_groups, int) or not 1 <= num_groups <= T:
        raise ValueError(f"num_groups must be an int in [1, {T}], got {num_groups!r}")
    order = torch.argsort(p, stable=True)
    gaps = p[order][1:] - p[order][:-1]
    cuts = sorted(torch.argsort(gaps, descending=True, stable=True)[: num_groups - 1].tolist())
    groups, start = [], 0
    for c in cuts + [T - 1]:
        groups.append(sorted(order[start : c + 1].tolist()))
        start = c + 1
    return groups


class PositionHistory:
    """The task positions per step (the curves of NORMAL's Fig. 2).

    Snapshots are kept on the positions' device (no host synchronisation while training);
    :meth:`as_tensor` stacks them into ``[S, T]``.

    Example:
        >>> h = PositionHistory()
        >>> h.record(torch.tensor([1.0, 1.0])); h.record(torch.tensor([0.9, 1.2]))
        >>> h.as_tensor()
        tensor([[1.0000, 1.0000],
                [0.9000, 1.2000]])
    """

    def __init__(self) -> None:
        self._rows: list[Tensor] = []

    def record(self, positions: Tensor) -> None:
        """Append a copy of the ``[T]`` positions."""
        p = _as_vector(positions)
        if self._rows and self._rows[-1].shape != p.shape:
            raise ValueError(
                f"positions changed shape from {tuple(self._rows[-1].shape)} to {tuple(p.shape)}"
            )
        self._rows.append(p.clone())

    def __len__(self) -> int:
        return len(self._rows)

    def as_tensor(self) -> Tensor:
        """``[S, T]``: row ``s`` the positions after step ``s`` (row 0: before training)."""
        if not self._rows:
            return torch.empty(0, 0)
        dev = self._rows[-1].device
        return torch.stack([r.to(dev) for r in self._rows])

    def clear(self) -> None:
        self._rows.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"positions": self.as_tensor().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = state["positions"]
        if not isinstance(rows, Tensor) or rows.dim() != 2:
            raise ValueError("a PositionHistory state needs 'positions' of shape [S, T]")
        self._rows = [r.clone() for r in rows]
