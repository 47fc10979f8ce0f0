"""A generated multi-task regression problem with planted task groups (for CoNAL's checks).

Each group ``g`` has its own random teacher features ``phi_g(x) = tanh(A_g x)`` (``m`` of them);
task ``t`` of group ``g`` predicts ``y_t = s_t c_t . phi_g(x) + noise`` with ``c_t = c_g + within *
N(0, I)`` and ``s_t`` scaling the noise-free part to unit variance.  Tasks of one group agree (same features, nearly the same read-out), tasks of different
groups need different features from a shared encoder, so their gradients on it conflict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GroupedTasks", "grouped_regression"]


@dataclass
class GroupedTasks:
    """Splits of a grouped regression problem: inputs ``[n, dim]`` and one ``[n, 1]`` target
    per task; ``groups`` lists the planted task groups."""

    x_train: Tensor
    y_train: list[Tensor]
    x_val: Tensor
    y_val: list[Tensor]
    x_test: Tensor
    y_test: list[Tensor]
    groups: list[tuple[int, ...]]

    @property
    def num_tasks(self) -> int:
        return len(self.y_train)


def grouped_regression(
    groups: tuple[int, ...] = (3, 3),
    *,
    dim: int = 16,
    features: int = 16,
    n_train: int = 256,
    n_val: int = 256,
    n_test: int = 2048,
    noise: float = 0.1,
    within: float = 0.2,
    seed: int = 0,
) -> GroupedTasks:
    """Draw a problem with ``len(groups)`` planted groups of ``groups[g]`` tasks each.

    Args:
        groups: number of tasks of each group (tasks are numbered group after group).
        dim: input dimension.
        features: ``m``, teacher features per group.
        n_train, n_val, n_test: samples per split (all tasks share the inputs).
        noise: standard deviation of the target noise.
        within: spread of the task read-outs around their group's (0: identical tasks).
        seed: seed of a private generator (the global RNG is not touched).

    Example:
        >>> data = grouped_regression((2, 1), n_train=8, n_val=4, n_test=4)
        >>> data.groups, data.num_tasks, tuple(data.y_train[2].shape)
        ([(0, 1), (2,)], 3, (8, 1))
    """
    if not groups or any(int(n) < 1 for n in groups):
        raise ValueError(f"groups must list a positive number of tasks per group, got {groups!r}")
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_val + n_test
    x = torch.randn(n, dim, generator=gen)
    ys: list[Tensor] = []
    planted: list[tuple[int, ...]] = []
    for size in groups:
        A = torch.randn(features, dim, generator=gen) / dim**0.5 * 2.0
        c = torch.randn(features, generator=gen)
        phi = torch.tanh(x @ A.T)
        start = len(ys)
        for _ in range(int(size)):
            ct = c + within * torch.randn(features, generator=gen)
            signal = phi @ ct
            y = signal / signal.std() + noise * torch.randn(n, generator=gen)
            ys.append(y.unsqueeze(1))
        planted.append(tuple(range(start, len(ys))))
    a, b = n_train, n_train + n_val
    return GroupedTasks(
        x[:a], [y[:a] for y in ys], x[a:b], [y[a:b] for y in ys], x[b:], [y[b:] for y in ys], planted
    )
