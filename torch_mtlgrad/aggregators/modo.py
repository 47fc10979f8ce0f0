"""MoDo: multi-objective gradient with double sampling (Chen et al., NeurIPS 2023).

Chen, Fernando, Ying, Chen, *Three-Way Trade-Off in Multi-Objective Learning: Optimization,
Generalization and Conflict-Avoidance*, NeurIPS 2023 (arXiv:2305.20057; JMLR 2024), Algorithm 1.

MoDo keeps the weights ``lambda`` on the simplex between steps and moves them by one projected
gradient step of MGDA's objective ``1/2 ||lambda^T J||^2 + rho/2 ||lambda||^2`` per iteration,
instead of solving the min-norm problem.  The paper samples three independent batches
``z_{t,1}, z_{t,2}, z_{t,3}`` per step:

    lambda_{t+1} = Pi_simplex( lambda_t - gamma ( J_{t,1} J_{t,2}^T lambda_t + rho lambda_t ) )
    x_{t+1}      = x_t - alpha  J_{t,3}^T lambda_{t+1}

(``J_{t,i}`` is the ``[T, D]`` Jacobian on batch ``z_{t,i}``; the paper writes the transposed
``D x T`` matrices ``nabla F``).  The two independent batches make ``J_1 J_2^T`` an unbiased
estimate of ``nabla F^T nabla F``; that is what the paper's convergence bound needs.

With one ``J`` per step (a :class:`~torch_mtlgrad.MultiTaskOptimizer` step captures one), this
class uses ``G = J J^T`` in the update and ``d = lambda_{t+1}^T J``: the same batch for all
three, as TorchJD's ``MoDoWeighting`` does when it is given ``J J^T``.  The double sampling is
then lost (``J J^T`` is a biased estimate of the Gramian of the full gradients).  To run the
paper's scheme, compute the weights from two batches yourself with
``agg.aggregate_gramian(J1 @ J2.T).weights`` (the update reads only ``G lambda``, so a
non-symmetric ``G`` is accepted there) and take ``d = w^T J3``.

Defaults: ``gamma = 0.1``, ``rho = 0.1`` (TorchJD's; LibMTL's are ``gamma = 1e-3``,
``rho = 0.1``).  The paper leaves the step sizes to the experiment (constant ``gamma`` in its
analysis of the last iterate); both are constants here.  Initial ``lambda_0 = 1/T`` (uniform, as
in the authors' code and TorchJD).  The weights are ``lambda_{t+1}`` (on the simplex: the
``"convex"`` scale convention) and read only ``G`` (``gramian_only``); no host synchronisation.

Absent tasks (the rule of :mod:`~torch_mtlgrad.aggregators._simplex`, MoCo's too): an absent
task's ``lambda_m`` does not move; the present tasks' ``lambda`` is renormalised to sum 1
(uniform if it is all 0) for the call and the result is scaled back to the share of the simplex
they held, so the full ``lambda`` stays on the simplex.  A task first present later starts from
its share ``1/T`` of the initial ``lambda``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._simplex import SimplexState
from ._solvers import project_simplex

__all__ = ["MoDo"]


class MoDo(SimplexState, WeightedAggregator):
    """MoDo (Chen et al., NeurIPS 2023): one projected step on the weights ``lambda`` per call.

    ``lambda <- Pi_simplex(lambda - gamma (G lambda + rho lambda))`` with ``G = J J^T``, then
    ``d = lambda^T J`` with the updated ``lambda`` (see the module docstring for the paper's
    double sampling and what one ``J`` per step changes).

    Args:
        gamma: step size of the ``lambda`` update (``> 0``; default 0.1).
        rho: the ``l2`` regulariser of the ``lambda`` update (``>= 0``; default 0.1).

    Against TorchJD 0.18: ``MoDo(gamma, rho)`` on ``J`` gives the weights of
    ``MoDoWeighting(gamma, rho)`` on ``J J^T`` (the same update and defaults; tested).

    Example:
        >>> import torch
        >>> agg = MoDo()
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> agg(J)   # lambda moves from (1/2, 1/2) towards MGDA's (0.8, 0.2)
        tensor([0.5750, 0.8500])
        >>> agg.weights
        tensor([0.5750, 0.4250])
    """

    gramian_only = True
    stateful = True
    paper = ("Chen, Fernando, Ying & Chen, *Three-Way Trade-Off in Multi-Objective Learning: "
             "Optimization, Generalization and Conflict-Avoidance*, NeurIPS 2023")
    summary = ("MGDA's weights moved by one projected gradient step per call (on the simplex, "
               "kept across steps)")

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__()
        if isinstance(gamma, bool) or not (isinstance(gamma, (int, float)) and gamma > 0):
            raise ValueError(f"gamma must be a positive number (the step size of lambda), got "
                             f"{gamma!r}")
        if isinstance(rho, bool) or not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"rho must be a non-negative number (the regulariser), got {rho!r}")
        self.gamma = float(gamma)
        self.rho = float(rho)
        self.lam: Tensor | None = None  # [T]; None: 1/T each

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        T = num_tasks
        if self.lam is not None and self.lam.shape[0] != T:
            raise ValueError(f"MoDo holds weights for {self.lam.shape[0]} tasks, got {T}: call "
                             "reset() to start over with another number of tasks")
        lam = (G.new_full((T,), 1.0 / T) if self.lam is None
               else self.lam.to(device=G.device, dtype=G.dtype))
        lam = project_simplex(lam - self.gamma * (G @ lam + self.rho * lam))
        self.lam = lam
        self.diagnostics = {}
        return lam.to(device=device, dtype=dtype)

    # State -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"lambda": None if self.lam is None else self.lam.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"lambda"}
        if unknown:
            raise ValueError(f"MoDo state has unknown keys {sorted(unknown)}; expected 'lambda'")
        lam = state.get("lambda")
        if lam is not None and (not isinstance(lam, Tensor) or lam.dim() != 1):
            raise ValueError(f"MoDo state: 'lambda' must be a [T] tensor or None, got "
                             f"{getattr(lam, 'shape', type(lam).__name__)}")
        self.lam = None if lam is None else lam.detach().clone()

    def reset(self) -> None:
        self.lam = None

    def __repr__(self) -> str:
        return f"MoDo(gamma={self.gamma}, rho={self.rho})"
