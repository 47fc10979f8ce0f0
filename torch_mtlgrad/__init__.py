"""torch_mtlgrad: multi-task learning in PyTorch with a two-line change to the training loop.

    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                             shared=model.encoder, aggregator="mgda")     # line 1
    for x, ys in loader:
        opt.zero_grad()
        losses = [crit(out, y) for out, y in zip(model(x), ys)]
        opt.backward(losses)          # line 2, instead of sum(losses).backward()
        opt.step()

What's here, in the order you need it:

* :class:`MultiTaskOptimizer`: wraps any ``torch.optim`` optimizer; gets each task's gradient of
  the ``shared=`` parameters and combines them with the ``aggregator=`` (default ``"sum"``, which
  trains exactly as ``sum(losses).backward()``).
* :mod:`torch_mtlgrad.aggregators`: the methods.  ``aggregators.get(name, **kwargs)`` builds one
  by name, ``aggregators.available()`` lists the names (``"<name>+tension"`` adds the task
  tensioners, ``"<name>*T"`` rescales a convex combination to the sum's learning-rate scale;
  ``aggregators.scale_convention(name)`` says which methods need it).
* The model-side methods, each a package with its entry point: :mod:`torch_mtlgrad.conal`
  (CoNAL: ``MultiTaskOptimizer(..., conflict_noticing=[m1, m2, ...])`` or
  ``conal.ConflictNoticing``, then the architecture search), :mod:`torch_mtlgrad.mpps` (MPPS:
  the ``mpps.MPPS`` module of progressive parameter sharing), :mod:`torch_mtlgrad.normal`
  (NORMAL: the ``normal.TimeAwareODE`` block and the ``normal.PositionUpdater`` plugin,
  ``plugins=[...]``).
* :func:`distribute`: ``distribute(opt)`` makes the optimizer data-parallel (averages ``J``
  across ranks; :mod:`torch_mtlgrad.distributed`).
* :class:`NonFiniteError`: raised by ``opt.backward`` for a NaN/Inf loss or task gradient (it
  names the task; ``nonfinite="skip"`` skips such steps instead).
* ``opt.diagnostics`` after each step (task weights, gradient norms, cosines, angles, the
  method's own); the functions behind it are in :mod:`torch_mtlgrad.diagnostics`.

Also: :mod:`torch_mtlgrad.weightings` (the learned loss weightings), :mod:`torch_mtlgrad.metrics`
and :class:`torch_mtlgrad.plugins.GradientPlugin` (the protocol of ``plugins=``, also importable
from here).  The model-side packages, the weightings and ``distributed`` load on first access.
"""

import importlib
from typing import Any

from . import aggregators
from .optimizer import MultiTaskOptimizer, NonFiniteError
from .plugins import GradientPlugin as GradientPlugin  # importable here, documented in .plugins

# In the order a user needs them (the module docstring's), not sorted.
__all__ = [  # noqa: RUF022
    "MultiTaskOptimizer", "aggregators", "conal", "mpps", "normal", "distribute", "NonFiniteError",
    "diagnostics", "weightings", "metrics", "distributed",
]
__version__ = "0.1.0"

_SUBMODULES = {"conal", "mpps", "normal", "weightings", "distributed", "metrics", "capture",
               "diagnostics"}
# Public names loaded on first access: name -> module.
_LAZY = {"distribute": "distributed"}
# Kept importable for compatibility, not part of the public surface: name -> module.
_COMPAT = {"FlatLayout": "capture.layout"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _COMPAT:
        return getattr(importlib.import_module(f"{__name__}.{_COMPAT[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
