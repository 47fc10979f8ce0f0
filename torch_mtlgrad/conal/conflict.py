"""Conflict noticing (CoNAL paper, section 2.3, eq. 4-5) as a gradient plugin.

For an ordered list of shared modules ``f_1 .. f_K`` (input to output) and the task Jacobian
``J`` (``[T, D]``, row ``t`` = ``grad_t`` of eq. 4), each step:

1. one pass over ``J`` gives the per-module Gramians ``G_k = J_k J_k^T`` (``J_k`` = the columns of
   module ``k``), hence every task pair's cosine on every module;
2. ``p*`` = the first module with a negative cosine (``cos(g_i^k, g_j^k) < 0`` for some
   ``i < j``); a zero gradient is not a conflict (its cosine is undefined and counted as >= 0);
3. the columns of modules ``k >= p*`` are set to zero in ``J`` (eq. 5, second case).

The aggregator then runs on the edited ``J``.  With ``aggregator="sum"`` the kept modules get
``sum_t grad_t^k`` and the dropped ones zero, which is eq. 5 exactly; any other aggregator
combines the kept columns its own way and still gives zero on the dropped ones (every row is
zero there).  Order of operations inside :class:`~torch_mtlgrad.MultiTaskOptimizer`::

    capture J -> ConflictNoticing.transform (reads G_k, zeroes columns of modules >= p*)
      -> aggregator on J (kept columns) -> d into the shared .grad -> optimizer.step()

Task-specific parameters are not columns of ``J`` and are never touched.  Shared parameters
that belong to none of the listed modules are not inspected and not zeroed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..capture.layout import FlatLayout
from ..diagnostics import cosine_matrix

__all__ = ["ConflictNoticing", "SegmentGramian", "first_conflict", "segment_gramians"]

log = logging.getLogger(__name__)


class SegmentGramian:
    """Per-segment Gramians ``G_k = J[:, seg == k] @ J[:, seg == k]^T`` in one batched product.

    At construction the columns of every segment are sorted into contiguous blocks of ``B``
    columns (the last block of each segment padded), once.  Each call then does one
    ``index_select`` of ``J`` into ``[T, n_blocks * B]``, zeroes the padding, runs one
    ``bmm`` over the ``[n_blocks, T, B]`` view and sums the block Gramians of each segment with
    one ``index_add_``.  Why this shape:

    * ``J[:, :, None] * J[:, None, :]`` reduced by segment needs ``T^2 D`` memory;
    * one matmul per segment is ``K`` kernel launches (and ``K`` host round trips to slice);
    * padding every segment to the longest one costs ``K * max_k D_k`` memory, which explodes
      when one module is much larger than the others (a conv trunk next to a bias);
    * fixed-size blocks bound the padding by ``K * (B - 1)`` columns.  With the default
      ``B = ceil(D_m / K)`` (``D_m`` = columns in the segments) the copy is at most about
      ``2 T D_m`` numbers and there are at most ``2 K`` blocks, so the ``bmm`` is a handful of
      large products whatever the sizes of the modules.

    The work is ``T^2 D_m`` multiply-adds, the same as one full Gramian, and no step reads a
    value back to the host.

    Args:
        segment_ids: ``[D]`` long tensor, segment index per column (``-1`` = in no segment).
        num_segments: ``K``; segments ``0 .. K-1`` (an empty segment gets ``G_k = 0``).
        block_size: ``B``; ``None`` picks ``ceil(D_m / K)`` (at least 1).

    Example:
        >>> J = torch.tensor([[1., 2., 0.], [1., -1., 3.]])
        >>> sg = SegmentGramian(torch.tensor([0, 0, 1]), 2)
        >>> sg(J)
        tensor([[[ 5., -1.],
                 [-1.,  2.]],
        <BLANKLINE>
                [[ 0.,  0.],
                 [ 0.,  9.]]])
    """

    def __init__(self, segment_ids: Tensor, num_segments: int, block_size: int | None = None) -> None:
        if segment_ids.dim() != 1 or segment_ids.dtype != torch.long:
            raise ValueError("segment_ids must be a 1-D long tensor (one segment index per column)")
        if num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        seg = segment_ids.detach().cpu()
        if seg.numel() and int(seg.max()) >= num_segments:
            raise ValueError(f"segment index {int(seg.max())} >= num_segments={num_segments}")
        if seg.numel() and int(seg.min()) < -1:
            raise ValueError("segment ids must be >= -1 (-1 marks a column in no segment)")
        self.num_columns = int(seg.numel())
        self.num_segments = int(num_segments)
        cols = [torch.nonzero(seg == k).flatten() for k in range(num_segments)]
        total = sum(int(c.numel()) for c in cols)
        if block_size is None:
            block_size = max(1, math.ceil(total / num_segments))
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        gather, pad, owner = [], [], []
        pos = 0
        for k, c in enumerate(cols):
            n = int(c.numel())
            nb = math.ceil(n / block_size)
            if nb == 0:
                continue
            padded = nb * block_size
            idx = torch.zeros(padded, dtype=torch.long)
            idx[:n] = c
            gather.append(idx)
            pad.append(torch.arange(pos + n, pos + padded))
            owner.append(torch.full((nb,), k, dtype=torch.long))
            pos += padded
        dev = segment_ids.device
        self.num_blocks = len(torch.cat(owner)) if owner else 0
        self._gather = (torch.cat(gather) if gather else torch.zeros(0, dtype=torch.long)).to(dev)
        self._pad = (torch.cat(pad) if pad else torch.zeros(0, dtype=torch.long)).to(dev)
        self._owner = (torch.cat(owner) if owner else torch.zeros(0, dtype=torch.long)).to(dev)

    def to(self, device: torch.device | str) -> SegmentGramian:
        """Move the precomputed index tensors to ``device`` (in place); returns ``self``."""
        self._gather = self._gather.to(device)
        self._pad = self._pad.to(device)
        self._owner = self._owner.to(device)
        return self

    def __call__(self, J: Tensor) -> Tensor:
        """``[K, T, T]`` Gramians of ``J`` (``[T, D]``) restricted to each segment's columns."""
        if J.dim() != 2 or J.shape[1] != self.num_columns:
            raise ValueError(f"J must have shape [T, {self.num_columns}], got {tuple(J.shape)}")
        T = J.shape[0]
        out = J.new_zeros(self.num_segments, T, T)
        if self.num_blocks == 0:
            return out
        Jg = J.index_select(1, self._gather)
        if self._pad.numel():
            Jg.index_fill_(1, self._pad, 0)
        blocks = Jg.view(T, self.num_blocks, self.block_size).transpose(0, 1)  # [n, T, B]
        return out.index_add_(0, self._owner, torch.bmm(blocks, blocks.transpose(1, 2)))


