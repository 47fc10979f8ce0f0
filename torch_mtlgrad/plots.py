"""Plots of a logged diagnostics history (matplotlib, an optional extra:
``pip install "torch_mtlgrad[plots]"``).

:func:`plot_history` draws, over the logged steps, the four panels of the tensioner paper's
Figure 6 (Nakamura, Grassi & Wolf, *Leveraging convergence behavior to balance conflicting tasks
in multi-task learning*): each task's gradient norm, the pairwise cosines between the task
gradients, each task's angle to the combined direction, and the task weights; one PNG file.

Example:
    >>> import os, tempfile
    >>> from torch_mtlgrad.logging import History
    >>> h = History()
    >>> for i in range(3):
    ...     h({"mtl/grad_norms/a": 1.0 + i, "mtl/grad_norms/b": 2.0,
    ...        "mtl/cosine/a-b": -0.1 * i, "mtl/angle/a": 40.0, "mtl/angle/b": 50.0,
    ...        "mtl/weights/a": 0.5, "mtl/weights/b": 0.5}, i)
    >>> path = os.path.join(tempfile.mkdtemp(), "diagnostics.png")
    >>> plot_history(h, path) == path and os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["PANELS", "plot_history"]

# The panels: diagnostics key -> (title, y-axis label).
PANELS: dict[str, tuple[str, str]] = {
    "grad_norms": ("task gradient norms", "||g_t||"),
    "cosine": ("pairwise cosines", "cos(g_i, g_j)"),
    "angle": ("angle to the direction", "degrees"),
    "weights": ("task weights", "w_t"),
}


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - the extra is installed in the test set-up
        raise ImportError("plot_history needs matplotlib: pip install 'torch_mtlgrad[plots]' "
                          "(or pip install matplotlib)") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_history(history: Any, path: str, *, prefix: str = "mtl",
                 panels: tuple[str, ...] = tuple(PANELS), title: str | None = None) -> str:
    """Draw the ``panels`` of a :class:`~torch_mtlgrad.logging.History` over its steps into the
    PNG file ``path`` (its folder must exist); returns ``path``.

    A panel whose diagnostics were never logged (e.g. the gradient ones of a loss-only method
    without ``diagnostics="full"``) is drawn empty with a note saying so.  Raises ``ValueError``
    for an empty history or an unknown panel.
    """
    if not getattr(history, "records", None):
        raise ValueError("the history is empty: log some steps first (DiagnosticsLogger(opt, "
                         "history).step() after each opt.step())")
    unknown = [p for p in panels if p not in PANELS]
    if unknown:
        raise ValueError(f"unknown panels {unknown}; choose from {list(PANELS)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"the folder of {path!r} does not exist: create it first")
    plt = _matplotlib()
    base = f"{prefix}/" if prefix else ""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    tags = history.tags()
    for ax, key in zip(axes[0], panels):
        head, ylabel = PANELS[key]
        mine = [t for t in tags if t.startswith(f"{base}{key}/") and t.count("/") == base.count("/") + 1]
        for tag in mine:
            ax.plot(history.steps, history.series(tag), label=tag.rsplit("/", 1)[1])
        if mine:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(head)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
