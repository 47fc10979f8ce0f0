"""The interface of gradient plugins that ``MultiTaskOptimizer`` runs each step.

A plugin sits between capture and aggregation (see ``ARCHITECTURE.md``)::

    capture J -> plugin.transform(J, losses) for each plugin, in order -> aggregator -> write d
    -> wrapped optimizer.step() -> plugin.post_step() for each plugin

Only ``transform`` is required; the others are optional.  Plugins are math on ``J``: they must
not call back into the optimizer.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from ._flat import FlatLayout

__all__ = ["GradientPlugin"]


@runtime_checkable
class GradientPlugin(Protocol):
    """What ``MultiTaskOptimizer(plugins=[...])`` calls.

    * ``bind(layout)``: once, before the first step, with the flat layout of the shared
      parameters (offsets, ``module_ranges``, ``segment_ids``).  Optional.
    * ``transform(J, losses) -> J``: every step, after capture and before aggregation.  ``J`` is
      ``[T, D]`` float32/64 and may be modified in place; return the matrix to aggregate.
      ``losses`` is the ``[T]`` tensor of detached loss values.
    * ``post_step()``: after the wrapped optimizer stepped.  Optional.
    * ``state_dict()`` / ``load_state_dict(state)``: what the plugin keeps between steps.
      Optional; when present it is saved inside the optimizer's ``state_dict()``.
    """

    def transform(self, J: Tensor, losses: Tensor) -> Tensor: ...


def plugin_state(plugin: Any) -> dict[str, Any]:
    fn = getattr(plugin, "state_dict", None)
    return fn() if callable(fn) else {}
