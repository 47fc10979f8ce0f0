"""IMTL, the hybrid of impartial loss and gradient balancing (Liu, Li, Kuang, Xue, Chen, Yang, Liao
and Zhang, *Towards Impartial Multi-task Learning*, ICLR 2021, Sec. 3.3 and Algorithm 1).

IMTL runs IMTL-L (:class:`~torch_mtlgrad.aggregators.imtll.IMTLL`) on the losses and IMTL-G
(:class:`~torch_mtlgrad.aggregators.imtlg.IMTLG`) on the gradients of the *scaled* losses
``L~_t = e^{s_t} L_t - s_t``.  Those gradients are ``k_t g_t`` with ``k_t = e^{s_t}``, so with
``K = diag(k)`` their Gramian is ``K G K`` and

    alpha = IMTL-G weights of K G K       (sum_t alpha_t = 1, equal projections of
                                           d onto every unit gradient u_t),
    d = sum_t alpha_t k_t g_t,            i.e. weights w_t = alpha_t e^{s_t} of the rows of J;

then ``s`` takes IMTL-L's step (gradient ``e^{s_t} L_t - 1``), as in Algorithm 1 where the
shared parameters are updated with ``sum_t alpha_t L~_t`` and the scales with their own
scaled losses.

Since IMTL-G's direction depends on the rows only through their unit vectors up to the factor
that restores ``sum alpha = 1``, ``d`` is IMTL-G's direction on ``J`` itself times
``1 / sum_t (alpha^G_t / k_t)`` (``alpha^G`` IMTL-G's weights on ``G``) whenever ``G`` is
invertible: the loss scales set the *length* of the step, the gradient balance its direction.

Choices the paper leaves open, and those of the two halves, are theirs (see IMTL-L and IMTL-G:
the scales' own optimizer, default Adam with ``lr=1e-3``; the pseudo-inverse for a singular
``G``; IMTL-G's normalisation on the cosine matrix).  The paper computes IMTL-G on the gradients
with respect to the shared representation; that is this library's representation capture
(``MultiTaskOptimizer(..., capture="representation")``), which the method allows, the weights
reading ``G`` only.  The task-specific parameters get the plain sum of the task gradients.

Reads the Gramian and the losses (``reads == "gramian"``).  State (``state_dict``): ``s`` and
its optimizer state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .imtlg import IMTLG, imtlg_weights
from .imtll import IMTLL

__all__ = ["IMTL"]


class IMTL(IMTLL):
    """IMTL (Liu et al. 2021): IMTL-G on the gradients of IMTL-L's scaled losses,
    ``w = e^{s} * imtlg_weights(K G K)``, ``K = diag(e^{s})``.

    Args:
        lr, optimizer, init_log_scale: IMTL-L's (see :class:`IMTLL`).
        rtol: IMTL-G's eigenvalue cut-off (see :class:`~torch_mtlgrad.aggregators.imtlg.IMTLG`).

    Diagnostics of the last call: ``log_scale`` and ``objective`` (IMTL-L's), ``alpha``
    (IMTL-G's weights of the scaled gradients, summing to 1).

    Absent tasks: IMTL-G on the present rows; an absent task's ``s_t`` and its optimizer
    moments do not move.

    Example:
        >>> import torch
        >>> agg = IMTL(lr=0.1, optimizer="sgd")
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> agg(J, torch.tensor([2.0, 0.5]))      # s = 0: IMTL-G's direction
        tensor([0.6667, 0.6667])
        >>> d = agg(J, torch.tensor([2.0, 0.5]))  # scaled rows: the same equal projections
        >>> J @ d / J.norm(dim=1)
        tensor([0.6326, 0.6326])
    """

    gramian_only = True
    summary = ("IMTL-G's equal projections on the gradients of IMTL-L's scaled losses "
               "e^s L - s")

    def __init__(self, lr: float = 1e-3, optimizer: str = "adam", init_log_scale: float = 0.0,
                 rtol: float | None = None) -> None:
        super().__init__(lr, optimizer, init_log_scale)  # type: ignore[arg-type]
        self._balance = IMTLG(rtol)  # the gradient half's settings (validated there)

    @property
    def rtol(self) -> float | None:
        """IMTL-G's eigenvalue cut-off."""
        return self._balance.rtol

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        s, L = self._scales(losses, num_tasks, dtype, device)
        k = torch.exp(s).to(G.dtype)
        alpha = imtlg_weights(G * k[:, None] * k[None, :], self.rtol)
        self._update(s, L)
        self.diagnostics["alpha"] = alpha
        return (alpha * k).to(dtype)

    def __repr__(self) -> str:
        return (f"IMTL(lr={self._s.lr}, optimizer={self._s.optimizer_name!r}, "
                f"init_log_scale={self.init_log_scale}, rtol={self.rtol})")
