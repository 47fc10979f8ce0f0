"""Fast paths for building the task Jacobian: a fused Triton kernel with a PyTorch twin.

* :func:`fill_row_fused` / :func:`fill_rows_fused`: copy + cast + non-finite count + per-parameter
  squared norms in one pass (Triton on CUDA, :mod:`.reference` elsewhere).
* :class:`RowStats`, :func:`segment_sq_norms`, :func:`param_segment_ids`: the statistics and
  their reduction to per-task and per-module norms.

Importing this package does not import Triton; the kernel is compiled on first use.
"""

from .fused_rows import (
    DEFAULT_CONFIG,
    KernelConfig,
    backend_for,
    fill_row_fused,
    fill_rows_fused,
    triton_available,
)
from .reference import (
    RowStats,
    acc_dtype,
    fill_row_reference,
    fill_rows_reference,
    param_segment_ids,
    segment_sq_norms,
)

__all__ = [
    "DEFAULT_CONFIG",
    "KernelConfig",
    "RowStats",
    "acc_dtype",
    "backend_for",
    "fill_row_fused",
    "fill_row_reference",
    "fill_rows_fused",
    "fill_rows_reference",
    "param_segment_ids",
    "segment_sq_norms",
    "triton_available",
]