def segment_gramians(
    J: Tensor, segment_ids: Tensor, num_segments: int, block_size: int | None = None
) -> Tensor:
    """One-off ``[K, T, T]`` per-segment Gramians (see :class:`SegmentGramian`).

    Example:
        >>> segment_gramians(torch.eye(2), torch.tensor([0, 1]), 2)[1]
        tensor([[0., 0.],
                [0., 1.]])
    """
    return SegmentGramian(segment_ids, num_segments, block_size).to(J.device)(J)


def _conflicts(G: Tensor, tol: float) -> Tensor:
    """``[K, T, T]`` bool, true where ``i < j`` and ``cos(g_i^k, g_j^k) < -tol``.

    With ``tol = 0`` this is ``G_k[i, j] < 0`` (the norms are positive whenever the dot product
    is non-zero), so a zero gradient and an exactly orthogonal pair are never conflicts.
    """
    T = G.shape[-1]
    upper = torch.ones(T, T, dtype=torch.bool, device=G.device).triu(1)
    if tol == 0.0:
        neg = G < 0
    else:
        diag = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0)
        scale = torch.sqrt(diag.unsqueeze(-1) * diag.unsqueeze(-2))
        neg = G < -tol * scale
    return neg & upper


def first_conflict(G: Tensor, tol: float = 0.0) -> Tensor:
    """``p*`` of eq. 5 from per-module Gramians ``G`` (``[K, T, T]``), as a 0-d long tensor.

    Modules are numbered ``0 .. K-1``; the result is ``K`` when no module has a conflicting pair.

    Example:
        >>> G = torch.tensor([[[1., 1.], [1., 1.]], [[1., -1.], [-1., 1.]]])
        >>> first_conflict(G)
        tensor(1)
    """
    return _first_positive(_conflicts(G, tol).flatten(1).sum(dim=1))


