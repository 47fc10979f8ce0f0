"""Smooth Tchebycheff scalarisation (STCH; Lin, Zhang, Chen, Zhang and Zhang, *Smooth Tchebycheff
Scalarization for Multi-Objective Optimization*, ICML 2024) as a loss weighting.

The Tchebycheff scalarisation ``max_t lambda_t (L_t - z_t)`` (preference ``lambda``, ideal point
``z``) is smoothed by the log-sum-exp with smoothing ``mu > 0`` (the paper's eq. for
``g^STCH_mu``):

    g_mu(L) = mu log sum_t exp(lambda_t (L_t - z_t) / mu),

which tends to the max as ``mu -> 0``.  The direction is the gradient of ``g_mu`` in the shared
parameters, ``sum_t (dg/dL_t) g_t``, with

    w_t = dg_mu / dL_t = lambda_t p_t,      p = softmax(lambda (L - z) / mu):

the task furthest above its ideal value (weighted by ``lambda``) dominates, the more so the
smaller ``mu``.  The weights read the loss values only (``reads == "losses"``; through
:class:`~torch_mtlgrad.MultiTaskOptimizer` the step is one backward pass of
``sum_t w_t L_t``).

Defaults and choices the paper leaves open (documented):

* ``mu = 1`` (LibMTL's default ``STCH_mu``), ``lambda`` all ones: then the weights are the
  softmax itself and sum to 1 (a convex combination of the gradients).  The paper takes
  ``lambda`` in the simplex; ``lambda = 1 / T`` is ``1 / T`` times these weights.
* ``ideal``: ``None`` (default) is ``z = 0`` (the lower bound of non-negative losses);
  ``"min"`` tracks ``z`` as the running minimum of each task's loss over the calls so far, this
  call's included (so ``L - z >= 0``; per-task state, in :meth:`state_dict`); or fixed values
  (a number or one per task).
* ``log_losses=True`` scalarises ``log L_t - log z_t`` instead (``log(L_t / z_t)``; ``z = 1``
  when ``ideal`` is ``None``): the weights become ``lambda_t p_t / L_t`` and the losses must be
  positive (a ``ValueError`` naming the task otherwise).

LibMTL's ``STCH`` (which follows the authors' multi-task code) differs in three ways, all
expressible here or outside the aggregator: (1) it scalarises the log losses normalised by a
"nadir" vector, the mean loss over the last warm-up epoch, ``log(L_t / nadir_t)``: that is
``log_losses=True, ideal=nadir`` here; (2) it multiplies ``g_mu`` by ``T``, so its weights are
``T`` times these; (3) during its warm-up epochs (4 by default) it trains on
``sum_t log L_t`` (weights ``1 / L_t``) instead; run a warm-up with another method (or with
``mu`` large, where ``p -> 1 / T``) and switch.  It has no running minimum.

Stateful only with ``ideal="min"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator
from .gls import check_positive_losses
from .pbi import broadcast_to_tasks, per_task_config, per_task_vector

__all__ = ["STCH"]


class STCH(WeightedAggregator):
    """STCH (Lin et al. 2024): the gradient of ``mu log sum_t exp(lambda_t (L_t - z_t) / mu)``,
    ``w = lambda * softmax(lambda (L - z) / mu)``.

    Args:
        mu: the smoothing (default 1; ``> 0``).
        preference: ``lambda``, one positive number per task (default all ones).
        ideal: ``None`` (``z = 0``; ``z = 1`` with ``log_losses``), ``"min"`` (the running
            minimum of each task's loss) or fixed values (a number or one per task; positive
            with ``log_losses``).
        log_losses: scalarise ``log L - log z`` (positive losses only).

    Diagnostics of the last call: ``objective`` (``g_mu``), ``ideal`` (the ``z`` used, in the
    scalarised space: ``log z`` with ``log_losses``), ``softmax`` (``p``).

    Absent tasks: the scalarisation over the present tasks; with ``ideal="min"`` an absent
    task's minimum does not move, and a task first present later starts from its first loss.

    Example:
        >>> import torch
        >>> agg = STCH(mu=1.0)
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> agg(J, torch.tensor([2.0, 1.0]))     # softmax(L): the larger loss weighs more
        tensor([0.7311, 0.2689])
        >>> STCH(mu=0.1)(J, torch.tensor([2.0, 1.0]))   # nearly the max
        tensor([9.9995e-01, 4.5398e-05])
    """

    needs_losses = True
    stateful = True
    paper = ("Lin, Zhang, Chen, Zhang & Zhang, *Smooth Tchebycheff Scalarization for "
             "Multi-Objective Optimization*, ICML 2024")
    summary = "gradient of the smooth Tchebycheff scalarisation: w = lambda softmax(lambda (L - z) / mu)"

    def __init__(self, mu: float = 1.0, preference: Sequence[float] | Tensor | None = None,
                 ideal: str | float | Sequence[float] | Tensor | None = None,
                 log_losses: bool = False) -> None:
        super().__init__()
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not (
                mu > 0 and math.isfinite(mu)):
            raise ValueError(f"mu must be a positive number, got {mu!r}")
        self.mu = float(mu)
        self.preference = per_task_vector(preference, "preference", positive=True)
        self.track_min = isinstance(ideal, str)
        if self.track_min and ideal != "min":
            raise ValueError(f"ideal must be None, 'min' or numbers (one per task), got {ideal!r}")
        self.ideal = None if self.track_min else per_task_vector(
            ideal, "ideal", positive=bool(log_losses))  # type: ignore[arg-type]
        self.log_losses = bool(log_losses)
        self.running_min: Tensor | None = None  # ideal="min": [T], in loss units

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        return per_task_config(self, "preference", "ideal")

    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"running_min": ((0,), math.inf)} if self.track_min else {}

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        if losses is None:
            raise ValueError("STCH needs the loss values: agg(J, losses)")
        T = num_tasks
        if self.log_losses:
            check_positive_losses(self, losses, "STCH with log_losses=True (log L)")
        L = losses.to(dtype=dtype, device=device)
        lam = broadcast_to_tasks(self.preference, 1.0, T, "preference", L)
        if self.track_min:
            if self.running_min is not None and self.running_min.shape[0] != T:
                raise ValueError(f"STCH was tracking {self.running_min.shape[0]} tasks, got {T}; "
                                 "call reset() to start over")
            prev = L if self.running_min is None else self.running_min.to(L)
            z = torch.minimum(prev, L)
        else:
            z = broadcast_to_tasks(self.ideal, 1.0 if self.log_losses else 0.0, T, "ideal", L)
        x = (L.log() - z.log()) if self.log_losses else (L - z)
        a = lam * x / self.mu
        p = torch.softmax(a, dim=0)
        w = lam * p
        if self.log_losses:
            w = w / L
        self.diagnostics = {"objective": self.mu * torch.logsumexp(a, dim=0),
                            "ideal": z.log() if self.log_losses else z, "softmax": p}
        if self.track_min:
            self.running_min = z
        return w

    def state_dict(self) -> dict[str, Any]:
        return {"running_min": None if self.running_min is None else self.running_min.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"running_min"}
        if unknown:
            raise ValueError(f"STCH state has unknown keys {sorted(unknown)}")
        v = state.get("running_min")
        if v is not None and (not isinstance(v, Tensor) or v.dim() != 1):
            raise ValueError("STCH state 'running_min' must be a 1-D tensor or None")
        if v is not None and not self.track_min:
            raise ValueError("STCH state has a running minimum but this STCH has a fixed ideal "
                             "point: build it with ideal='min'")
        self.running_min = None if v is None else v.detach().clone()

    def reset(self) -> None:
        self.running_min = None

    def __repr__(self) -> str:
        pref = None if self.preference is None else self.preference.tolist()
        ideal: Any = "min" if self.track_min else (None if self.ideal is None
                                                   else self.ideal.tolist())
        return (f"STCH(mu={self.mu}, preference={pref}, ideal={ideal!r}, "
                f"log_losses={self.log_losses})")
