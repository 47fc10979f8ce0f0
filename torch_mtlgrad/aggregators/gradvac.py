"""Gradient Vaccine (GradVac; Wang et al., "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1).

GradVac generalises PCGrad: instead of only removing conflicts (target cosine 0), it pulls the
cosine of every task pair up to an adaptive target ``phi_hat_ij``, an exponential moving average
of the pair's observed cosines.  For every task ``i`` (``g_i^PC = g_i`` to start) and every other
task ``j`` in random order:

    phi_ij = cos(g_i^PC, g_j)
    if phi_ij < phi_hat_ij:
        g_i^PC <- g_i^PC + ||g_i^PC|| (phi_hat_ij sqrt(1 - phi_ij^2)
                                       - phi_ij sqrt(1 - phi_hat_ij^2))
                           / (||g_j|| sqrt(1 - phi_hat_ij^2)) * g_j
    phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij

and ``d = sum_i g_i^PC``.  The added multiple of ``g_j`` is the one that makes
``cos(g_i^PC, g_j)`` exactly ``phi_hat_ij`` (the paper's closed form, from the law of sines).
``phi_hat`` starts at 0, so the first call is PCGrad.

Choices the paper leaves open (documented, tested):

* The paper applies GradVac per parameter group (whole model, per layer, per matrix).  Here it
  runs on the rows of ``J`` as given, i.e. the whole model (or whatever block of parameters the
  optimizer aggregates together).
* A pair involving a zero gradient has no cosine: it is skipped (no correction, and its EMA is
  not updated).  This includes a ``g_i^PC`` that earlier corrections made (numerically) zero,
  e.g. for colinear opposite gradients: from ``G`` its squared norm is only known to about
  ``eps (sum_k |C_ik| ||g_k||)^2``, and below ``100`` times that it counts as zero.
* ``sqrt(1 - phi_hat^2)`` is floored at ``eps`` so that a target of exactly +-1 gives a large but
  finite correction.  The correction and the EMA use ``phi_ij`` clamped to ``[-1, 1]``.

Everything runs on ``G = J J^T``: ``g_i^PC = sum_k C_ik g_k``, so ``||g_i^PC||^2 = C_i G C_i^T``
and ``g_i^PC . g_j = (C G)_ij``; the weights are ``w = 1^T C``.  The ``T`` sequences run side by
side as in :mod:`~torch_mtlgrad.aggregators.pcgrad`, with no host synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator
from .rlw import RandomSource

__all__ = ["GradVac"]


class GradVac(WeightedAggregator):
    """Gradient Vaccine (GradVac, Algorithm 1): ``d = sum_i g_i^PC`` with EMA cosine targets.

    Args:
        beta: EMA rate of the targets, ``phi_hat <- (1 - beta) phi_hat + beta phi``, in
            ``[0, 1]``; default ``1e-2``, the value of the paper's experiments (LibMTL and
            TorchJD default to 0.5).
        eps: floor of ``sqrt(1 - phi_hat^2)`` in the correction's denominator (not in the paper;
            only matters when a target reaches +-1).
        generator: a :class:`torch.Generator` for the random visiting orders (see
            :class:`~torch_mtlgrad.aggregators.rlw.RandomSource`).
        seed: seed of a private generator (exclusive with ``generator``).

    Computed from ``G = J J^T`` only.  State (in :meth:`state_dict`, cleared by :meth:`reset`):
    the ``[T, T]`` targets ``phi_hat`` and the generator's state.  The orders are drawn as
    ``torch.randperm(T - 1)`` over the other tasks, once per task in task order.
    ``diagnostics``: ``cosines`` (``[T, T]``, the ``phi_ij`` of the last call, NaN where
    skipped), ``targets`` (``phi_hat`` after the call), ``corrections`` (count).

    Absent tasks: the call runs on the present tasks' block of ``phi_hat`` (orders drawn for
    ``T_present`` tasks); every target of a pair with an absent task stays as it was, and a
    pair first seen together starts at 0.

    Example:
        >>> import torch
        >>> agg = GradVac(beta=0.5, seed=0)
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> agg(J)                                  # first call: phi_hat = 0, i.e. PCGrad
        tensor([0.5000, 1.5000])
        >>> agg.state_dict()["phi_hat"]             # (1 - beta) * 0 + beta * cos(g1, g2)
        tensor([[ 0.0000, -0.3536],
                [-0.3536,  0.0000]])
    """

    paper = ("Wang et al., *Gradient Vaccine: Investigating and Improving Multi-task Optimization "
             "in Massively Multilingual Models*, ICLR 2021")
    summary = ("gradient vaccine: pairs pulled toward EMA cosine targets (random visiting order, "
               "seeded)")
    random = True

    gramian_only = True
    stateful = True

    def __init__(self, beta: float = 1e-2, eps: float = 1e-8, *,
                 generator: torch.Generator | None = None, seed: int | None = None) -> None:
        super().__init__()
        if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0.0):
            raise ValueError(f"eps must be non-negative, got {eps!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.rng = RandomSource(generator, seed)
        self.phi_hat: Tensor | None = None

    def _orders(self, T: int) -> Tensor:
        rows = []
        for i in range(T):
            perm = self.rng.randperm(T - 1)
            others = torch.cat([torch.arange(i), torch.arange(i + 1, T)]).to(perm.device)
            rows.append(others[perm])
        return torch.stack(rows)

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        T = G.shape[0]
        if self.phi_hat is not None and self.phi_hat.shape != (T, T):
            raise ValueError(
                f"GradVac was tracking {self.phi_hat.shape[0]} tasks, got J with {T} rows; "
                "call reset() to start over with a different number of tasks"
            )
        phi_hat = (torch.zeros(T, T, dtype=G.dtype, device=G.device) if self.phi_hat is None
                   else self.phi_hat.to(device=G.device, dtype=G.dtype).clone())
        perms = self._orders(T).to(G.device, non_blocking=True)
        rows = torch.arange(T, device=G.device)
        C = torch.eye(T, dtype=G.dtype, device=G.device)
        CG = G.clone()  # row i: g_i^PC . g_k for every k
        norm_j = torch.diagonal(G).clamp_min(0).sqrt()
        tiny = torch.finfo(G.dtype).tiny
        # ||g_i^PC||^2 = C_i G C_i^T carries a rounding error of about eps (sum_k |C_ik| ||g_k||)^2:
        # below that level g_i^PC is numerically zero and its cosine is noise.
        zero_tol = 100 * torch.finfo(G.dtype).eps
        cosines = torch.full((T, T), float("nan"), dtype=G.dtype, device=G.device)
        count = torch.zeros((), dtype=torch.int64, device=G.device)
        for k in range(max(T - 1, 0)):
            j = perms[:, k]
            dot = CG[rows, j]
            norm_sq = (CG * C).sum(dim=1)
            mass = C.abs() @ norm_j
            norm_i = norm_sq.clamp_min(0).sqrt()
            denom = norm_i * norm_j[j]
            valid = (denom > tiny) & (norm_sq > zero_tol * mass * mass)
            phi = torch.where(valid, dot / denom.clamp_min(tiny), torch.zeros_like(dot))
            phi = phi.clamp(-1.0, 1.0)
            target = phi_hat[rows, j]
            fire = valid & (phi < target)
            s_phi = (1 - phi * phi).clamp_min(0).sqrt()
            s_tgt = (1 - target * target).clamp_min(0).sqrt().clamp_min(self.eps)
            coef = norm_i * (target * s_phi - phi * s_tgt) / (norm_j[j] * s_tgt).clamp_min(tiny)
            coef = torch.where(fire, coef, torch.zeros_like(coef))
            C[rows, j] += coef
            CG = CG + coef[:, None] * G[j]
            ema = (1 - self.beta) * target + self.beta * phi
            phi_hat[rows, j] = torch.where(valid, ema, target)
            cosines[rows, j] = torch.where(valid, phi, torch.full_like(phi, float("nan")))
            count = count + fire.sum()
        self.phi_hat = phi_hat
        self.diagnostics = {"cosines": cosines, "targets": phi_hat.clone(), "corrections": count}
        return C.sum(dim=0)

    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"phi_hat": ((0, 1), 0.0)}

    def state_dict(self) -> dict[str, Any]:
        return {"phi_hat": None if self.phi_hat is None else self.phi_hat.clone(),
                **self.rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        phi_hat = state.get("phi_hat")
        if phi_hat is not None and (phi_hat.dim() != 2 or phi_hat.shape[0] != phi_hat.shape[1]):
            raise ValueError(f"phi_hat must be a square [T, T] tensor, got {tuple(phi_hat.shape)}")
        self.rng.load_state_dict(state)
        self.phi_hat = None if phi_hat is None else phi_hat.clone()

    def reset(self) -> None:
        self.phi_hat = None
        self.rng.reset()

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, eps={self.eps})"
