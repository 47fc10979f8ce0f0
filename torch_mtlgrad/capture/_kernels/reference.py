"""Pure-PyTorch twin of the fused row kernel: same results on any device.

Filling row ``t`` of the task Jacobian ``J`` from the per-parameter gradients of task ``t`` is
one multi-tensor copy (``torch._foreach_copy_`` into views of the row, casting to the row's
dtype on the way), plus two statistics of the values *as written into the row*:

* ``sq_norms[i] = sum_k row[offset_i + k]^2``, the squared norm of parameter ``i``'s gradient
  (accumulated in float32, float64 for a float64 row).  Per-task squared norms are their sum,
  per-module squared norms the sum over a module's parameters
  (:func:`segment_sq_norms`);
* ``nonfinite[i]``, how many of parameter ``i``'s values are NaN or +-Inf (int32).

:func:`fill_rows_reference` does the same for a block of rows ``[R, D]`` from batched gradients
``[R, *shape]`` (the batched capture modes).  The Triton kernel in
:mod:`torch_mtlgrad.capture._kernels.fused_rows` computes the same numbers in one pass; this module is
its reference in the tests and its fallback where Triton or CUDA is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ...aggregators import work_dtype

__all__ = [
    "RowStats",
    "acc_dtype",
    "check_inputs",
    "check_out",
    "fill_row_reference",
    "fill_rows_reference",
    "param_segment_ids",
    "segment_sq_norms",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the statistics for a row of ``dtype``: the aggregation's work dtype
    (:func:`torch_mtlgrad.aggregators.work_dtype`: float64 stays, else float32)."""
    return work_dtype(dtype)


class RowStats(NamedTuple):
    """Statistics of rows of ``J`` gathered while filling them.

    Attributes:
        sq_norms: ``[P]`` (one row) or ``[R, P]`` (a block of rows): per-parameter squared
            norms of the values written into the row(s), in :func:`acc_dtype` of the row's
            dtype; ``None`` if not computed.
        nonfinite: same shape, int32: per-parameter count of NaN/Inf values; ``None`` if not
            computed.

    Example:
        >>> s = RowStats(torch.tensor([1.0, 4.0]), torch.tensor([0, 2], dtype=torch.int32))
        >>> s.sq_norm(), s.nonfinite_count()
        (tensor(5.), tensor(2))
    """

    sq_norms: Tensor | None
    nonfinite: Tensor | None

    def sq_norm(self) -> Tensor:
        """Squared norm of each row (0-d for one row, ``[R]`` for a block)."""
        if self.sq_norms is None:
            raise ValueError("these RowStats were computed without norms")
        return self.sq_norms.sum(-1)

    def nonfinite_count(self) -> Tensor:
        """Number of NaN/Inf values in each row (int64; 0-d for one row, ``[R]`` for a block)."""
        if self.nonfinite is None:
            raise ValueError("these RowStats were computed without the non-finite check")
        return self.nonfinite.sum(-1)

    @staticmethod
    def empty(num_params: int, rows: int | None, dtype: torch.dtype, device: torch.device | str,
              norms: bool = True, check: bool = True) -> RowStats:
        """Uninitialised buffers to pass as ``out=`` (``rows=None``: one row, shape ``[P]``).

        ``dtype`` is the row's dtype; the norms are kept in :func:`acc_dtype` of it.
        """
        shape = (num_params,) if rows is None else (rows, num_params)
        return RowStats(
            torch.empty(shape, dtype=acc_dtype(dtype), device=device) if norms else None,
            torch.empty(shape, dtype=torch.int32, device=device) if check else None,
        )

    def row(self, t: int) -> RowStats:
        """The statistics of row ``t`` of a block (views, so ``out=stats.row(t)`` fills them)."""
        return RowStats(None if self.sq_norms is None else self.sq_norms[t],
                        None if self.nonfinite is None else self.nonfinite[t])

    def rows(self, a: int, b: int) -> RowStats:
        """Rows ``a:b`` of a block (views)."""
        return RowStats(None if self.sq_norms is None else self.sq_norms[a:b],
                        None if self.nonfinite is None else self.nonfinite[a:b])


def param_segment_ids(layout, modules) -> Tensor:
    """``[P]`` long tensor: for each shared parameter the index of the module that owns it, or -1.

    Args:
        layout: the :class:`~torch_mtlgrad.FlatLayout`.
        modules: modules whose parameters are all shared (no two sharing a parameter).

    Example:
        >>> from torch_mtlgrad import FlatLayout
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        >>> param_segment_ids(FlatLayout([*a.parameters(), *b.parameters()]), [b]).tolist()
        [-1, -1, 0, 0]
    """
    seg = torch.full((len(layout.params),), -1, dtype=torch.long)
    for k, m in enumerate(modules):
        for name, p in m.named_parameters():
            if not layout.contains(p):
                raise ValueError(f"parameter {name!r} of module {k} ({type(m).__name__}) is not shared")
            i = layout.index_of(p)
            if seg[i] >= 0 and seg[i] != k:
                raise ValueError(f"module {k} shares parameter {name!r} with module {int(seg[i])}")
            seg[i] = k
    return seg


