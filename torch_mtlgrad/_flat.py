"""Flat layout of the shared parameters: offsets, module segments, rows of J, write-back.

The layout is computed once from the list of shared parameters and reused every step.  Column
``offsets[i] : offsets[i] + numels[i]`` of ``J`` belongs to ``params[i]`` (flattened in its own
memory order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["FlatLayout"]


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
