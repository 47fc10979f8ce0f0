"""Checkpoints: what ``MultiTaskOptimizer.state_dict()`` adds under ``"mtlgrad"``, the checks a
loaded entry must pass (clear errors for malformed or mismatched files), and an all-or-nothing
load."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .capture.layout import FlatLayout

__all__ = ["STATE_KEY", "check_compatible", "check_entry", "entry", "load_all_or_nothing"]

STATE_KEY = "mtlgrad"


def entry(num_tasks: int | None, layout: FlatLayout, aggregator: Any, plugin_states: list[dict[str, Any]],
          skipped_steps: int, capture_tuning: dict[str, Any]) -> dict[str, Any]:
    """The ``"mtlgrad"`` entry: the aggregator's and plugins' state, T, the shared parameters'
    shapes and names (checked on load), the skipped-step count and the ``capture="timed"`` choices."""
    return {
        "num_tasks": num_tasks,
        "shared_shapes": [tuple(s) for s in layout.shapes],
        "shared_names": list(layout.names),
        "aggregator_type": type(aggregator).__name__,
        "aggregator": aggregator.state_dict(),
        "plugins": plugin_states,
        "skipped_steps": skipped_steps,
        "capture_tuning": capture_tuning,
    }


def check_entry(mine: Any) -> None:
    """Types of the ``"mtlgrad"`` entry of a state dict."""
    if not isinstance(mine, dict):
        raise TypeError(f"checkpoint's {STATE_KEY!r} entry must be a dict, got {type(mine).__name__}")
    missing = {"num_tasks", "shared_shapes", "aggregator_type", "aggregator", "plugins"} - set(mine)
    if missing:
        raise ValueError(f"checkpoint's {STATE_KEY!r} entry lacks {sorted(missing)}")
    n = mine["num_tasks"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"checkpoint's num_tasks must be a positive int or None, got {n!r}")
    shapes = mine["shared_shapes"]
    if not (isinstance(shapes, (list, tuple)) and all(
            isinstance(s, (list, tuple, torch.Size)) and all(isinstance(v, int) and v >= 0 for v in s)
            for s in shapes)):
        raise TypeError("checkpoint's shared_shapes must be a list of shapes (lists of ints)")
    if not isinstance(mine["aggregator_type"], str) or not isinstance(mine["aggregator"], dict):
        raise TypeError("checkpoint's aggregator_type must be a str and aggregator a dict")
    if not (isinstance(mine["plugins"], (list, tuple)) and all(isinstance(p, dict) for p in mine["plugins"])):
        raise TypeError("checkpoint's plugins must be a list of dicts")
    names = mine.get("shared_names")
    if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
                                  and len(names) == len(shapes)):
        raise TypeError("checkpoint's shared_names must be a list of str, one per shared shape")
    k = mine.get("skipped_steps", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"checkpoint's skipped_steps must be an int >= 0, got {k!r}")


def _named(names: Sequence[str]) -> bool:
    """Whether shared-parameter names come from a module (``shared=`` a module), not positions."""
    return not any(n.startswith("shared[") for n in names)


def check_compatible(mine: dict[str, Any], layout: FlatLayout, num_tasks: int | None,
                     aggregator_type: str, num_plugins: int) -> None:
    """The checkpoint was made with the same shared parameters (shapes, and names where both
    sides have them), number of tasks, aggregator and number of plugins."""
    shapes = [tuple(s) for s in mine["shared_shapes"]]
    ours = [tuple(s) for s in layout.shapes]
    if shapes != ours:
        raise ValueError(
            f"checkpoint has {len(shapes)} shared parameters with shapes {shapes[:4]}..., this "
            f"optimizer has {len(ours)} with shapes {ours[:4]}...: different shared parameters"
        )
    names = mine.get("shared_names")  # absent in older checkpoints
    if names is not None and _named(names) and _named(layout.names) and list(names) != list(layout.names):
        diff = next(i for i, (a, b) in enumerate(zip(names, layout.names)) if a != b)
        raise ValueError(
            f"checkpoint's shared parameter {diff} is {names[diff]!r}, this optimizer's is "
            f"{layout.names[diff]!r}: different shared parameters (or another order)"
        )
    if mine["num_tasks"] is not None and num_tasks is not None and mine["num_tasks"] != num_tasks:
        raise ValueError(f"checkpoint was made with {mine['num_tasks']} tasks, this optimizer has "
                         f"{num_tasks}")
    if mine["aggregator_type"] != aggregator_type:
        raise ValueError(f"checkpoint's aggregator is {mine['aggregator_type']}, this optimizer's "
                         f"is {aggregator_type}")
    if len(mine["plugins"]) != num_plugins:
        raise ValueError(f"checkpoint has {len(mine['plugins'])} plugins, this optimizer has "
                         f"{num_plugins}")


def load_all_or_nothing(parts: Sequence[tuple[Callable[[], Any], Callable[[Any], None], Any]]) -> None:
    """Load each part ``(save, load, value)`` in order; when one fails, every part is put back
    to what ``save()`` returned before, and the error is raised (wrapped in a ``ValueError``
    saying nothing was loaded unless it is already a ``ValueError`` or ``TypeError``).

    Example:
        >>> box = {"a": 1}
        >>> def bad(v):
        ...     if v == 3:
        ...         raise KeyError(v)
        >>> try:
        ...     load_all_or_nothing([(lambda: box["a"], lambda v: box.update(a=v), 2),
        ...                          (lambda: None, bad, 3)])
        ... except ValueError as err:
        ...     print(box, "|", err)
        {'a': 1} | malformed checkpoint (KeyError: 3); nothing was loaded
    """
    backups = [save() for save, _, _ in parts]
    try:
        for _, load, value in parts:
            load(value)
    except Exception as err:
        for (_, load, _), backup in zip(parts, backups):
            load(backup)
        if isinstance(err, (ValueError, TypeError)):
            raise
        raise ValueError(f"malformed checkpoint ({type(err).__name__}: {err}); nothing was "
                         "loaded") from err
