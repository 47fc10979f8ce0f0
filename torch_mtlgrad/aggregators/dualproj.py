"""DualProj: the averaged gradient projected onto the dual cone of the rows.

The projection of a combination of the gradients onto ``{x : J x >= 0}`` is the rule of Gradient
Episodic Memory (Lopez-Paz and Ranzato, *Gradient Episodic Memory for Continual Learning*,
NeurIPS 2017, eq. 10-13, with the dual QP of eq. 13); Quinton and Rey (*Jacobian Descent for
Multi-Objective Optimization*, arXiv:2406.16232, 2024) name the aggregator built on it DualProj:

    A_DualProj(J) = pi_J(p^T J),   p = 1/T by default (the mean of the rows)

By the dual problem, ``pi_J(v) = v + J^T lam`` with
``lam = argmin_{lam >= 0} 1/2 lam^T G lam + lam^T (J v)`` and ``J v = G p``, so the weights are
``w = p + lam`` and ``d = w^T J``: computed from ``G = J J^T`` only, with the library's one
cone-projection solver (:func:`torch_mtlgrad.aggregators._solvers.dual_cone_weights`; exact,
float64, on the CPU: one host synchronisation per call); from ``J``, ``G`` and ``w^T J`` are
accumulated in float64 (see :class:`~torch_mtlgrad.aggregators.upgrad.ConeWeighting`).

Non-conflicting (``J d >= 0``) and, with uniform ``p``, invariant to the order of the tasks; unlike
UPGrad it is not linear under scaling of the rows (the paper's comparison table).
"""

from __future__ import annotations

from torch import Tensor

from ._solvers import dual_cone_weights
from .upgrad import ConeWeighting

__all__ = ["DualProj"]


class DualProj(ConeWeighting):
    """DualProj: ``d = pi_J(p^T J)``, the projection of the mean gradient onto ``{x : J x >= 0}``.

    Computed from the Gramian ``G = J J^T`` only.

    Args:
        pref_vector: the combination ``p`` projected (``[T]``, non-negative); ``None`` (default)
            is the uniform ``1/T`` (the mean).

    ``weights`` after a call are ``w = p + lam``; ``diagnostics["lam"]`` is ``lam``.

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> DualProj()(J)   # the mean (0, 0.5) conflicts with nothing: unchanged
        tensor([0.0000, 0.5000])
        >>> DualProj()(torch.tensor([[1.0, 0.0], [-3.0, 1.0]]))
        tensor([0.0000, 0.5000])
    """

    paper = ("Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*, NeurIPS "
             "2017 (GEM); named by Quinton & Rey 2024")
    summary = "projection of the mean gradient onto the dual cone of the task gradients"

    def _weights64(self, G64: Tensor) -> tuple[Tensor, Tensor]:
        p = self._pref(G64)
        lam = dual_cone_weights(G64, G64 @ p, warm=self._warm)
        return p + lam, lam
