"""Fused construction of rows of the task Jacobian on CUDA (Triton), with a PyTorch fallback.

One kernel launch fills a row of ``J`` (or a block of rows, for the batched capture modes) from
the per-parameter gradient tensors, and in the same pass over the data:

* casts each gradient (float16, bfloat16, float32 or float64) to the row's dtype;
* counts the NaN/Inf values of each parameter's gradient (as written into the row), on the
  device, without synchronising;
* computes each parameter's squared norm (per-task and per-module norms follow by a tiny
  reduction, :func:`~torch_mtlgrad.capture._kernels.reference.segment_sq_norms`).

Without the fusion these are four passes over ``J``: the copy, a cast, ``isfinite`` and the
norms.  :func:`fill_row_fused` / :func:`fill_rows_fused` choose the Triton kernel for CUDA
tensors when Triton is importable (and ``TORCH_MTLGRAD_TRITON`` is not ``0``), else the
pure-PyTorch twin of :mod:`torch_mtlgrad.capture._kernels.reference`, which computes the same numbers
(to the rounding of the sums) on any device.

How the kernel is laid out:

* Every parameter is cut into tiles of ``CHUNK`` elements (a parameter has at least one tile);
  program ``(tile, r)`` copies one tile of row ``r``.  The tile -> parameter table and the
  parameters' sizes and column offsets are computed once per layout and source-dtype pattern
  and kept on the device.
* The gradients' addresses change from step to step, so they travel in a small int64 table
  (one entry per parameter) copied host -> device from pinned memory without blocking.  The
  tables of the last few address patterns are cached: the caching allocator hands the same
  addresses back step after step, so in steady state no copy is made at all.
* Each program writes its tile's partial sum of squares and non-finite count; the last program
  to finish a parameter (an atomic per-parameter ticket, reset by that program) adds the
  partials in a fixed order, so the norms are the same from run to run (no float atomics).
* Parameters whose source address, size and column offset allow 16-byte accesses take a
  vectorised path; the others a scalar one (a runtime branch per program, same kernel).

Gradients of several dtypes are handled with one launch per dtype.  ``None`` gradients write
zeros.  Non-contiguous gradients are made contiguous first (one extra copy).  Everything runs
on the current stream; the kernel never synchronises with the host.  During CUDA-graph capture
a gradient address pattern that has not been seen before falls back to the twin (the table
copy cannot be captured safely); patterns seen before (static gradient buffers) use the kernel.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .reference import (
    RowStats,
    acc_dtype,
    check_inputs,
    check_out,
    fill_row_reference,
    fill_rows_reference,
)

__all__ = [
    "DEFAULT_CONFIG",
    "KernelConfig",
    "backend_for",
    "fill_row_fused",
    "fill_rows_fused",
    "triton_available",
]

log = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of the kernel.

    Args:
        chunk: elements per program (a multiple of ``block``).
        block: elements per inner iteration (a power of two).
        num_warps: warps per program.
        fused_reduce: the last program of each parameter adds the partials (one launch);
            ``False`` runs a second small kernel for that instead.

    Example:
        >>> KernelConfig().chunk % KernelConfig().block
        0
    """

    chunk: int = 16384
    block: int = 2048
    num_warps: int = 4
    fused_reduce: bool = True

    def __post_init__(self) -> None:
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {self.block}")
        if self.chunk < self.block or self.chunk % self.block:
            raise ValueError(f"chunk must be a positive multiple of block={self.block}, got {self.chunk}")


DEFAULT_CONFIG = KernelConfig()

# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------
_TRITON: Any = None  # the module once imported, False if it cannot be


def triton_available() -> bool:
    """Whether the Triton path can be used (Triton importable, CUDA present, not disabled by
    ``TORCH_MTLGRAD_TRITON=0``)."""
    global _TRITON
    if os.environ.get("TORCH_MTLGRAD_TRITON", "1") == "0":
        return False
    if _TRITON is None:
        try:
            import triton

            _TRITON = triton
        except Exception:  # noqa: BLE001 - a broken Triton install means: no kernel
            _TRITON = False
    return bool(_TRITON) and torch.cuda.is_available()


def backend_for(rows: Tensor, grads: Sequence[Tensor | None]) -> str:
    """``"triton"`` or ``"reference"``: which path :func:`fill_row_fused` takes for these inputs."""
    if not rows.is_cuda or not triton_available():
        return "reference"
    if rows.dtype not in _DTYPES:
        return "reference"
    for g in grads:
        if g is not None and (g.dtype not in _DTYPES or g.device != rows.device):
            return "reference"
    return "triton"


