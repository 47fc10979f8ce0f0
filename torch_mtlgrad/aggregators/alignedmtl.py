"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023, Algorithm 1).

Aligned-MTL removes the conflicts *and* the dominance among task gradients by making the linear
system of gradients well conditioned: it replaces the gradients by the closest (in Frobenius
norm, a Procrustes problem) set of orthogonal vectors of equal norm, rescaled.  With the
eigendecomposition of the Gramian ``G = J J^T = V Lambda V^T`` restricted to its ``R`` non-zero
eigenvalues (``lambda_1 >= ... >= lambda_R > 0``):

    B = sqrt(lambda_R) V Lambda^{-1/2} V^T,     J_hat = B J,     d = J_hat^T w = (B w)^T J,

where ``w`` are the task weights (pre-defined preferences).  The rows of ``J_hat`` are
orthogonal with norm ``sqrt(lambda_R)`` (for full rank: ``J_hat J_hat^T = lambda_R I``), so the
aligned system has condition number 1.  The scale ``sqrt(lambda_R)`` (the smallest singular
value of ``J``) is the paper's choice; the authors' code also offers the median eigenvalue and the
mean eigenvalue (their ``"rmse"``).

Conventions (documented choices):

* ``task_weights=None`` means all ones: the authors' code sums the aligned gradients.  TorchJD's
  default preference is ``1/T`` (its direction is ours divided by ``T``).
* Eigenvalues at most ``T * eps * lambda_max`` count as zero (the authors' tolerance; ``eps`` of
  ``J``'s dtype); a task whose gradient lies outside the kept eigenspace (e.g. a zero row) gets
  no aligned component along it.  With ``J = 0`` the direction is 0.

Computed from ``G`` only (a ``T x T`` eigendecomposition in float64; it synchronises with a CUDA
device).  The direction is positively homogeneous in ``J`` and equivariant under reordering of
the tasks (with their weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ._base import WeightedAggregator

__all__ = ["AlignedMTL", "alignment_matrix"]

ScaleMode = Literal["min", "median", "rmse"]


def alignment_matrix(G: Tensor, scale_mode: ScaleMode = "min", rtol: float | None = None) -> Tensor:
    """The balance transformation ``B = sqrt(scale) V Lambda^{-1/2} V^T`` of Algorithm 1.

    ``scale`` is the smallest kept eigenvalue (``"min"``, the paper's), their median
    (``"median"``, the lower middle value for an even count) or their mean (``"rmse"``).  The
    aligned gradients are ``B @ J``.

    Example:
        >>> G = torch.tensor([[4.0, 0.0], [0.0, 1.0]])    # orthogonal, norms 2 and 1
        >>> alignment_matrix(G)                            # both rescaled to norm 1
        tensor([[0.5000, 0.0000],
                [0.0000, 1.0000]])
    """
    return _alignment(G, scale_mode, rtol)[0]


def _alignment(G: Tensor, scale_mode: ScaleMode, rtol: float | None) -> tuple[Tensor, Tensor]:
    """``B`` and the eigenvalues of ``G`` (descending, float64)."""
    T = G.shape[0]
    if G.shape != (T, T):
        raise ValueError(f"G must be square [T, T], got shape {tuple(G.shape)}")
    eps = torch.finfo(G.dtype).eps
    rtol = T * eps if rtol is None else rtol
    G64 = G.to(torch.float64)
    G64 = 0.5 * (G64 + G64.T)
    evals, V = torch.linalg.eigh(G64)
    lam_max = evals.max()
    keep = evals > rtol * lam_max.clamp_min(0)
    if not bool(keep.any()):  # G = 0: every aligned gradient is 0 anyway
        return torch.zeros_like(G), evals.flip(0)
    kept = evals[keep]
    if scale_mode == "min":
        scale = kept.min()
    elif scale_mode == "median":
        scale = kept.median()
    elif scale_mode == "rmse":
        scale = kept.mean()
    else:
        raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
    Vk = V[:, keep]
    B = scale.sqrt() * (Vk * kept.rsqrt()) @ Vk.T
    return B.to(G.dtype), evals.flip(0)


class AlignedMTL(WeightedAggregator):
    """Aligned-MTL (Algorithm 1): ``d = (B w)^T J`` with the aligned gradients ``B J``.

    Args:
        task_weights: the paper's task weights ``w`` (one per task; at call time their number
            must equal ``T``); default ``None``: all ones (the authors' code).
        scale_mode: ``"min"`` (default, the paper's: smallest non-zero eigenvalue), ``"median"``
            or ``"rmse"`` (mean eigenvalue), as in the authors' code.
        rtol: relative eigenvalue cut-off (default ``T * eps`` of ``J``'s dtype).

    Computed from ``G = J J^T`` only.  ``diagnostics``: ``eigenvalues`` of ``G`` (descending).
    Absent tasks: the alignment runs on the present tasks' Gramian, with their ``task_weights``.

    Example:
        >>> import torch
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])   # orthogonal, norms 2 and 1
        >>> AlignedMTL()(J)                               # aligned: both of norm 1, summed
        tensor([1., 1.])
    """

    paper = "Senushkin et al., *Independent Component Alignment for Multi-Task Learning*, CVPR 2023"
    summary = "Aligned-MTL: aligns the task gradients by an eigen-decomposition of the Gramian"

    gramian_only = True

    def __init__(self, task_weights: Sequence[float] | Tensor | None = None,
                 scale_mode: ScaleMode = "min", rtol: float | None = None) -> None:
        super().__init__()
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        if rtol is not None and not (isinstance(rtol, (int, float)) and rtol >= 0):
            raise ValueError(f"rtol must be a non-negative number or None, got {rtol!r}")
        tw: Tensor | None = None
        if task_weights is not None:
            tw = torch.as_tensor(task_weights, dtype=torch.float64).detach().cpu()
            if tw.dim() != 1 or tw.numel() == 0:
                raise ValueError(
                    f"task_weights must be 1-D (one per task), got shape {tuple(tw.shape)}")
            if not bool(torch.isfinite(tw).all()):
                raise ValueError(f"task_weights must be finite, got {tw.tolist()}")
        self.task_weights = tw
        self.scale_mode = scale_mode
        self.rtol = rtol

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        T = G.shape[0]
        if self.task_weights is None:
            pref = G.new_ones(T)
        else:
            if self.task_weights.numel() != T:
                raise ValueError(
                    f"AlignedMTL has {self.task_weights.numel()} task weights but J has {T} rows "
                    "(tasks); give one weight per task"
                )
            pref = self.task_weights.to(device=G.device, dtype=G.dtype)
        B, evals = _alignment(G, self.scale_mode, self.rtol)
        self.diagnostics = {"eigenvalues": evals.to(G.dtype)}
        return B @ pref

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        return {"task_weights": (0,)}

    def __repr__(self) -> str:
        tw = None if self.task_weights is None else self.task_weights.tolist()
        return f"AlignedMTL(task_weights={tw}, scale_mode={self.scale_mode!r})"