def segment_sq_norms(sq_norms: Tensor, param_segments: Tensor, num_segments: int) -> Tensor:
    """Per-segment (e.g. per-module) squared norms from per-parameter ones, deterministically.

    Args:
        sq_norms: ``[..., P]`` per-parameter squared norms (:attr:`RowStats.sq_norms`).
        param_segments: ``[P]`` segment index per parameter (``-1``: in no segment), as from
            :func:`param_segment_ids`.
        num_segments: ``K``.

    Returns:
        ``[..., K]``: one matrix product with the ``[P, K]`` 0/1 membership matrix (no atomics,
        so the result is the same from run to run, and no host synchronisation).

    Example:
        >>> segment_sq_norms(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, -1, 0]), 1)
        tensor([5.])
    """
    seg = param_segments.to(sq_norms.device)
    if seg.dim() != 1 or seg.shape[0] != sq_norms.shape[-1]:
        raise ValueError(f"param_segments must have shape [{sq_norms.shape[-1]}], got {tuple(seg.shape)}")
    member = (seg[:, None] == torch.arange(num_segments, device=seg.device)[None, :]).to(sq_norms.dtype)
    return sq_norms @ member


def check_inputs(layout, rows: Tensor, grads: Sequence[Tensor | None], block: bool) -> None:
    """Clear errors for a row (``block=False``: ``[D]``) or block of rows (``[R, D]``) and its grads."""
    what = "rows" if block else "row"
    if not isinstance(rows, Tensor) or not rows.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor")
    want = 2 if block else 1
    if rows.dim() != want or rows.shape[-1] != layout.numel:
        shape = f"[R, {layout.numel}]" if block else f"[{layout.numel}]"
        raise ValueError(f"{what} must have shape {shape}, got {tuple(rows.shape)}")
    if rows.stride(-1) != 1:
        raise ValueError(f"{what} must have unit stride along D (a row or rows of J)")
    if len(grads) != len(layout.params):
        raise ValueError(f"got {len(grads)} gradients for {len(layout.params)} shared parameters")
    # Fast path (this runs every row of every step): cheap attribute reads only.
    dev = rows.get_device()
    shapes = layout.shapes
    ok = True
    if block:
        R = rows.shape[0]
        for g, shape in zip(grads, shapes):
            if g is not None and (g.shape[1:] != shape or g.shape[0] != R or g.get_device() != dev
                                  or not g.is_floating_point()):
                ok = False
                break
    else:
        for g, shape in zip(grads, shapes):
            if g is not None and (g.shape != shape or g.get_device() != dev or not g.is_floating_point()):
                ok = False
                break
    if ok:
        return
    lead = (rows.shape[0],) if block else ()
    for i, g in enumerate(grads):
        if g is None:
            continue
        if not isinstance(g, Tensor) or not g.is_floating_point():
            raise TypeError(f"gradient of {layout.names[i]!r} is not a floating-point tensor")
        if g.device != rows.device:
            raise ValueError(f"gradient of {layout.names[i]!r} is on {g.device}, the {what} on {rows.device}")
        if tuple(g.shape) != (*lead, *layout.shapes[i]):
            raise ValueError(f"gradient of {layout.names[i]!r} has shape {tuple(g.shape)}, expected "
                             f"{(*lead, *tuple(layout.shapes[i]))}")


def check_out(layout, rows: Tensor, out: RowStats | None, block: bool) -> None:
    """Clear errors for ``out=`` buffers of the wrong shape, dtype or device."""
    if out is None:
        return
    P = len(layout.params)
    want = (rows.shape[0], P) if block else (P,)
    for name, t, dt in (("sq_norms", out.sq_norms, acc_dtype(rows.dtype)), ("nonfinite", out.nonfinite, torch.int32)):
        if t is not None and (tuple(t.shape) != want or t.dtype != dt or t.device != rows.device
                              or t.stride(-1) != 1):
            raise ValueError(f"out.{name} must be a {dt} tensor of shape {list(want)} on {rows.device} "
                             f"with unit last stride, got {t.dtype} {tuple(t.shape)} on {t.device}")