# --------------------------------------------------------------------------------------------
# The kernels (built on first use)
# --------------------------------------------------------------------------------------------
_KERNELS: dict[str, Any] = {}


def _kernels() -> dict[str, Any]:
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl
    from triton import knobs

    from . import _triton_fill

    _KERNELS.update(fill=_triton_fill.fill_rows_kernel, reduce=_triton_fill.reduce_kernel, tl=tl,
                    triton=triton, knobs=knobs)
    return _KERNELS


def _tl_dtype(dtype: torch.dtype) -> Any:
    tl = _kernels()["tl"]
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


# --------------------------------------------------------------------------------------------
# Per-layout plans
# --------------------------------------------------------------------------------------------
_TABLE_CACHE = 64  # address patterns kept per group
_RING = 64  # pinned host / device slots for new address tables
_DIRECT = os.environ.get("TORCH_MTLGRAD_TRITON_DIRECT", "1") != "0"


@dataclass
class _Group:
    """The parameters of one source dtype, their tiles and device tables."""

    members: list[int]  # layout indices
    src_dtype: torch.dtype
    n_tiles: int
    maxt: int
    meta: Tensor  # [4, Pg + 1] int64 on the device
    tile_param: Tensor  # [n_tiles] int32
    static_vec: list[bool]  # size and offset allow 16-byte access
    tables: OrderedDict = field(default_factory=OrderedDict)  # addresses -> [2, Pg] int64
    scratch: dict = field(default_factory=dict)  # acc dtype -> (partial, partial_bad, tickets)
    launchers: dict = field(default_factory=dict)  # specialisation -> compiled kernel
    hits: int = 0  # address-table cache hits and misses (host -> device copies)
    misses: int = 0
    ring: Any = None  # (pinned host [RING, 2, Pg], its numpy view, device [RING, 2, Pg], events, keys)
    ring_pos: int = 0


