"""The gradient-plugin protocol: every hook ``MultiTaskOptimizer`` may call, named and typed.

A plugin sits between capture and aggregation::

    capture J -> synchronize (collectives, before the checks) -> checks
      -> transform(J, losses), plugin by plugin -> aggregator -> write the direction
      -> wrapped optimizer.step() -> post_step()

Every hook is optional; a plugin implements at least one of :data:`HOOKS`.  Plugins are math on
``J`` (and their own state): they never call back into the optimizer.  The optimizer calls each
hook through :func:`call_hook`, so a missing hook is simply skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from torch import Tensor

from .capture.layout import FlatLayout

__all__ = ["HOOKS", "GradientPlugin", "call_hook", "check_plugin", "has_hook", "plugin_diagnostics",
           "plugin_state"]

#: The hooks a plugin may implement (``diagnostics`` is an attribute, the rest are methods).
HOOKS = ("bind", "parameters", "synchronize", "transform", "post_step", "state_dict",
         "load_state_dict", "diagnostics")


class _AnyHook(type(Protocol)):  # type: ignore[misc]
    """``isinstance(obj, GradientPlugin)``: ``obj`` implements at least one hook (each is optional,
    which a plain runtime-checkable Protocol cannot express)."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return any(has_hook(obj, h) for h in HOOKS)


class GradientPlugin(Protocol, metaclass=_AnyHook):
    """What ``MultiTaskOptimizer(plugins=[...])`` may call; implement any subset (at least one).

    * ``bind(layout)``: once, when the plugin joins the optimizer, with the flat layout of the
      shared parameters (offsets, ``module_ranges``, ``segment_ids``).
    * ``parameters() -> Iterable[Tensor]``: extra tensors to differentiate through; they receive
      the plain sum of their task gradients, as task-specific parameters do.
    * ``synchronize(J, losses, grads, params)``: every step, before the non-finite checks, in
      place: a collective (e.g. :class:`~torch_mtlgrad.distributed.JacobianAllReduce`), so that a
      NaN on one rank reaches all and all decide alike.  ``grads`` (the task-specific gradients of
      ``params``) may have entries replaced.
    * ``transform(J, losses) -> J``: every step, after the checks and before aggregation.  ``J``
      is ``[T, D]`` float32/64 and may be modified in place; return the matrix to aggregate.
      ``losses`` is the ``[T]`` tensor of detached loss values (or ``None`` in a legacy loop
      without ``loss=``).
    * ``post_step()``: after the wrapped optimizer stepped.
    * ``state_dict() -> dict`` / ``load_state_dict(state)``: what the plugin keeps between steps;
      saved inside the optimizer's ``state_dict()``.
    * ``diagnostics``: a dict whose tensor values join the optimizer's diagnostics as
      ``"<PluginClass>.<name>"``.
    """

    def bind(self, layout: FlatLayout) -> None: ...

    def parameters(self) -> Iterable[Tensor]: ...

    def synchronize(self, J: Tensor, losses: Tensor | None, grads: list[Tensor | None],
                    params: list[Tensor]) -> None: ...

    def transform(self, J: Tensor, losses: Tensor | None) -> Tensor: ...

    def post_step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def has_hook(plugin: Any, name: str) -> bool:
    """Whether ``plugin`` implements the hook ``name`` (one of :data:`HOOKS`)."""
    if name == "diagnostics":
        return isinstance(getattr(plugin, name, None), dict)
    return callable(getattr(plugin, name, None))


def call_hook(plugin: Any, name: str, *args: Any, default: Any = None) -> Any:
    """``plugin.<name>(*args)`` when the plugin implements it, else ``default``.

    Example:
        >>> class Counter:
        ...     def post_step(self): return "stepped"
        >>> call_hook(Counter(), "post_step"), call_hook(Counter(), "state_dict", default={})
        ('stepped', {})
    """
    fn = getattr(plugin, name, None)
    return fn(*args) if callable(fn) else default


def check_plugin(plugin: Any) -> None:
    """A plugin must implement at least one hook (a clear error for anything else)."""
    if not any(has_hook(plugin, h) for h in HOOKS):
        raise TypeError(f"plugin {plugin!r} implements none of the plugin hooks ({', '.join(HOOKS)}); "
                        "a gradient plugin needs at least a transform(J, losses) method")


def plugin_state(plugin: Any) -> dict[str, Any]:
    """The plugin's ``state_dict()``, or ``{}`` when it keeps none."""
    return call_hook(plugin, "state_dict", default={})


def plugin_diagnostics(plugins: Iterable[Any]) -> dict[str, Tensor]:
    """Each plugin's tensor diagnostics, as ``"<PluginClass>.<name>"``."""
    out: dict[str, Tensor] = {}
    for plugin in plugins:
        diag = getattr(plugin, "diagnostics", None)
        for k, v in (diag if isinstance(diag, dict) else {}).items():
            if isinstance(v, Tensor):
                out[f"{type(plugin).__name__}.{k}"] = v
    return out
