"""UPGrad: unconflicting projection of gradients (Quinton and Rey, 2024).

Quinton and Rey, *Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232 (2024),
Sec. 3 ("UPGrad").  Each row is projected onto the dual cone of the rows,
``C(J) = {x : J x >= 0}``, and the projections are averaged:

    A_UPGrad(J) = (1/T) sum_i pi_J(g_i)                       (their definition of UPGrad)

With a preference vector ``p`` (default uniform ``1/T``, as in the paper) the average becomes
``sum_i p_i pi_J(g_i)``.  The projection is computed through its dual over the Gramian (the
paper's Proposition on the dual problem): ``pi_J(p_i g_i) = J^T (p_i e_i + lam_i)`` with

    lam_i = argmin_{lam >= 0} 1/2 lam^T G lam + lam^T (p_i G e_i)

so the weights are ``w = p + sum_i lam_i`` and ``d = w^T J``; computed from ``G = J J^T`` only,
with the library's one cone-projection solver
(:func:`torch_mtlgrad.aggregators._solvers.dual_cone_weights`, exact, float64, on the CPU: one
host synchronisation per call).  From ``J``, ``G`` is accumulated in float64 and ``w^T J`` summed
in float64 (see :class:`ConeWeighting`), so a float32 ``d`` is the same, to about one float32
ulp, for any order of the rows.

Properties the paper proves (and the tests check): non-conflicting (``J d >= 0``), linear under
scaling of the rows (``c -> A(diag(c) J)`` is linear for ``c > 0``), weighted (``d`` lies in the
span of the rows), and, with uniform ``p``, invariant to the order of the tasks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import WeightedAggregator
from ._solvers import combine64, dual_cone_weights, gramian64

__all__ = ["ConeWeighting", "UPGrad", "check_pref_vector"]


def check_pref_vector(pref_vector: Tensor | None, T: int, like: Tensor) -> Tensor:
    """The preference vector for ``T`` tasks (uniform ``1/T`` when ``None``), validated."""
    if pref_vector is None:
        return like.new_full((T,), 1.0 / T)
    if pref_vector.dim() != 1 or pref_vector.shape[0] != T:
        raise ValueError(
            f"pref_vector must have shape [{T}] (one entry per row of J), "
            f"got shape {tuple(pref_vector.shape)}")
    p = pref_vector.detach().to(device=like.device, dtype=like.dtype)
    if not bool((p >= 0).all()) or not bool(p.isfinite().all()):
        raise ValueError(f"pref_vector must be finite and non-negative, got {pref_vector}")
    return p


class ConeWeighting(WeightedAggregator):
    """Shared part of UPGrad and DualProj: a preference vector ``p`` and the dual-cone solver's
    warm starts (the last supports of its active-set solves: a speed-only cache, each warm start
    verified, see :func:`~torch_mtlgrad.aggregators._solvers.nnqp`, so not part of the state)."""

    gramian_only = True

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__()
        self._warm: dict = {}
        self.pref_vector = pref_vector

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        """Absent tasks: ``pref_vector`` (when given) is restricted to the present tasks, not
        renormalised; the default is uniform over the present tasks."""
        return {"pref_vector": (0,)}

    def _pref(self, G: Tensor) -> Tensor:
        return check_pref_vector(self.pref_vector, G.shape[0], G)

    # Precision.  Everything from G to the weights runs in float64 (the solve, the right-hand
    # sides, the sum of the multipliers), ``aggregate(J)`` builds G with float64 accumulation
    # (:func:`~torch_mtlgrad.aggregators._solvers.gramian64`) and forms ``d = w^T J`` with a
    # float64 sum over the rows (:func:`~torch_mtlgrad.aggregators._solvers.combine64`): on
    # rank-deficient J the multipliers are large and cancel, and float32 steps there made ``d``
    # depend on the order of the rows by ~1e-6 (now ~1e-8, a float32 ulp).  ``weights`` and
    # ``diagnostics`` are then rounded to the input's dtype.
    def _weights64(self, G64: Tensor) -> tuple[Tensor, Tensor]:
        """``(w, lam)`` in float64 from the float64 Gramian."""
        raise NotImplementedError

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        G = gramian64(J)
        w64, lam = self._weights64(G)
        self.weights = w64.to(J.dtype)
        self.gramian = G
        self.diagnostics = {"lam": lam.to(J.dtype)}
        return combine64(w64, J)

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        w64, lam = self._weights64(G.to(torch.float64))
        self.diagnostics = {"lam": lam.to(G.dtype)}
        return w64.to(G.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pref_vector={self.pref_vector!r})"


class UPGrad(ConeWeighting):
    """UPGrad (Quinton and Rey, 2024): ``d = sum_i p_i pi_J(g_i)``, ``pi_J`` onto ``{x: Jx >= 0}``.

    Computed from the Gramian ``G = J J^T`` only.

    Args:
        pref_vector: the weights ``p`` of the projected rows (``[T]``, non-negative); ``None``
            (default) is the paper's uniform ``1/T``.

    ``weights`` after a call are ``w = p + sum_i lam_i`` (``d = w^T J``); ``diagnostics["lam"]``
    is the ``[T, T]`` matrix whose column ``i`` is ``lam_i``.

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> d = UPGrad()(J)
        >>> d
        tensor([0.2500, 0.7500])
        >>> J @ d   # no task's loss increases
        tensor([0.2500, 0.5000])
    """

    paper = "Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, arXiv 2024"
    summary = ("unconflicting projection of gradients: the mean of the rows projected onto the "
               "dual cone")

    def _weights64(self, G64: Tensor) -> tuple[Tensor, Tensor]:
        p = self._pref(G64)
        # Column i of B is J (p_i g_i) = p_i G[:, i]: one dual problem per row.
        lam = dual_cone_weights(G64, G64 * p[None, :], warm=self._warm)
        return p + lam.sum(dim=1), lam
