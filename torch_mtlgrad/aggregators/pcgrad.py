"""PCGrad, projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020, Algorithm 1).

For every task ``i``: start from ``g_i^PC = g_i``; for every other task ``j`` in random order,
if ``g_i^PC . g_j < 0`` replace ``g_i^PC`` by its projection onto the normal plane of ``g_j``,

    g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j ;

the direction is the sum ``d = sum_i g_i^PC`` (Algorithm 1's update).  Each
projection is against the *original* ``g_j``, as in the paper.

Every ``g_i^PC`` is a combination ``sum_k C_ik g_k`` of the original rows, and the tests and
updates need only inner products of rows, so the whole procedure runs on ``G = J J^T``: the
weights are ``w = 1^T C`` and ``d = w^T J``.  The ``T`` sequences of projections are independent
of each other and run side by side (``T`` vectorised steps, one per position in the visiting
orders); there is no data-dependent branch on the host, so on CUDA no step synchronises with the
device (the orders are drawn on the generator's device, by default the CPU, and copied over).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._base import WeightedAggregator
from .rlw import RandomSource, SeededState

__all__ = ["PCGrad", "pcgrad_weights"]

Order = Literal["random", "fixed"]


def pcgrad_weights(G: Tensor, perms: Tensor) -> Tensor:
    """PCGrad's weights ``w`` (``d = w^T J``) from the Gramian and the visiting orders.

    Args:
        G: ``[T, T]`` Gramian ``J J^T``.
        perms: ``[T, K]`` int64; row ``i`` lists the tasks ``j`` that task ``i`` is projected
            against, in order (entries equal to ``i`` are skipped).

    A task with a zero gradient is never projected against (its inner products are 0).

    Example:
        >>> G = torch.tensor([[1.0, -1.0], [-1.0, 4.0]])      # g1 . g2 = -1
        >>> pcgrad_weights(G, torch.tensor([[1], [0]]))      # g1 + g2/4 + g2 + g1
        tensor([2.0000, 1.2500])
    """
    return _project(G, perms)[0].sum(dim=0)


def _project(G: Tensor, perms: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients ``C`` (``g_i^PC = sum_k C_ik g_k``) and the number of projections made."""
    T = G.shape[0]
    rows = torch.arange(T, device=G.device)
    perms = perms.to(G.device, non_blocking=True)
    C = torch.eye(T, dtype=G.dtype, device=G.device)
    diag = torch.diagonal(G)
    tiny = torch.finfo(G.dtype).tiny
    count = torch.zeros((), dtype=torch.int64, device=G.device)
    for k in range(perms.shape[1]):
        j = perms[:, k]
        inner = (C * G[j]).sum(dim=1)  # g_i^PC . g_j for every i at once
        conflict = (inner < 0) & (j != rows) & (diag[j] > tiny)
        coef = torch.where(conflict, -inner / diag[j].clamp_min(tiny), torch.zeros_like(inner))
        C[rows, j] += coef
        count = count + conflict.sum()
    return C, count


class PCGrad(SeededState, WeightedAggregator):
    """Projecting conflicting gradients (PCGrad, Algorithm 1): ``d = sum_i g_i^PC``.

    Args:
        order: ``"random"`` (default, the paper's): each task visits the others in a fresh
            uniformly random order every call; ``"fixed"``: in index order (deterministic, for
            ablations).
        generator: a :class:`torch.Generator` for the random orders (see
            :class:`~torch_mtlgrad.aggregators.rlw.RandomSource`).
        seed: seed of a private generator (exclusive with ``generator``).

    Computed from ``G = J J^T`` only.  The generator's state is in :meth:`state_dict`, so a
    resumed run draws the same next orders.  With two tasks the order plays no role and the
    direction never conflicts with either task (``g_t . d >= 0``).
    ``diagnostics["conflicts"]`` counts the projections made in the last call.

    Absent tasks: the projections run among the present rows, with orders drawn for
    ``T_present`` tasks (the generator advances as on a call with that many tasks).

    The orders are drawn as ``torch.randperm(T)`` once per task, in task order (the entry equal
    to the task itself is skipped), so with the same seed they equal TorchJD 0.18's draws from
    the global generator.

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])   # conflicting: g1 . g2 = -1
        >>> PCGrad(seed=0)(J)                              # (1/2, 1/2) + (0, 1)
        tensor([0.5000, 1.5000])
    """

    paper = "Yu et al., *Gradient Surgery for Multi-Task Learning*, NeurIPS 2020"
    summary = "projecting conflicting gradients (random order by default, seeded; or a fixed order)"
    random = True

    gramian_only = True
    stateful = True

    def __init__(self, order: Order = "random", *, generator: torch.Generator | None = None,
                 seed: int | None = None) -> None:
        super().__init__()
        if order not in ("random", "fixed"):
            raise ValueError(f"order must be 'random' or 'fixed', got {order!r}")
        self.order = order
        self.rng = RandomSource(generator, seed)

    def _orders(self, T: int, device: torch.device) -> Tensor:
        if self.order == "fixed":
            # Built on the device: no host-to-device copy, so the step can be a CUDA graph.
            return torch.arange(T, device=device).expand(T, T)
        return torch.stack([self.rng.randperm(T) for _ in range(T)])

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        C, count = _project(G, self._orders(G.shape[0], G.device))
        self.diagnostics = {"conflicts": count}
        return C.sum(dim=0)

    def __repr__(self) -> str:
        return f"PCGrad(order={self.order!r})"