def _stats_of(views: list[Tensor], acc: torch.dtype, norms: bool, check: bool,
              out: RowStats | None, shape: tuple[int, ...]) -> RowStats:
    """Statistics of each of ``views`` (one per parameter) into ``[*shape]`` tensors."""
    sq = bad = None
    if norms:
        n = torch._foreach_norm(views, 2, dtype=acc)
        sq = torch.stack(n).square().reshape(shape)
        if out is not None and out.sq_norms is not None:
            out.sq_norms.copy_(sq)
            sq = out.sq_norms
    if check:
        # NaN/Inf -> 1, else 0; summed in float64 (exact up to 2^53 values per parameter).
        flags = [(~torch.isfinite(v)).to(torch.float32) for v in views]
        c = torch._foreach_norm(flags, 1, dtype=torch.float64)
        bad = torch.stack(c).to(torch.int32).reshape(shape)
        if out is not None and out.nonfinite is not None:
            out.nonfinite.copy_(bad)
            bad = out.nonfinite
    return RowStats(sq, bad)


def fill_row_reference(layout, row: Tensor, grads: Sequence[Tensor | None], *,
                       out: RowStats | None = None, norms: bool = True, check: bool = True) -> RowStats:
    """Row ``[D]`` <- the per-parameter gradients (cast to the row's dtype; ``None`` -> zeros),
    with per-parameter squared norms and non-finite counts of what was written.

    Args:
        layout: the :class:`~torch_mtlgrad.FlatLayout` of the shared parameters.
        row: ``[D]`` destination (e.g. ``J[t]``), any floating dtype.
        grads: one gradient (shaped like its parameter, any floating dtype) or ``None`` per
            shared parameter.
        out: optional buffers (:meth:`RowStats.empty`) to write the statistics into.
        norms, check: compute the squared norms / the non-finite counts (each is one more pass
            over the row here; the Triton kernel computes both during the copy).

    Returns:
        :class:`RowStats` with ``[P]`` tensors (``None`` for what was not asked).

    Example:
        >>> from torch_mtlgrad import FlatLayout
        >>> lin = torch.nn.Linear(2, 1)
        >>> layout = FlatLayout(list(lin.parameters()))
        >>> row = torch.empty(3)
        >>> st = fill_row_reference(layout, row, [torch.tensor([[3.0, 4.0]]), None])
        >>> row, st.sq_norms, st.nonfinite
        (tensor([3., 4., 0.]), tensor([25.,  0.]), tensor([0, 0], dtype=torch.int32))
    """
    check_inputs(layout, row, grads, block=False)
    check_out(layout, row, out, block=False)
    layout.fill_row(row, grads)  # one multi-tensor copy, None -> zeros
    views = layout.views(row)
    return _stats_of(views, acc_dtype(row.dtype), norms, check, out, (len(views),))


def fill_rows_reference(layout, rows: Tensor, grads: Sequence[Tensor | None], *,
                        out: RowStats | None = None, norms: bool = True, check: bool = True) -> RowStats:
    """Block of rows ``[R, D]`` <- batched per-parameter gradients ``[R, *shape]`` (``None`` ->
    zeros), with ``[R, P]`` squared norms and non-finite counts.  See :func:`fill_row_reference`.

    Example:
        >>> from torch_mtlgrad import FlatLayout
        >>> layout = FlatLayout([torch.nn.Parameter(torch.zeros(2))])
        >>> rows = torch.empty(2, 2)
        >>> st = fill_rows_reference(layout, rows, [torch.tensor([[1.0, 2.0], [3.0, float("inf")]])])
        >>> st.sq_norms.tolist(), st.nonfinite.tolist()
        ([[5.0], [inf]], [[0], [1]])
    """
    check_inputs(layout, rows, grads, block=True)
    check_out(layout, rows, out, block=True)
    R = rows.shape[0]
    blocks, dst, src = [], [], []
    for i, g in enumerate(grads):
        s, e = layout.param_range(i)
        b = rows[:, s:e]
        blocks.append(b)
        if g is None:
            b.zero_()
        else:
            dst.append(b)
            src.append(g.reshape(R, e - s))
    if dst:
        torch._foreach_copy_(dst, src)
    acc = acc_dtype(rows.dtype)
    # Per-(row, parameter) views, parameter-major then transposed into [R, P].
    per = [b[r] for b in blocks for r in range(R)]
    st = _stats_of(per, acc, norms, check, None, (len(blocks), R))
    sq = None if st.sq_norms is None else st.sq_norms.T
    bad = None if st.nonfinite is None else st.nonfinite.T
    if out is not None:
        if sq is not None and out.sq_norms is not None:
            out.sq_norms.copy_(sq)
            sq = out.sq_norms
        if bad is not None and out.nonfinite is not None:
            out.nonfinite.copy_(bad)
            bad = out.nonfinite
    return RowStats(sq, bad)
