"""ConFIG, conflict-free inverse gradients (Liu, Chu and Thuerey, *ConFIG: Towards
Conflict-free Training of Physics Informed Neural Networks*, ICLR 2025, Sec. 3, eq. 2-3).

With ``U(v) = v / ||v||`` and the unit gradients ``u_i = U(g_i)``:

    g_u = U( [u_1, ..., u_m]^{-T} w ),        g_ConFIG = (sum_i g_i^T g_u) g_u,

``M^{-T}`` the pseudo-inverse of ``M^T`` and ``w`` a vector of positive direction weights (the
paper's default, and ours, ``w = 1_m``).  ``x = [u_1, ..., u_m]^{-T} w`` is the least-norm ``x``
with ``u_i . x = w_i``, so with ``w = 1`` the direction makes the same angle with every
gradient, and ``g_i . g_ConFIG > 0`` for all ``i`` whenever that system has an exact solution
(e.g. linearly independent gradients); the length is the sum of the gradients' projections onto
``g_u`` (the paper's default length model).

From the Gramian.  ``x = U^T C^+ w`` with ``U`` the unit rows and ``C = U U^T = N^{-1} G N^{-1}``
the cosine matrix (``N = diag(||g_i||)``), so ``x = J^T v`` with ``v = N^{-1} C^+ w``, and

    g_ConFIG = (1^T G v / v^T G v) J^T v:   weights  omega = v (1^T G v) / (v^T G v),

all from ``G = J J^T``: ConFIG is a :class:`WeightedAggregator` with ``gramian_only``.  (With
``w = 1`` its line is IMTL-G's, ``J^T G^+ n``: both ask for equal projections onto the unit
gradients; they differ in the length.)  Computed in float64 from ``G`` (one ``T x T``
eigendecomposition, which synchronises with a CUDA device).

Choices the paper leaves open (documented, tested):

* Pseudo-inverse cut-off: eigenvalues of ``C`` at most ``T eps lambda_max`` (``eps`` of ``J``'s
  dtype) count as zero (``rtol=``).  TorchJD takes ``pinv`` of the unit rows themselves
  (singular values at most ``max(T, D) eps sigma_max``); the two agree wherever the rows are
  not nearly dependent.
* A zero gradient has no unit vector: its row of ``C`` is 0 and its weight 0 (TorchJD's
  ``nan_to_num`` of the unit rows gives the same).
* When ``w`` has no component in the range of ``C`` (``C^+ w`` at rounding level, e.g. exactly
  opposite gradients, where no direction makes the same positive angle with both) the weights
  are 0 and ``d = 0``.  TorchJD normalises the rounding-level vector instead.
* Rows that are dependent in a way no equal-angle direction fits (more tasks than dimensions)
  get the least-squares ``x``; the result may then conflict with a row, as in the authors' code.

Scale: on ``T`` equal rows ``g`` the length is ``T ||g||``, so ``d = T g``: the ``"sum"``
convention.  Invariant under a permutation of the tasks (with ``w`` permuted alike) and
positively homogeneous; the direction does not change when a row is rescaled (only ``u_i``
enters it), so with the length ``sum_i c_i g_i^T g_u`` the map ``c -> A(diag(c) J)`` is linear
on ``c > 0`` (linear under scaling).

Against TorchJD 0.18 (``torchjd.aggregation.ConFIG(pref_vector)``): the same formula, its
``pref_vector`` is our ``pref_vector`` (default all ones there, ``None`` here, the same
direction: the result does not depend on the scale of ``w``), the same length; equal up to
rounding on non-degenerate inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import WeightedAggregator
from .imtlg import cosines64
from .upgrad import check_pref_vector

__all__ = ["ConFIG", "config_weights"]


def config_weights(G: Tensor, pref: Tensor | None = None, rtol: float | None = None) -> Tensor:
    """ConFIG's weights ``omega = v (1^T G v) / (v^T G v)``, ``v = N^{-1} C^+ w``, from ``G``.

    Args:
        G: ``[T, T]`` Gramian.
        pref: the direction weights ``w`` (``[T]``, non-negative, not all 0); ``None``: all 1.
        rtol: eigenvalues of ``C`` at most ``rtol * lambda_max`` count as zero (default
            ``T * eps`` of ``G``'s dtype).

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]])   # g1 = e1, g2 = 2 e2
        >>> config_weights(G)    # d = (1.5, 1.5): 45 degrees to both, length 1 + 2 projections
        tensor([1.5000, 0.7500])
    """
    T = G.shape[0]
    eps = torch.finfo(G.dtype).eps
    rtol = T * eps if rtol is None else rtol
    G64, inv_n, C = cosines64(G)
    p = G64.new_ones(T) if pref is None else pref.to(G64)
    p = p / p.max()
    c = torch.linalg.pinv(C, hermitian=True, rtol=rtol) @ p  # x = U^T c
    v = c * inv_n
    sq = v @ G64 @ v  # ||x||^2 = ||g_u||^2 before normalising
    length_sq = (G64 @ v).sum()  # (sum_i g_i . x)
    # C is scale-free (|C_ij| <= 1): c at rounding level means w has no component in its range.
    ok = (c.abs().sum() > 1e3 * T * eps) & (sq > 0)
    w = torch.where(ok, v * length_sq / torch.where(ok, sq, torch.ones_like(sq)),
                    torch.zeros_like(v))
    return w.to(G.dtype)


class ConFIG(WeightedAggregator):
    """ConFIG (Liu, Chu and Thuerey, ICLR 2025): the direction with equal angles to every
    gradient (for ``pref_vector = None``), of length the sum of the gradients' projections.

    Args:
        pref_vector: the paper's direction weights ``w`` (``[T]``, non-negative, one per task);
            ``None`` (default): all equal (the paper's default).  Only their ratios matter.
        rtol: relative eigenvalue cut-off of the pseudo-inverse (default ``T * eps`` of ``J``'s
            dtype).

    Computed from ``G = J J^T`` only (see the module docstring).  No diagnostics of its own:
    the optimizer's (each row's angle to ``d``, from ``G`` and the weights) show the equal
    angles.

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> d = ConFIG()(J)
        >>> d                                   # sum of the projections: 1.5 sqrt(2) ...
        tensor([1.5000, 1.5000])
        >>> (J @ d) / (J.norm(dim=1) * d.norm())   # ... at 45 degrees to both rows
        tensor([0.7071, 0.7071])
    """

    gramian_only = True
    paper = ("Liu, Chu & Thuerey, *ConFIG: Towards Conflict-free Training of Physics Informed "
             "Neural Networks*, ICLR 2025")
    summary = ("the direction at equal angles to every task gradient (pseudo-inverse of the unit "
               "gradients), of length the sum of their projections")

    def __init__(self, pref_vector: Tensor | None = None, rtol: float | None = None) -> None:
        super().__init__()
        if pref_vector is not None:
            if not isinstance(pref_vector, Tensor):
                pref_vector = torch.as_tensor(pref_vector, dtype=torch.float64)
            if (pref_vector.dim() != 1 or not bool((pref_vector > 0).any())
                    or not bool((pref_vector >= 0).all())):
                raise ValueError("pref_vector must be a 1-D tensor with one non-negative entry "
                                 f"per task, at least one positive, got {pref_vector}")
        if rtol is not None and not (isinstance(rtol, (int, float)) and rtol >= 0):
            raise ValueError(f"rtol must be a non-negative number or None, got {rtol!r}")
        self.pref_vector = pref_vector
        self.rtol = rtol

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        return {"pref_vector": (0,)}

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        pref = None if self.pref_vector is None else check_pref_vector(self.pref_vector,
                                                                        num_tasks, G)
        if pref is not None and not bool((pref > 0).any()):
            raise ValueError("pref_vector is 0 at every present task: at least one present task "
                             "needs a positive weight")
        self.diagnostics = {}
        return config_weights(G, pref, self.rtol)

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"ConFIG(pref_vector={pref}, rtol={self.rtol})"
