"""One registry of aggregators by short name, used by ``get`` and by ``MultiTaskOptimizer``.

Entries are ``"module:Class"`` paths, imported on first use so that building one method never
imports the others.  ``"<name>+tension"`` wraps any gradient aggregator in
:class:`~torch_mtlgrad.aggregators.Tensioned`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._base import Aggregator

__all__ = ["available", "get", "register", "resolve"]

_PKG = "torch_mtlgrad.aggregators"

# name -> (module path, class name, is a gradient aggregator that accepts "+tension")
_ENTRIES: dict[str, tuple[str, str, bool]] = {
    "mean": (f"{_PKG}.mean", "Mean", True),
    "sum": (f"{_PKG}.mean", "Sum", True),
    "mgda": (f"{_PKG}.mgda", "MinNorm", True),
    "central": (f"{_PKG}.central", "Central", True),
    "pcgrad": (f"{_PKG}.pcgrad", "PCGrad", True),
    "graddrop": (f"{_PKG}.graddrop", "GradDrop", True),
    "gradvac": (f"{_PKG}.gradvac", "GradVac", True),
    "imtlg": (f"{_PKG}.imtlg", "IMTLG", True),
    "cagrad": (f"{_PKG}.cagrad", "CAGrad", True),
    "nashmtl": (f"{_PKG}.nashmtl", "NashMTL", True),
    "upgrad": (f"{_PKG}.upgrad", "UPGrad", True),
    "dualproj": (f"{_PKG}.dualproj", "DualProj", True),
    "alignedmtl": (f"{_PKG}.alignedmtl", "AlignedMTL", True),
    "moco": (f"{_PKG}.moco", "MoCo", True),
    "rlw": (f"{_PKG}.rlw", "RLW", True),
    "constant": (f"{_PKG}.constant", "Constant", True),
    "uw": (f"{_PKG}.uw", "UncertaintyWeighting", False),
    "gradnorm": (f"{_PKG}.gradnorm", "GradNorm", False),
    "dwa": (f"{_PKG}.dwa", "DWA", False),
    "famo": (f"{_PKG}.famo", "FAMO", False),
}

TENSION_SUFFIX = "+tension"


def register(name: str, module: str, cls: str, *, tensionable: bool = True) -> None:
    """Add a method under ``name`` (lower case) as ``module:cls``."""
    if name != name.lower() or "+" in name:
        raise ValueError(f"aggregator names are lower case without '+', got {name!r}")
    _ENTRIES[name] = (module, cls, tensionable)


def available() -> list[str]:
    """All names ``get`` accepts, including every ``"<name>+tension"``."""
    names = sorted(_ENTRIES)
    return names + [n + TENSION_SUFFIX for n in names if _ENTRIES[n][2]]


def _resolve(name: str) -> type:
    module, cls, _ = _ENTRIES[name]
    return getattr(importlib.import_module(module), cls)


def get(name: str, **kwargs: Any) -> Aggregator:
    """Build an aggregator from its short name, e.g. ``get("central+tension", alpha=0.3)``.

    With ``+tension`` the keyword arguments ``alpha``, ``window``, ``loss_term``, ``feasibility``
    and ``scale`` go to :class:`Tensioned`, the rest to the base method.

    Example:
        >>> from torch_mtlgrad.aggregators import get
        >>> get("mgda+tension", alpha=0.5)
        Tensioned(MinNorm(normalization='none', method='auto'), alpha=0.5, window=10)
    """
    if not isinstance(name, str):
        raise TypeError(f"aggregator name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    tension = key.endswith(TENSION_SUFFIX)
    base = key[: -len(TENSION_SUFFIX)] if tension else key
    if base not in _ENTRIES:
        raise ValueError(f"unknown aggregator {name!r}; available: {', '.join(available())}")
    if tension:
        if not _ENTRIES[base][2]:
            raise ValueError(f"{base!r} is a loss weighting, not a direction: it takes no '+tension'")
        from .tension import Tensioned

        tension_keys = ("alpha", "window", "loss_term", "feasibility", "scale", "solver",
                        "check_losses", "solver_iters")
        tkw = {k: kwargs.pop(k) for k in tension_keys if k in kwargs}
        return Tensioned(_resolve(base)(**kwargs), **tkw)
    return _resolve(base)(**kwargs)


def resolve(aggregator: str | Aggregator) -> Aggregator:
    """An aggregator object as it is, or :func:`get` of a short name.

    Example:
        >>> resolve("mean")
        Mean()
    """
    if isinstance(aggregator, Aggregator):
        return aggregator
    if isinstance(aggregator, str):
        return get(aggregator)
    raise TypeError(f"aggregator must be a name or an Aggregator, got {type(aggregator).__name__}")