@dataclass
class _Plan:
    groups: list[_Group]


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(layout: Any, device: torch.device, key: Any, src_dtypes: Sequence[torch.dtype],
          cfg: KernelConfig) -> _Plan:
    per_layout = _PLANS.get(layout)
    if per_layout is None:
        per_layout = _PLANS[layout] = {}
    full_key = (device, key, cfg.chunk)
    plan = per_layout.get(full_key)
    if plan is not None:
        return plan
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, dt in enumerate(src_dtypes):
        by_dtype.setdefault(dt, []).append(i)
    groups = []
    for dt, members in by_dtype.items():
        numels = [layout.numels[i] for i in members]
        offs = [layout.offsets[i] for i in members]
        tiles = [max(1, -(-n // cfg.chunk)) for n in numels]
        first = [0]
        for t in tiles:
            first.append(first[-1] + t)
        meta = torch.tensor([numels + [0], offs + [0], members + [0], first], dtype=torch.int64)
        tile_param = torch.repeat_interleave(torch.arange(len(members), dtype=torch.int32),
                                             torch.tensor(tiles))
        maxt = 64  # at least 64, so that few variants get compiled
        while maxt < max(tiles):
            maxt *= 2
        groups.append(_Group(
            members=members, src_dtype=dt, n_tiles=first[-1], maxt=maxt,
            meta=meta.to(device), tile_param=tile_param.to(device),
            static_vec=[n % 8 == 0 and o % 8 == 0 for n, o in zip(numels, offs)],
        ))
    plan = per_layout[full_key] = _Plan(groups)
    return plan


def _address_table(group: _Group, ptrs: tuple[int, ...], device: torch.device) -> Tensor | None:
    """``[2, Pg]`` int64 device table of source addresses and vector flags (cached by address).

    A new table is written into the next slot of a ring of pinned host buffers and copied to the
    matching device slot without blocking (a few microseconds); a slot is reused only once the
    copy out of it has run (checked with its CUDA event, without waiting), else a fresh pinned
    buffer is used.
    """
    tab = group.tables.get(ptrs)
    if tab is not None:
        group.hits += 1
        return tab
    if device.type != "cuda":  # the Triton interpreter (tests)
        flags = [int(v and p % 16 == 0) for v, p in zip(group.static_vec, ptrs)]
        tab = torch.tensor([list(ptrs), flags], dtype=torch.int64).to(device)
        group.tables[ptrs] = tab
        return tab
    if torch.cuda.is_current_stream_capturing():
        return None  # a host -> device copy inside a capture: use the twin instead
    group.misses += 1
    if group.ring is None:
        import numpy as np

        Pg = len(group.members)
        host = torch.zeros(_RING, 2, Pg, dtype=torch.int64, pin_memory=True)
        group.ring = (host, host.numpy(), torch.zeros(_RING, 2, Pg, dtype=torch.int64, device=device),
                      [None] * _RING, [None] * _RING, np.asarray(group.static_vec, dtype=bool))
    host, host_np, dev, events, keys, static_vec = group.ring
    i = group.ring_pos
    ev = events[i]
    if ev is not None and not ev.query():  # the copy out of this slot has not run yet
        flags = [int(v and p % 16 == 0) for v, p in zip(group.static_vec, ptrs)]
        pinned = torch.tensor([list(ptrs), flags], dtype=torch.int64, pin_memory=True)
        tab = pinned.to(device, non_blocking=True)
    else:
        group.ring_pos = (i + 1) % _RING
        if keys[i] is not None:
            group.tables.pop(keys[i], None)
        host_np[i, 0] = ptrs
        host_np[i, 1] = static_vec & (host_np[i, 0] % 16 == 0)
        tab = dev[i]
        tab.copy_(host[i], non_blocking=True)
        if ev is None:
            ev = events[i] = torch.cuda.Event()
        ev.record()
        keys[i] = ptrs
    group.tables[ptrs] = tab
    if len(group.tables) > _TABLE_CACHE:
        group.tables.popitem(last=False)
    return tab


def _scratch(group: _Group, R: int, acc: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    have = group.scratch.get(acc)
    if have is None or have[0].shape[0] < R:
        Pg = len(group.members)
        have = (torch.empty(R, group.n_tiles, dtype=acc, device=device),
                torch.empty(R, group.n_tiles, dtype=torch.int32, device=device),
                torch.zeros(R, Pg, dtype=torch.int32, device=device))
        group.scratch[acc] = have
    return have


def _run_fill(grp: _Group, tab: Tensor, rows: Tensor, out: RowStats, cfg: KernelConfig) -> None:
    """One launch of the fill kernel for one group (plus the reduce kernel if not fused).

    After the first launch of a specialisation, the compiled kernel is called directly: Triton's
    generic launch path (argument binding, specialisation key) costs more host time than the
    copy itself takes on the GPU.  The specialisation is keyed by everything Triton specialises
    this kernel on: the dtypes, the constexprs and the 16-byte alignment of each pointer argument
    (the integer arguments are not specialised).
    """
    k = _kernels()
    R = rows.shape[0]
    acc = acc_dtype(rows.dtype)
    partial, partial_bad, tickets = _scratch(grp, R, acc, rows.device)
    sq, bad = out.sq_norms, out.nonfinite
    assert sq is not None and bad is not None
    Pg = len(grp.members)
    row_vec = int(rows.data_ptr() % 16 == 0 and (R == 1 or rows.stride(0) % 8 == 0))
    args = (tab, grp.meta, grp.tile_param, rows, rows.stride(0), row_vec, partial, partial_bad, tickets,
            sq, sq.stride(0), bad, bad.stride(0), grp.n_tiles, Pg)
    via = grp.src_dtype == torch.float64 and rows.dtype in (torch.float16, torch.bfloat16)
    consts = (_tl_dtype(acc), _tl_dtype(grp.src_dtype), cfg.chunk, cfg.block, grp.maxt, cfg.fused_reduce, via)
    grid = (grp.n_tiles, R)
    key = (rows.dtype, cfg, tuple(t.data_ptr() % 16 == 0 for t in (tab, rows, sq, bad)))
    ck = grp.launchers.get(key) if _DIRECT else None
    if ck is not None:
        knobs = k["knobs"]
        stream = torch.cuda.current_stream(rows.device).cuda_stream
        enter = knobs.runtime.launch_enter_hook
        meta = ck.launch_metadata(grid, stream, *args, *consts) if enter is not None else None
        ck.run(grid[0], grid[1], 1, stream, ck.function, ck.packed_metadata, meta, enter,
               knobs.runtime.launch_exit_hook, *args, *consts)
    else:
        ck = k["fill"][grid](*args, ACC=consts[0], SRC=consts[1], CHUNK=cfg.chunk, BLOCK=cfg.block,
                             MAXT=grp.maxt, FUSED=cfg.fused_reduce, VIA_F32=via, num_warps=cfg.num_warps)
        if _DIRECT and ck is not None:
            if hasattr(ck, "result"):
                ck = ck.result()
            ck._init_handles()
            grp.launchers[key] = ck
    if not cfg.fused_reduce:
        k["reduce"][(Pg, R)](grp.meta, partial, partial_bad, sq, sq.stride(0), bad, bad.stride(0),
                             grp.n_tiles, Pg, MAXT=grp.maxt, num_warps=4)


def _launch(layout: Any, rows: Tensor, grads: Sequence[Tensor | None], out: RowStats,
            cfg: KernelConfig) -> bool:
    """Fill ``rows`` ([R, D] view) with the kernel, any mix of dtypes and layouts of the
    gradients; False if it must fall back (new addresses during a graph capture)."""
    device = rows.device
    srcs: list[Tensor | None] = []
    for g in grads:
        if g is not None and not g.is_contiguous():
            g = g.contiguous()
        srcs.append(g)
    default = rows.dtype if rows.dtype in _DTYPES else torch.float32
    src_dtypes = tuple(default if g is None else g.dtype for g in srcs)
    plan = _plan(layout, device, src_dtypes, src_dtypes, cfg)
    tables = []
    for grp in plan.groups:
        ptrs = tuple(0 if srcs[i] is None else srcs[i].data_ptr() for i in grp.members)  # type: ignore[union-attr]
        tab = _address_table(grp, ptrs, device)
        if tab is None:
            return False
        tables.append(tab)
    for grp, tab in zip(plan.groups, tables):
        _run_fill(grp, tab, rows, out, cfg)
    return True


def _fast_launch(layout: Any, rows: Tensor, grads: Sequence[Tensor | None], out: RowStats,
                 block: bool, cfg: KernelConfig) -> bool | None:
    """The common case in one pass over the gradients: one source dtype, contiguous, right shapes
    and device.  ``None``: not the common case (the caller checks and takes the general path);
    ``False``: fall back to the twin (graph capture)."""
    dev = rows.get_device()
    dt0 = None
    ptrs = []
    if block:
        R = rows.shape[0]
        for g, shape in zip(grads, layout.shapes):
            if g is None:
                ptrs.append(0)
                continue
            if dt0 is None:
                dt0 = g.dtype
            if (g.dtype != dt0 or g.shape[1:] != shape or g.shape[0] != R or g.get_device() != dev
                    or not g.is_contiguous()):
                return None
            ptrs.append(g.data_ptr())
    else:
        for g, shape in zip(grads, layout.shapes):
            if g is None:
                ptrs.append(0)
                continue
            if dt0 is None:
                dt0 = g.dtype
            if g.dtype != dt0 or g.shape != shape or g.get_device() != dev or not g.is_contiguous():
                return None
            ptrs.append(g.data_ptr())
    if len(ptrs) != len(layout.shapes) or dt0 not in _DTYPES and dt0 is not None:
        return None
    dt = rows.dtype if dt0 is None else dt0
    plan = _plan(layout, rows.device, ("uniform", dt), (dt,) * len(ptrs), cfg)
    (grp,) = plan.groups
    tab = _address_table(grp, tuple(ptrs), rows.device)
    if tab is None:
        return False
    _run_fill(grp, tab, rows if block else rows.unsqueeze(0), out, cfg)
    return True


# --------------------------------------------------------------------------------------------
# Dispatchers
# --------------------------------------------------------------------------------------------
def _out_for(layout: Any, rows: Tensor, out: RowStats | None, block: bool) -> tuple[RowStats, RowStats | None]:
    """Kernel-side [R, P] buffers (always both statistics), and what to copy them into."""
    P = len(layout.params)
    acc = acc_dtype(rows.dtype)
    R = rows.shape[0] if block else 1
    if out is not None:
        check_out(layout, rows, out, block)
        if out.sq_norms is not None and out.nonfinite is not None:
            return RowStats(out.sq_norms.view(R, P), out.nonfinite.view(R, P)), None
    kern = RowStats(torch.empty(R, P, dtype=acc, device=rows.device),
                    torch.empty(R, P, dtype=torch.int32, device=rows.device))
    return kern, out


def _rows_ok(layout: Any, rows: Tensor, block: bool) -> bool:
    return (rows.dim() == (2 if block else 1) and rows.shape[-1] == layout.numel and rows.stride(-1) == 1
            and rows.dtype in _DTYPES and len(layout.shapes) > 0)


def _fill(layout: Any, rows: Tensor, grads: Sequence[Tensor | None], out: RowStats | None,
          norms: bool, check: bool, block: bool, config: KernelConfig | None) -> RowStats:
    ref = fill_rows_reference if block else fill_row_reference
    use_kernel = rows.is_cuda and triton_available()
    if not use_kernel:
        return ref(layout, rows, grads, out=out, norms=norms, check=check)
    cfg = config or DEFAULT_CONFIG
    done = None
    if _rows_ok(layout, rows, block) and len(grads) == len(layout.shapes):
        kern, copy_into = _out_for(layout, rows, out, block)
        done = _fast_launch(layout, rows, grads, kern, block, cfg)
    if done is None:  # not the common case: full checks, then the general path
        check_inputs(layout, rows, grads, block=block)
        if backend_for(rows, grads) == "reference":
            return ref(layout, rows, grads, out=out, norms=norms, check=check)
        kern, copy_into = _out_for(layout, rows, out, block)
        done = _launch(layout, rows if block else rows.unsqueeze(0), grads, kern, cfg)
    if not done:
        log.debug("fused row fill: new gradient addresses during graph capture, using the twin")
        return ref(layout, rows, grads, out=out, norms=norms, check=check)
    sq, bad = kern
    if not block:
        sq, bad = sq[0], bad[0]
    if copy_into is not None:
        if copy_into.sq_norms is not None:
            copy_into.sq_norms.copy_(sq)
            sq = copy_into.sq_norms
        if copy_into.nonfinite is not None:
            copy_into.nonfinite.copy_(bad)
            bad = copy_into.nonfinite
    return RowStats(sq if norms else None, bad if check else None)


def fill_row_fused(layout: Any, row: Tensor, grads: Sequence[Tensor | None], *,
                   out: RowStats | None = None, norms: bool = True, check: bool = True,
                   config: KernelConfig | None = None) -> RowStats:
    """Fill one row of ``J`` from per-parameter gradients, with its statistics, in one pass.

    ``row[offset_i : offset_i + numel_i] <- grads[i]`` flattened and cast to ``row.dtype``
    (``None`` -> zeros), and per parameter ``i`` the squared norm and the NaN/Inf count of what
    was written.  On CUDA with Triton: one kernel launch per source dtype (one in the usual
    case), no host synchronisation.  Elsewhere: :func:`~.reference.fill_row_reference`.

    Args:
        layout: the :class:`~torch_mtlgrad.FlatLayout` of the shared parameters.
        row: ``[D]`` destination with unit stride (e.g. ``J[t]``).
        grads: one tensor shaped like each shared parameter, or ``None``.
        out: optional :meth:`RowStats.empty` buffers (``[P]``) to write the statistics into.
        norms, check: whether the squared norms / the counts are wanted (the kernel computes
            both anyway; the fallback skips what is not asked, each being a pass over the row).
        config: launch shape (tests and benchmarks); default :data:`DEFAULT_CONFIG`.

    Returns:
        :class:`RowStats` of ``[P]`` tensors: ``sq_norms`` (float32, float64 for a float64 row)
        and ``nonfinite`` (int32); ``None`` for a statistic not asked for.

    Example:
        >>> from torch_mtlgrad import FlatLayout
        >>> lin = torch.nn.Linear(2, 1)
        >>> layout = FlatLayout(list(lin.parameters()))
        >>> row = torch.empty(3)
        >>> st = fill_row_fused(layout, row, [torch.tensor([[3.0, float("nan")]]), torch.ones(1)])
        >>> row[[0, 2]], st.nonfinite.tolist()
        (tensor([3., 1.]), [1, 0])
    """
    return _fill(layout, row, grads, out, norms, check, False, config)


def fill_rows_fused(layout: Any, rows: Tensor, grads: Sequence[Tensor | None], *,
                    out: RowStats | None = None, norms: bool = True, check: bool = True,
                    config: KernelConfig | None = None) -> RowStats:
    """Fill a block of rows ``[R, D]`` of ``J`` from batched per-parameter gradients
    (``[R, *shape]`` each, or ``None``), with ``[R, P]`` statistics; one launch per source dtype
    on CUDA.  See :func:`fill_row_fused`.

    Example:
        >>> from torch_mtlgrad import FlatLayout
        >>> layout = FlatLayout([torch.nn.Parameter(torch.zeros(2))])
        >>> J = torch.empty(2, 2)
        >>> fill_rows_fused(layout, J, [torch.tensor([[3.0, 4.0], [0.0, 1.0]])]).sq_norms.tolist()
        [[25.0], [1.0]]
    """
    return _fill(layout, rows, grads, out, norms, check, True, config)
