"""Gradient sign dropout (GradDrop; Chen et al., "Just Pick a Sign: Optimizing Deep Multitask
Models with Gradient Sign Dropout", NeurIPS 2020, eq. 1 and Algorithm 1).

Per element ``k`` of the gradients, the Gradient Positive Sign Purity (eq. 1)

    P_k = 1/2 (1 + sum_i g_ik / sum_i |g_ik|)   in [0, 1]

is 1 when every task pushes element ``k`` up, 0 when every task pushes it down.  One uniform
``U_k ~ U[0, 1]`` per element (shared by all tasks) picks a sign: positive with probability
``f(P_k)``.  Task ``i`` keeps its element if it has the chosen sign,

    M_ik = [f(P_k) > U_k] [g_ik > 0] + [f(P_k) < U_k] [g_ik < 0],

and the direction is ``d_k = sum_i (l_i + (1 - l_i) M_ik) g_ik`` with leak parameters
``l_i in [0, 1]`` (Algorithm 1; ``l_i = 0`` by default, ``l_i = 1`` lets task ``i`` through
unmasked).  ``f`` is monotonically increasing with ``f(0) = 0`` and ``f(1) = 1``; the paper's
default is the identity.

Where the paper applies it, and what this does: the paper inserts GradDrop at a layer of
*activations* (the output of the shared trunk), computing ``P`` from the per-task gradients of
the loss with respect to those activations, and backpropagates the
masked gradient through the shared layers below.  An aggregator only sees ``J``: here each row of
``J`` (task ``t``'s gradient with respect to the shared *parameters*) plays the role of the
per-task activation gradient, so the sign purity and the mask are per parameter.  That is the
form LibMTL (with ``rep_grad=False``) and TorchJD use.  GradDrop needs the elements of ``J``,
not only ``G``.

An element where every task's gradient is 0 gets ``P = 1/2`` (no 0/0; it contributes 0 anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._base import Aggregator
from .rlw import RandomSource, SeededState

__all__ = ["GradDrop", "sign_purity"]


def sign_purity(J: Tensor) -> Tensor:
    """Gradient Positive Sign Purity ``P = 1/2 (1 + sum_i J_i / sum_i |J_i|)`` per column (eq. 1).

    Columns that are all zero get 1/2.

    Example:
        >>> sign_purity(torch.tensor([[1.0, -1.0, 2.0, 0.0], [3.0, -1.0, -2.0, 0.0]]))
        tensor([1.0000, 0.0000, 0.5000, 0.5000])
    """
    return _purity(J.clamp_min(0).sum(dim=0), J.clamp_max(0).sum(dim=0))


def _purity(pos: Tensor, neg: Tensor) -> Tensor:
    """``P`` from the column sums of the positive parts (``pos``) and negative parts (``neg``)."""
    total = pos - neg  # sum_i |J_i|
    ratio = torch.where(total > 0, (pos + neg) / total.clamp_min(torch.finfo(pos.dtype).tiny),
                        torch.zeros_like(total))
    return 0.5 * (1 + ratio)


class GradDrop(SeededState, Aggregator):
    """Gradient sign dropout (GradDrop, eq. 1 and Algorithm 1) on the rows of ``J``.

    Args:
        f: monotonically increasing map of ``[0, 1]`` onto itself applied to the purity
            ``P`` (the paper's ``f``); default the identity.
        leak: the paper's leak ``l``: one number in ``[0, 1]`` for every task, or one per task
            (a sequence or 1-D tensor, whose length must equal ``T`` at call time); default 0.
        generator: a :class:`torch.Generator` for ``U`` (see
            :class:`~torch_mtlgrad.aggregators.rlw.RandomSource`).  ``U`` has ``D`` entries:
            pass a generator on ``J``'s device (e.g. ``torch.Generator(device="cuda")``) to
            draw it there; otherwise it is drawn on the CPU and copied over.
        seed: seed of a private CPU generator (exclusive with ``generator``).

    Needs ``J`` itself (per-element signs), not only ``G``.  Positively homogeneous:
    ``d(sJ) = s d(J)`` for ``s > 0`` with the same draws.  The generator's state is in
    :meth:`state_dict`.  ``weights`` is ``None`` (the mask acts per element, so ``d`` is not a
    combination of the rows).  ``diagnostics``: ``positive_fraction`` (share of elements where
    the positive sign was chosen) and ``purity_mean`` (mean of ``P``).

    Absent tasks: the purity and the mask are over the present rows only, with their own
    ``leak`` values; ``U`` has ``D`` entries, drawn as on any call.

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 2.0], [3.0, 4.0]])   # no sign conflict: P = 1 everywhere
        >>> GradDrop(seed=0)(J)                          # every element kept: the sum
        tensor([4., 6.])
    """

    paper = ("Chen et al., *Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign "
             "Dropout*, NeurIPS 2020")
    summary = ("gradient sign dropout: each element keeps the gradients of one sign, drawn by its "
               "sign purity")
    random = True

    stateful = True

    def __init__(self, f: Callable[[Tensor], Tensor] | None = None,
                 leak: float | Sequence[float] | Tensor = 0.0, *,
                 generator: torch.Generator | None = None, seed: int | None = None) -> None:
        super().__init__()
        if f is not None and not callable(f):
            raise TypeError(
                f"f must be callable (a map of [0, 1] onto itself), got {type(f).__name__}")
        self.f = f
        if isinstance(leak, (int, float)) and not isinstance(leak, bool):
            lk = torch.tensor([float(leak)], dtype=torch.float64)
            self._scalar_leak = True
        else:
            lk = torch.as_tensor(leak, dtype=torch.float64).detach().cpu()
            self._scalar_leak = False
            if lk.dim() != 1 or lk.numel() == 0:
                raise ValueError(
                    f"leak must be a number or a 1-D sequence, got shape {tuple(lk.shape)}")
        if not bool(((lk >= 0) & (lk <= 1)).all()):
            raise ValueError(f"leak values must be in [0, 1], got {lk.tolist()}")
        self.leak = lk
        self._has_leak = bool((lk > 0).any())
        self.rng = RandomSource(generator, seed)

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        T, D = J.shape
        if not self._scalar_leak and self.leak.numel() != T:
            raise ValueError(
                f"GradDrop has {self.leak.numel()} leak values but J has {T} rows (tasks); "
                "give one leak per task or a single number"
            )
        Jp = J.clamp_min(0)
        Jn = J - Jp  # the negative parts, exactly
        pos, neg = Jp.sum(dim=0), Jn.sum(dim=0)
        P = _purity(pos, neg)
        fP = self.f(P) if self.f is not None else P
        U = self.rng.rand(D, dtype=J.dtype, device=J.device)
        keep_pos = fP > U
        keep_neg = fP < U
        # M_ik is the same sign choice for every task, so sum_i (1 - l_i) M_ik g_ik splits into
        # the positive parts where "+" was chosen and the negative parts where "-" was.
        zero = torch.zeros_like(P)
        if self._has_leak:
            leak = self.leak.to(device=J.device, dtype=J.dtype).expand(T)
            through = 1 - leak
            d = (torch.where(keep_pos, through @ Jp, zero) + torch.where(keep_neg, through @ Jn, zero)
                 + leak @ J)
        else:
            d = torch.where(keep_pos, pos, zero) + torch.where(keep_neg, neg, zero)
        self.weights = None
        self.diagnostics = {"positive_fraction": keep_pos.to(J.dtype).mean(),
                            "purity_mean": P.mean()}
        return d

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        return {} if self._scalar_leak else {"leak": (0,)}

    def __repr__(self) -> str:
        leak = float(self.leak[0]) if self._scalar_leak else self.leak.tolist()
        return f"GradDrop(f={'identity' if self.f is None else self.f!r}, leak={leak})"
