"""Flat layout of the shared parameters (offsets, module segments, rows of J) and the write-back
of the direction into their ``.grad`` (:class:`SharedGrads`).

The layout is computed once from the list of shared parameters and reused every step.  Column
``offsets[i] : offsets[i] + numels[i]`` of ``J`` belongs to ``params[i]`` (flattened in its own
memory order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..aggregators.blocks import weighted_blocks

__all__ = ["FlatLayout", "SharedGrads"]


class FlatLayout:
    """Where each shared parameter lives in a flat ``[D]`` vector.

    Args:
        params: the shared parameters, in a fixed order (duplicates are an error).
        names: optional names, one per parameter (used in error messages).

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> layout = FlatLayout(list(lin.parameters()))
        >>> layout.numel, layout.offsets
        (8, [0, 6])
    """

    def __init__(self, params: Sequence[Tensor], names: Sequence[str] | None = None) -> None:
        params = list(params)
        if not params:
            raise ValueError("no shared parameters: pass a module or a non-empty iterable of them")
        seen: dict[int, int] = {}
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"shared parameter {i} is a {type(p).__name__}, not a tensor")
            if id(p) in seen:
                raise ValueError(
                    f"the same parameter is given twice among the shared parameters "
                    f"(positions {seen[id(p)]} and {i})"
                )
            seen[id(p)] = i
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"shared parameters span several devices {sorted(map(str, devices))}")
        self.params: list[Tensor] = params
        self.names: list[str] = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
        self.shapes: list[torch.Size] = [p.shape for p in params]
        self.numels: list[int] = [p.numel() for p in params]
        self.offsets: list[int] = []
        off = 0
        for n in self.numels:
            self.offsets.append(off)
            off += n
        self.numel: int = off
        self.device: torch.device = params[0].device
        dtypes = {p.dtype for p in params}
        self.dtype: torch.dtype | None = dtypes.pop() if len(dtypes) == 1 else None
        self._index = {id(p): i for i, p in enumerate(params)}

    # Lookup --------------------------------------------------------------------------------
    def index_of(self, param: Tensor) -> int:
        """Position of ``param`` in the layout (``KeyError`` if it is not shared)."""
        try:
            return self._index[id(param)]
        except KeyError:
            raise KeyError("parameter is not among the shared parameters") from None

    def contains(self, param: Tensor) -> bool:
        return id(param) in self._index

    def param_range(self, i: int) -> tuple[int, int]:
        """Columns ``[start, end)`` of parameter ``i``."""
        return self.offsets[i], self.offsets[i] + self.numels[i]

    def module_ranges(self, module: nn.Module) -> list[tuple[int, int]]:
        """Column ranges of a module's shared parameters, merged where contiguous, in order.

        A parameter of ``module`` that is not shared is an error (the module must be a part of
        the shared network).
        """
        idx = []
        for name, p in module.named_parameters():
            if id(p) not in self._index:
                raise ValueError(f"parameter {name!r} of {type(module).__name__} is not shared")
            idx.append(self._index[id(p)])
        ranges: list[tuple[int, int]] = []
        for i in sorted(set(idx)):
            s, e = self.param_range(i)
            if ranges and ranges[-1][1] == s:
                ranges[-1] = (ranges[-1][0], e)
            else:
                ranges.append((s, e))
        return ranges

    def segment_ids(self, modules: Iterable[nn.Module]) -> Tensor:
        """``[D]`` long tensor: for each column the index of the module it belongs to, or -1."""
        seg = torch.full((self.numel,), -1, dtype=torch.long)
        for k, m in enumerate(modules):
            for s, e in self.module_ranges(m):
                if (seg[s:e] >= 0).any():
                    raise ValueError(f"module {k} shares parameters with an earlier module")
                seg[s:e] = k
        return seg.to(self.device)

    # Views -----------------------------------------------------------------------------------
    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of a ``[D]`` buffer shaped like each parameter (no copies)."""
        if flat.dim() != 1 or flat.shape[0] != self.numel:
            raise ValueError(f"flat buffer must have shape [{self.numel}], got {tuple(flat.shape)}")
        return [flat[o : o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]

    def fill_row(self, row: Tensor, grads: Sequence[Tensor | None]) -> list[int]:
        """Copy per-parameter gradients into a ``[D]`` row with one multi-tensor copy.

        ``None`` gradients become zeros.  Returns the indices of the parameters that had none.
        """
        views = self.views(row)
        dst, src, missing = [], [], []
        for i, (v, g) in enumerate(zip(views, grads)):
            if g is None:
                missing.append(i)
                v.zero_()
            else:
                dst.append(v)
                src.append(g)
        if dst:
            torch._foreach_copy_(dst, src)
        return missing

    def flatten(self, tensors: Sequence[Tensor | None], dtype: torch.dtype | None = None) -> Tensor:
        """A new ``[D]`` vector from per-parameter tensors (``None`` as zeros)."""
        out = torch.empty(self.numel, device=self.device, dtype=dtype or self.dtype or torch.float32)
        self.fill_row(out, tensors)
        return out


class SharedGrads:
    """The shared parameters' ``.grad``: views of one flat ``[D]`` buffer kept across steps (one
    dtype), or one tensor per parameter (mixed dtypes).  The write-back of the step.

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> grads = SharedGrads(FlatLayout(list(lin.parameters())))
        >>> grads.write(torch.arange(3.0), [None, None])
        >>> lin.weight.grad.tolist(), lin.bias.grad.tolist()
        ([[0.0, 1.0]], [2.0])
    """

    def __init__(self, layout: FlatLayout) -> None:
        self.layout = layout
        self._flat: Tensor | None = None

    def buffer(self) -> Tensor:
        """The flat ``[D]`` buffer the ``.grad`` are views of (one dtype), kept across steps."""
        layout = self.layout
        buf = self._flat
        if buf is None or buf.dtype != layout.dtype:
            buf = self._flat = torch.zeros(layout.numel, dtype=layout.dtype, device=layout.device)
        return buf

    def point(self, buf: Tensor) -> None:
        """Make each shared ``.grad`` a view of ``buf``."""
        for p, v in zip(self.layout.params, self.layout.views(buf)):
            p.grad = v

    def write(self, d: Tensor, prior: Sequence[Tensor | None]) -> None:
        """Write ``d`` into the shared ``.grad``, added to what they held before the step
        (``prior``), as ``backward()`` accumulates."""
        layout = self.layout
        if layout.dtype is None:  # mixed dtypes: one tensor per parameter
            for p, v, g in zip(layout.params, layout.views(d), prior):
                p.grad = v.to(p.dtype).clone() if g is None else g.add_(v.to(g.dtype))
            return
        buf = self.buffer()
        if all(g is None for g in prior):
            buf.copy_(d)
        else:
            views = layout.views(buf)
            ours = all(g is not None and g.data_ptr() == v.data_ptr() for g, v in zip(prior, views))
            if not ours:
                layout.fill_row(buf, [None if g is None else g.to(buf.dtype) for g in prior])
            buf.add_(d.to(buf.dtype))
        self.point(buf)

    def write_blocks(self, w: Tensor, mats: Sequence[Tensor | None],
                     prior: Sequence[Tensor | None]) -> None:
        """Write ``d = w^T J`` from the Gramian path's per-parameter blocks (``[T, n_i]``): straight
        into the flat buffer, parameter by parameter, when nothing is accumulated and the dtypes
        agree (no ``[D]`` temporary); else through :meth:`write`."""
        layout = self.layout
        if layout.dtype == w.dtype and all(g is None for g in prior):
            buf = self.buffer()
            weighted_blocks(w, mats, [buf[o : o + n] for o, n in zip(layout.offsets, layout.numels)])
            self.point(buf)
            return
        d = torch.empty(layout.numel, dtype=w.dtype, device=w.device)
        weighted_blocks(w, mats, [d[o : o + n] for o, n in zip(layout.offsets, layout.numels)])
        self.write(d, prior)

    def write_params(self, grads: Sequence[Tensor | None], prior: Sequence[Tensor | None]) -> None:
        """Write per-parameter gradients (the loss-only route's backward), added to ``prior`` as
        ``backward()`` accumulates (``None``: no loss reached the parameter; it keeps ``prior``)."""
        for p, g, old in zip(self.layout.params, grads, prior):
            if g is None:
                p.grad = old
            elif old is None:
                p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
            else:
                p.grad = old.add_(g.to(old.dtype))

    def restore(self, prior: Sequence[Tensor | None]) -> None:
        """Put back the ``.grad`` the shared parameters held before the step."""
        for p, g in zip(self.layout.params, prior):
            p.grad = g

    @staticmethod
    def write_specific(params: Sequence[Tensor], grads: Sequence[Tensor | None], add: bool) -> None:
        """The task-specific tensors' summed gradients: added to their ``.grad`` (``add``), or set
        (a legacy loop, whose ``.grad`` already hold them)."""
        for p, g in zip(params, grads):
            if not add:
                p.grad = g
            elif g is None:
                continue
            elif p.grad is None:
                p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
            else:
                p.grad.add_(g)
