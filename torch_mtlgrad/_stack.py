"""Where a warning points: the user's line, however deep in the step it is raised."""

from __future__ import annotations

import sys

__all__ = ["user_stacklevel"]


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn` called by the function calling this one that
    makes the warning point at the first caller outside this package.

    Example:
        >>> isinstance(user_stacklevel(), int)
        True
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("torch_mtlgrad."):
        frame = frame.f_back
        level += 1
    return level
