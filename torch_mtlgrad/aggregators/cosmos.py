"""COSMOS (Ruchte and Grabocka, *Scalable Pareto Front Approximation for Deep Multi-Objective
Learning*, ICDM 2021) as a loss weighting.

COSMOS learns the whole Pareto front with one network conditioned on a preference ray.  At each
step it draws a preference ``r ~ Dirichlet(alpha)`` (one ``alpha`` per task, or one for all),
feeds ``r`` to the network together with the input, and trains on the linear scalarisation
penalised by the cosine between the preference and the loss vector (the paper's objective,
``lambda`` the penalty):

    F(L) = r . L - lambda cos(r, L),     cos(r, L) = r . L / (||r|| ||L||),

which pulls the losses onto the ray ``r`` so that the preference fed to the network matches the
point of the front it reaches.  The direction is the gradient of ``F`` in the shared parameters,
``sum_t (dF/dL_t) g_t``, with

    w = dF/dL = r - lambda (r / ||r|| - cos(r, L) L / ||L||) / ||L||.

The weights read the loss values (and the draw) only (``reads == "losses"``; through
:class:`~torch_mtlgrad.MultiTaskOptimizer` the step is one backward pass of ``sum_t w_t L_t``).

Conditioning the network on ``r`` is the model's job: the network must see the preference
*before* the losses are computed, so draw it first with :meth:`COSMOS.next_preference` (it is
kept and used by the next call), e.g.::

    agg = COSMOS(seed=0)
    opt = MultiTaskOptimizer(torch.optim.Adam(net.parameters()), shared=net.encoder,
                             aggregator=agg)
    for x, ys in loader:
        r = agg.next_preference(T)         # the preference of this step, [T]
        outs = net(x, r)                   # e.g. r appended to the input (the paper's choice
                                           # for tabular data; upsampled for images)
        opt.zero_grad()
        opt.backward([loss(o, y) for o, y in zip(outs, ys)])   # uses that r
        opt.step()

At test time feed any ray of the simplex to trace the front.  A call without a pending
preference draws one itself (``diagnostics["preference"]`` and :attr:`COSMOS.preference` say
which).

Defaults and choices the paper leaves open (documented): ``alpha = 1.2`` and ``lambda = 2``
(the authors' published defaults, for Multi-MNIST); the draws come from a seeded generator
(``seed=`` or ``generator=``; its state and the pending preference are in :meth:`state_dict`,
so a resumed run draws the same preferences); ``r`` is drawn as normalised Gamma variates in
float64; where ``L = 0`` (the cosine is undefined) the penalty's gradient is taken as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator
from .pbi import broadcast_to_tasks, per_task_config, per_task_vector
from .rlw import RandomSource

__all__ = ["COSMOS"]


class COSMOS(WeightedAggregator):
    """COSMOS (Ruchte and Grabocka 2021): ``r ~ Dirichlet(alpha)`` per step, the gradient of
    ``r . L - lambda cos(r, L)`` in the losses.

    Args:
        alpha: the Dirichlet concentration (a positive number, or one per task; default 1.2).
        lamda: the cosine penalty ``lambda`` (default 2; ``>= 0``; spelt as in the authors'
            code, ``lambda`` being a Python keyword).
        generator: a :class:`torch.Generator` to draw from (see
            :class:`~torch_mtlgrad.aggregators.rlw.RandomSource`).
        seed: seed of a private generator (exclusive with ``generator``).

    Diagnostics of the last call: ``preference`` (the ``r`` used) and ``cosine``
    (``cos(r, L)``).

    Absent tasks: the call draws ``T_present`` numbers (a Dirichlet over the present tasks);
    a preference drawn beforehand by :meth:`next_preference` for all ``T`` tasks is restricted
    to the present ones and renormalised, which is a draw of the Dirichlet of their ``alpha``
    (the aggregation property of the Dirichlet distribution).

    Example:
        >>> import torch
        >>> agg = COSMOS(seed=0)
        >>> r = agg.next_preference(2)            # feed r to the network, then:
        >>> d = agg(torch.eye(2), torch.tensor([1.0, 1.0]))
        >>> torch.equal(agg.preference, r.float()), round(float(r.sum()), 6)
        (True, 1.0)
        >>> agg = COSMOS(lamda=0.0, seed=0)        # no penalty: the weights are r itself
        >>> torch.equal(agg(torch.eye(2), torch.tensor([1.0, 2.0])), agg.preference)
        True
    """

    needs_losses = True
    stateful = True
    random = True
    paper = ("Ruchte & Grabocka, *Scalable Pareto Front Approximation for Deep Multi-Objective "
             "Learning*, ICDM 2021")
    summary = ("a Dirichlet preference r per step; gradient of r.L - lambda cos(r, L) "
               "(the network is conditioned on r)")

    def __init__(self, alpha: float | Sequence[float] | Tensor = 1.2, lamda: float = 2.0, *,
                 generator: torch.Generator | None = None, seed: int | None = None) -> None:
        super().__init__()
        if isinstance(lamda, bool) or not isinstance(lamda, (int, float)) or not lamda >= 0:
            raise ValueError(f"lamda must be a non-negative number, got {lamda!r}")
        self.alpha = per_task_vector(alpha, "alpha", positive=True)
        self.lamda = float(lamda)
        self.rng = RandomSource(generator, seed)
        self._pending: Tensor | None = None  # drawn by next_preference, for all tasks (float64)
        self.preference: Tensor | None = None  # the last call's r

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        return per_task_config(self, "alpha")

    def _draw(self, T: int) -> Tensor:
        """``r ~ Dirichlet(alpha)`` for ``T`` tasks, float64 on the generator's device."""
        a = broadcast_to_tasks(self.alpha, 1.2, T, "alpha",
                               torch.empty(0, dtype=torch.float64, device=self.rng.device))
        g = torch._standard_gamma(a, generator=self.rng.generator)
        total = g.sum()
        return torch.where(total > 0, g / total.clamp_min(torch.finfo(g.dtype).tiny),
                           torch.full_like(g, 1.0 / T))

    def next_preference(self, num_tasks: int) -> Tensor:
        """The preference ``r`` (``[num_tasks]``, float64, summing to 1) that the next call
        will use: drawn now (once: calling again before the next step returns the same one),
        so that the network can be conditioned on it."""
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if self._pending is not None and self._pending.shape[0] != num_tasks:
            raise ValueError(f"a preference for {self._pending.shape[0]} tasks is already "
                             f"pending (drawn for the next call), not {num_tasks}")
        if self._pending is None:
            if self.alpha is not None and self.alpha.dim() == 1 and \
                    self.alpha.shape[0] != num_tasks:
                raise ValueError(f"alpha has {self.alpha.shape[0]} entries, not {num_tasks}")
            self._pending = self._draw(num_tasks)
        return self._pending.clone()

    def _take_preference(self, T: int) -> Tensor:
        """The pending preference restricted to this call's tasks, or a fresh draw."""
        pending = self._pending
        if pending is None:
            return self._draw(T)
        if self._subset_idx is not None:
            if pending.shape[0] != self._subset_total:
                raise ValueError(f"the pending preference has {pending.shape[0]} entries but the "
                                 f"call has {self._subset_total} tasks")
            part = pending[self._subset_idx.to(pending.device)]
            return part / part.sum()
        if pending.shape[0] != T:
            raise ValueError(f"the pending preference (from next_preference) has "
                             f"{pending.shape[0]} entries but the call has {T} tasks")
        return pending

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        if losses is None:
            raise ValueError("COSMOS needs the loss values: agg(J, losses)")
        L = losses.to(dtype=dtype, device=device)
        r = self._take_preference(num_tasks).to(dtype=dtype, device=device)
        n, rn = L.norm(), r.norm()
        ok = n > 0
        safe_n = torch.where(ok, n, torch.ones_like(n))
        cos = torch.where(ok, (r @ L) / (rn * safe_n), torch.zeros_like(n))
        grad_cos = torch.where(ok, (r / rn - cos * L / safe_n) / safe_n, torch.zeros_like(L))
        self._pending = None
        self.preference = r
        self.diagnostics = {"preference": r, "cosine": cos}
        return r - self.lamda * grad_cos

    def state_dict(self) -> dict[str, Any]:
        return {**self.rng.state_dict(),
                "pending": None if self._pending is None else self._pending.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        pending = state.pop("pending", None)
        if pending is not None and (not isinstance(pending, Tensor) or pending.dim() != 1):
            raise ValueError("COSMOS state 'pending' must be a 1-D tensor or None")
        self.rng.load_state_dict(state)
        self._pending = None if pending is None else pending.detach().clone()

    def reset(self) -> None:
        self.rng.reset()
        self._pending = None
        self.preference = None

    def __repr__(self) -> str:
        assert self.alpha is not None
        alpha = float(self.alpha) if self.alpha.dim() == 0 else self.alpha.tolist()
        return f"COSMOS(alpha={alpha}, lamda={self.lamda})"