def _first_positive(pairs: Tensor) -> Tensor:
    """Index of the first non-zero entry of ``pairs`` (``[K]``), ``K`` if none; no host sync."""
    K = pairs.shape[0]
    idx = torch.arange(K, device=pairs.device)
    return torch.where(pairs > 0, idx, torch.full_like(idx, K)).min()


class ConflictNoticing:
    """Conflict noticing of CoNAL (eq. 5) as a :class:`~torch_mtlgrad.GradientPlugin`.

    Each step (``transform``) finds ``p*``, the first of the given modules on which some pair of
    tasks has a negative gradient cosine, and zeroes the columns of ``J`` of module ``p*`` and of
    every later module.  Run it before a ``"sum"`` aggregator for the paper's update: the
    modules before ``p*`` get ``sum_t grad_t``, the others zero (eq. 5); any other aggregator
    acts on the kept columns only.  Task-specific parameters are not in ``J`` and stay as the
    optimizer leaves them (the plain sum of the task gradients).

    Order of operations in the optimizer: capture ``J`` -> this plugin (per-module Gramians from
    one pass, ``p*``, zeroing) -> aggregator -> write ``d`` -> wrapped ``step()``.

    Diagnostics (all tensors stay on the device; nothing syncs with the host):

    * ``diagnostics["conflict_pstar"]``: ``p*`` of the last step (0-based module index, ``K``
      when no module conflicts);
    * ``diagnostics["conflict_pairs"]``: ``[K]`` number of conflicting task pairs per module;
    * ``diagnostics["conflict_cosines"]``: ``[K, T, T]`` the cosines of the last step
      (:func:`~torch_mtlgrad.diagnostics.cosine_matrix` of each ``G_k``; 0 for a zero gradient);
    * :meth:`conflict_ratio`: per-module ratio of conflicting pairs over the last ``window``
      steps or since :meth:`reset_counts` (the paper's Table 1);
    * :meth:`to_dict`: the same as plain lists for a CSV or a plot.

    Args:
        modules: the shared modules ``f_1 .. f_{P-1}`` in input-to-output order; their
            parameters must all be shared and no two may share a parameter.
        window: number of recent steps the windowed ratio and the ``p*`` history cover.
        tol: a pair conflicts when ``cos < -tol``; ``0`` (the paper's definition) by default.
        zero: when ``False`` only the diagnostics are recorded and ``J`` is returned unchanged
            (to measure the conflict ratio of a plain network, e.g. hard parameter sharing).
        names: names of the modules for :meth:`to_dict` (default ``module0 ..``).
        block_size: column block size of the Gramian pass (see :class:`SegmentGramian`).

    Example:
        >>> from torch_mtlgrad import FlatLayout
        >>> f1, f2 = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 1, bias=False)
        >>> cn = ConflictNoticing([f1, f2])
        >>> cn.bind(FlatLayout([*f1.parameters(), *f2.parameters()]))
        >>> J = torch.tensor([[1., 1., 1., 1., 1., 1.], [1., 1., 1., 1., -1., 0.]])
        >>> cn.transform(J, torch.ones(2))
        tensor([[1., 1., 1., 1., 0., 0.],
                [1., 1., 1., 1., 0., 0.]])
        >>> int(cn.diagnostics["conflict_pstar"]), cn.conflict_ratio().tolist()
        (1, [0.0, 1.0])
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        *,
        window: int = 100,
        tol: float = 0.0,
        zero: bool = True,
        names: Sequence[str] | None = None,
        block_size: int | None = None,
    ) -> None:
        if isinstance(modules, nn.Module):
            modules = list(modules.children()) if isinstance(modules, nn.ModuleList | nn.Sequential) else [modules]
        modules = list(modules)
        if not modules:
            raise ValueError("conflict noticing needs at least one shared module")
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"modules[{i}] is a {type(m).__name__}, not an nn.Module")
            if next(m.parameters(), None) is None:
                raise ValueError(f"modules[{i}] ({type(m).__name__}) has no parameters")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not (tol >= 0.0 and math.isfinite(tol)):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        if names is not None and len(names) != len(modules):
            raise ValueError(f"got {len(names)} names for {len(modules)} modules")
        self.modules: list[nn.Module] = modules
        self.num_modules: int = len(modules)
        self.window = window
        self.tol = float(tol)
        self.zero = bool(zero)
        self.names: list[str] = list(names) if names is not None else [f"module{k}" for k in range(len(modules))]
        self.block_size = block_size
        self.diagnostics: dict[str, Tensor] = {}
        self._seg: Tensor | None = None
        self._gram: SegmentGramian | None = None
        self._num_tasks: int | None = None
        self._pair_hist: Tensor | None = None  # [window, K] conflicting pairs per step
        self._pstar_hist: Tensor | None = None  # [window]
        self._pair_total: Tensor | None = None  # [K] since reset_counts
        self._pos = 0
        self._filled = 0
        self._steps_total = 0

    # Plugin protocol ---------------------------------------------------------------------
    def bind(self, layout: FlatLayout) -> None:
        """Precompute the column segments of the modules in ``layout`` (once)."""
        self._seg = layout.segment_ids(self.modules)
        self._gram = SegmentGramian(self._seg, self.num_modules, self.block_size)
        self._alloc(layout.device)

    def _alloc(self, device: torch.device) -> None:
        K = self.num_modules
        if self._pair_hist is None:
            self._pair_hist = torch.zeros(self.window, K, device=device)
            self._pstar_hist = torch.full((self.window,), -1, dtype=torch.long, device=device)
            self._pair_total = torch.zeros(K, device=device)
        else:
            self._pair_hist = self._pair_hist.to(device)
            self._pstar_hist = self._pstar_hist.to(device)  # type: ignore[union-attr]
            self._pair_total = self._pair_total.to(device)  # type: ignore[union-attr]

    def transform(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        """Record the per-module conflicts of ``J`` and zero the columns of modules ``>= p*``.

        ``J`` is edited in place (and returned).  ``losses`` is not read.
        """
        if self._gram is None or self._seg is None:
            raise RuntimeError("ConflictNoticing.transform before bind(layout): bind it to the shared layout")
        if J.dim() != 2 or J.shape[1] != self._gram.num_columns:
            raise ValueError(f"J must have shape [T, {self._gram.num_columns}], got {tuple(J.shape)}")
        T = J.shape[0]
        if self._num_tasks is not None and self._num_tasks != T:
            raise ValueError(f"J has {T} rows but earlier steps had {self._num_tasks} tasks")
        self._num_tasks = T
        G = self._gram(J)
        conf = _conflicts(G, self.tol)
        pairs = conf.flatten(1).sum(dim=1)
        pstar = _first_positive(pairs)
        self._record(pairs, pstar)
        self.diagnostics = {
            "conflict_pstar": pstar,
            "conflict_pairs": pairs,
            "conflict_cosines": cosine_matrix(G),
        }
        if self.zero:
            drop = (self._seg >= pstar) & (self._seg >= 0)
            J.masked_fill_(drop, 0.0)
        return J

    def _record(self, pairs: Tensor, pstar: Tensor) -> None:
        assert self._pair_hist is not None and self._pstar_hist is not None and self._pair_total is not None
        self._pair_hist[self._pos] = pairs.to(self._pair_hist.dtype)
        self._pstar_hist[self._pos] = pstar
        self._pair_total += pairs.to(self._pair_total.dtype)
        self._pos = (self._pos + 1) % self.window
        self._filled = min(self._filled + 1, self.window)
        self._steps_total += 1

    # Diagnostics -------------------------------------------------------------------------
    @property
    def num_pairs(self) -> int:
        """``T (T - 1) / 2``, the number of task pairs (0 before the first step)."""
        T = self._num_tasks or 0
        return T * (T - 1) // 2

    def conflict_ratio(self, over: str = "window") -> Tensor:
        """``[K]`` fraction of task pairs with a negative cosine on each module (Table 1).

        ``over="window"``: the last ``window`` steps; ``over="total"``: every step since the
        last :meth:`reset_counts` (e.g. one epoch).  Zero before the first step or when ``T = 1``.
        """
        if over not in ("window", "total"):
            raise ValueError(f"over must be 'window' or 'total', got {over!r}")
        if self._pair_hist is None:
            return torch.zeros(self.num_modules)
        steps = self._filled if over == "window" else self._steps_total
        if steps == 0 or self.num_pairs == 0:
            return torch.zeros_like(self._pair_total)  # type: ignore[arg-type]
        total = self._pair_hist.sum(0) if over == "window" else self._pair_total
        return total / float(steps * self.num_pairs)  # type: ignore[operator]

    def pstar_history(self) -> Tensor:
        """``p*`` of the last ``min(steps, window)`` steps, oldest first (long tensor)."""
        if self._pstar_hist is None or self._filled == 0:
            return torch.zeros(0, dtype=torch.long)
        order = (torch.arange(self._filled) + (self._pos - self._filled)) % self.window
        return self._pstar_hist[order.to(self._pstar_hist.device)]

    def reset_counts(self) -> None:
        """Start a new counting period for ``conflict_ratio(over="total")`` (e.g. per epoch)."""
        if self._pair_total is not None:
            self._pair_total.zero_()
        self._steps_total = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python diagnostics for a CSV or a plot (this reads the device).

        Keys: ``modules`` (names), ``conflict_ratio_window``, ``conflict_ratio_total`` (one value
        per module), ``pstar`` (last ``window`` steps, oldest first), ``steps``, ``window``,
        ``num_tasks``.
        """
        return {
            "modules": list(self.names),
            "conflict_ratio_window": [float(v) for v in self.conflict_ratio("window")],
            "conflict_ratio_total": [float(v) for v in self.conflict_ratio("total")],
            "pstar": [int(v) for v in self.pstar_history()],
            "steps": self._steps_total,
            "window": self.window,
            "num_tasks": self._num_tasks,
        }

    # State -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The counters and histories kept between steps."""
        return {
            "num_modules": self.num_modules,
            "window": self.window,
            "num_tasks": self._num_tasks,
            "pos": self._pos,
            "filled": self._filled,
            "steps_total": self._steps_total,
            "pair_hist": None if self._pair_hist is None else self._pair_hist.clone(),
            "pstar_hist": None if self._pstar_hist is None else self._pstar_hist.clone(),
            "pair_total": None if self._pair_total is None else self._pair_total.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same number of modules and window)."""
        if state.get("num_modules") != self.num_modules or state.get("window") != self.window:
            raise ValueError(
                f"state is for {state.get('num_modules')} modules / window {state.get('window')}, "
                f"this plugin has {self.num_modules} / {self.window}"
            )
        dev = self._seg.device if self._seg is not None else torch.device("cpu")
        self._num_tasks = state["num_tasks"]
        self._pos = int(state["pos"])
        self._filled = int(state["filled"])
        self._steps_total = int(state["steps_total"])
        for key in ("pair_hist", "pstar_hist", "pair_total"):
            v = state[key]
            setattr(self, "_" + key, None if v is None else v.detach().clone().to(dev))

    def __repr__(self) -> str:
        return (
            f"ConflictNoticing({self.num_modules} modules, window={self.window}, tol={self.tol}, "
            f"zero={self.zero})"
        )
