"""Penalty boundary intersection (PBI; Zhang and Li, *MOEA/D: A Multiobjective Evolutionary
Algorithm Based on Decomposition*, IEEE Transactions on Evolutionary Computation 2007,
Sec. II-C) as a loss weighting.

PBI scalarises the loss vector ``L`` along a preference direction ``r`` from the ideal point
``z``: with ``r_hat = r / ||r||``,

    d1 = <L - z, r_hat>,      d2 = || (L - z) - d1 r_hat ||,      F(L) = d1 + theta d2:

``d1`` is the distance travelled along the ray, ``d2`` the distance from it, penalised by
``theta``.  The direction is the gradient of ``F`` in the shared parameters,
``sum_t (dF/dL_t) g_t``, with

    w = dF/dL = r_hat + theta (L - z - d1 r_hat) / d2.

The weights read the loss values only (``reads == "losses"``; through
:class:`~torch_mtlgrad.MultiTaskOptimizer` the step is one backward pass of ``sum_t w_t L_t``).

Defaults and choices the paper leaves open (documented):

* ``theta = 5`` (the value of the MOEA/D paper's experiments); ``r`` all ones (the balanced
  ray; any positive vector, its scale does not matter); ``z = 0`` (the lower bound of
  non-negative losses).  MOEA/D writes ``d1 = |<L - z, r_hat>|``; here ``d1`` is signed, which is
  the same wherever ``L >= z`` and ``r > 0``, and differentiable everywhere.
* ``d2`` is not differentiable where ``L - z`` lies on the ray (``d2 = 0``); the weights there
  take the minimal-norm subgradient, 0 for the penalty term (``w = r_hat``); ``d2`` at the
  rounding level, at most ``8 T eps ||L - z||`` (``eps`` of the dtype), counts as 0.
* The scale: with ``r`` all ones the penalty term sums to 0, so ``sum_t w_t = sqrt(T)``.

Stateless: the weights are a function of the current losses only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import WeightedAggregator

__all__ = ["PBI", "broadcast_to_tasks", "per_task_config", "per_task_vector"]


def per_task_vector(value: float | Sequence[float] | Tensor | None, name: str,
                    positive: bool = False) -> Tensor | None:
    """``None`` or a 1-D float64 tensor of per-task values (a number is kept as a 0-d tensor,
    the same for every task); ``ValueError`` naming ``name`` for anything else."""
    if value is None:
        return None
    try:
        v = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a number or one number per task, got {value!r}") from err
    if v.dim() > 1 or v.numel() == 0:
        raise ValueError(f"{name} must be a number or a 1-D sequence (one per task), got shape "
                         f"{tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    if positive and not bool((v > 0).all()):
        raise ValueError(f"{name} must be positive, got {v.tolist()}")
    return v


def per_task_config(agg: object, *names: str) -> dict[str, tuple[int, ...]]:
    """The ``_task_config`` of the settings ``names`` that hold one value per task (1-D; a
    number, 0-d, is the same for every task and is not restricted)."""
    return {n: (0,) for n in names
            if isinstance(getattr(agg, n), Tensor) and getattr(agg, n).dim() == 1}


def broadcast_to_tasks(v: Tensor | None, default: float, T: int, name: str, like: Tensor) -> Tensor:
    """``v`` (from :func:`per_task_vector`) as ``[T]`` like ``like``; ``default`` where ``None``."""
    if v is None:
        return torch.full((T,), default, dtype=like.dtype, device=like.device)
    if v.dim() == 1 and v.shape[0] != T:
        raise ValueError(f"{name} has {v.shape[0]} entries but the call has {T} tasks: pass one "
                         "per task")
    return v.to(dtype=like.dtype, device=like.device).expand(T).clone()


class PBI(WeightedAggregator):
    """PBI (Zhang and Li 2007): the gradient of ``d1 + theta d2`` in the losses.

    Args:
        preference: the ray ``r`` (one positive number per task; default all ones).
        theta: the penalty on the distance from the ray (default 5; ``>= 0``).
        ideal: the ideal point ``z`` (a number or one per task; default 0).

    Diagnostics of the last call: ``d1``, ``d2`` and ``objective`` (``d1 + theta d2``).

    Absent tasks: the scalarisation of the present tasks' losses, along ``r`` and from ``z``
    restricted to them.

    Example:
        >>> import torch
        >>> agg = PBI(theta=5.0)
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> agg(J, torch.tensor([1.0, 1.0]))     # on the ray: w = r_hat
        tensor([0.7071, 0.7071])
        >>> agg(J, torch.tensor([2.0, 1.0]))     # off it: pulled back towards the ray
        tensor([ 4.2426, -2.8284])
    """

    needs_losses = True
    paper = ("Zhang & Li, *MOEA/D: A Multiobjective Evolutionary Algorithm Based on "
             "Decomposition*, IEEE TEC 2007")
    summary = "gradient of the penalty boundary intersection d1 + theta d2 along a preference ray"

    def __init__(self, preference: Sequence[float] | Tensor | None = None, theta: float = 5.0,
                 ideal: float | Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta >= 0:
            raise ValueError(f"theta must be a non-negative number, got {theta!r}")
        self.theta = float(theta)
        self.preference = per_task_vector(preference, "preference", positive=True)
        self.ideal = per_task_vector(ideal, "ideal")

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        return per_task_config(self, "preference", "ideal")

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        if losses is None:
            raise ValueError("PBI needs the loss values: agg(J, losses)")
        T = num_tasks
        L = losses.to(dtype=dtype, device=device)
        r = broadcast_to_tasks(self.preference, 1.0, T, "preference", L)
        z = broadcast_to_tasks(self.ideal, 0.0, T, "ideal", L)
        u = r / r.norm()
        x = L - z
        d1 = x @ u
        off = x - d1 * u
        d2 = off.norm()
        on_ray = d2 <= 8 * T * torch.finfo(L.dtype).eps * x.norm()
        pull = torch.where(on_ray, torch.zeros_like(off), off / torch.where(on_ray, 1.0, d2))
        self.diagnostics = {"d1": d1, "d2": d2, "objective": d1 + self.theta * d2}
        return u + self.theta * pull

    def __repr__(self) -> str:
        pref = None if self.preference is None else self.preference.tolist()
        ideal = None if self.ideal is None else self.ideal.tolist()
        return f"PBI(preference={pref}, theta={self.theta}, ideal={ideal})"
