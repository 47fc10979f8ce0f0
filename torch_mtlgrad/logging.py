"""Write a :class:`~torch_mtlgrad.MultiTaskOptimizer`'s per-step diagnostics to TensorBoard, to any
callable (Weights & Biases, MLflow, a CSV writer) or to an in-memory :class:`History`.

``opt.diagnostics`` holds tensors (task weights ``[T]``, gradient norms ``[T]``, pairwise cosines
``[T, T]``, each task's angle to the direction ``[T]``, ``param_grad_norms`` ``[T, P]``, the
method's and the plugins' own entries).  :class:`DiagnosticsLogger` turns them into named scalars
every ``every`` steps:

* a 0-d entry ``k`` becomes ``"<prefix>/k"``;
* a per-task entry (first dimension ``T``) ``"<prefix>/k/<task>"``, with the task names given
  (``task0``, ``task1``, ... otherwise);
* ``cosine`` (symmetric, ones on the diagonal) ``"<prefix>/cosine/<task_i>-<task_j>"`` for
  ``i < j`` only; another ``[T, T]`` entry every pair ``i, j``;
* ``param_grad_norms`` ``"<prefix>/param_grad_norms/<task>/<parameter name>"``, the parameter
  names of the optimizer's shared layout (``opt.layout.names``: ``"0.weight"`` and so on for
  ``shared=`` a module);
* anything else ``"<prefix>/k/<i>"`` (``"<i>_<j>"`` for 2-d), its flat indices.

NaN values (the per-task entries of a task absent that step) and the bool ``present`` mask are
left out.  The values reach the host in one transfer per logged step.

Cost: on the steps it does not log, the logger switches the optimizer's diagnostics off
(``opt.compute_diagnostics = False``) so that nothing is computed for them, and back on before a
logged step; pass ``control=False`` to leave the optimizer's setting alone.  With
``every=N`` only one step in ``N`` pays for the diagnostics; the optimizer's setting is put back
by :meth:`DiagnosticsLogger.close` (or at the end of a ``with`` block).

Example:
    >>> import torch
    >>> from torch_mtlgrad import MultiTaskOptimizer
    >>> enc = torch.nn.Linear(4, 8); heads = torch.nn.ModuleList(
    ...     [torch.nn.Linear(8, 1) for _ in range(2)])
    >>> params = [*enc.parameters(), *heads.parameters()]
    >>> opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), shared=enc, aggregator="mgda")
    >>> history = History()
    >>> log = DiagnosticsLogger(opt, history, every=2, task_names=["left", "right"])
    >>> for _ in range(4):
    ...     opt.zero_grad()
    ...     z = enc(torch.randn(16, 4))
    ...     opt.backward([h(z).pow(2).mean() for h in heads])
    ...     opt.step()
    ...     _ = log.step()
    >>> history.steps
    [0, 2]
    >>> sorted(k for k in history.records[0] if k.startswith("mtl/weights"))
    ['mtl/weights/left', 'mtl/weights/right']
    >>> log.close()
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["DiagnosticsLogger", "History", "flatten_diagnostics"]

Sink = Callable[[dict[str, float], int], Any]


def _tag(name: str) -> str:
    """A name safe in a tag: no '/' inside a task or parameter name (it is the separator)."""
    return str(name).replace("/", "_")


def flatten_diagnostics(diagnostics: Mapping[str, Tensor], *, task_names: Sequence[str],
                        param_names: Sequence[str] | None = None,
                        prefix: str = "mtl") -> dict[str, float]:
    """Named scalars from a diagnostics dict (the naming rules in the module docstring), in one
    host transfer; NaN values and bool entries are left out.

    Example:
        >>> d = {"weights": torch.tensor([0.25, 0.75]), "direction_norm": torch.tensor(2.0),
        ...      "cosine": torch.tensor([[1.0, -0.5], [-0.5, 1.0]])}
        >>> flatten_diagnostics(d, task_names=["a", "b"])
        {'mtl/weights/a': 0.25, 'mtl/weights/b': 0.75, 'mtl/direction_norm': 2.0, 'mtl/cosine/a-b': -0.5}
    """
    T = len(task_names)
    tasks = [_tag(t) for t in task_names]
    base = f"{prefix}/" if prefix else ""
    names: list[str] = []
    parts: list[Tensor] = []
    for key, value in diagnostics.items():
        if not isinstance(value, Tensor) or value.dtype == torch.bool or value.is_complex():
            continue
        k = f"{base}{_tag(key)}"
        v = value.detach()
        if v.dim() == 0:
            names.append(k)
            parts.append(v.reshape(1))
            continue
        if key == "cosine" and v.shape == (T, T):
            i, j = torch.triu_indices(T, T, offset=1)
            names += [f"{k}/{tasks[a]}-{tasks[b]}" for a, b in zip(i.tolist(), j.tolist())]
            parts.append(v[i.to(v.device), j.to(v.device)])
            continue
        if key == "param_grad_norms" and v.dim() == 2 and v.shape[0] == T:
            pn = ([_tag(p) for p in param_names] if param_names is not None
                  and len(param_names) == v.shape[1] else [str(p) for p in range(v.shape[1])])
            names += [f"{k}/{t}/{p}" for t in tasks for p in pn]
            parts.append(v.reshape(-1))
            continue
        if v.shape[0] == T and v.dim() <= 2:
            rest = [""] if v.dim() == 1 else [f"/{tasks[j] if v.shape[1] == T else j}"
                                              for j in range(v.shape[1])]
            names += [f"{k}/{t}{r}" for t in tasks for r in rest]
            parts.append(v.reshape(-1))
            continue
        idx = [("_".join(map(str, ix))) for ix in _indices(tuple(v.shape))]
        names += [f"{k}/{ix}" for ix in idx]
        parts.append(v.reshape(-1))
    if not parts:
        return {}
    device = parts[0].device
    flat = torch.cat([p.to(device=device, dtype=torch.float64) for p in parts]).cpu().tolist()
    return {n: x for n, x in zip(names, flat) if not math.isnan(x)}


def _indices(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for n in shape:
        out = [ix + (i,) for ix in out for i in range(n)]
    return out


class History:
    """A sink that keeps every logged step in memory: ``steps`` and ``records`` (one dict of named
    scalars per logged step), for :func:`torch_mtlgrad.plots.plot_history` or a CSV file.

    Example:
        >>> h = History(); h({"mtl/weights/a": 0.5}, 3); h.steps, h.series("mtl/weights/a")
        ([3], [0.5])
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.records: list[dict[str, float]] = []

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        self.steps.append(int(step))
        self.records.append(dict(scalars))

    def tags(self) -> list[str]:
        """Every tag seen, in the order first seen."""
        seen: dict[str, None] = {}
        for r in self.records:
            seen.update(dict.fromkeys(r))
        return list(seen)

    def series(self, tag: str) -> list[float]:
        """The values of ``tag`` over the logged steps (NaN where a step did not have it)."""
        return [r.get(tag, math.nan) for r in self.records]

    def to_csv(self, path: str) -> None:
        """One row per logged step: ``step`` then every tag (empty where a step lacks it)."""
        tags = self.tags()
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", *tags])
            for s, r in zip(self.steps, self.records):
                w.writerow([s, *(r.get(t, "") for t in tags)])


class DiagnosticsLogger:
    """Log ``opt.diagnostics`` every ``every`` steps: call :meth:`step` after each ``opt.step()``.

    Args:
        opt: the :class:`~torch_mtlgrad.MultiTaskOptimizer`.
        sink: where the scalars go: an object with ``add_scalar(tag, value, global_step)`` (a
            ``torch.utils.tensorboard.SummaryWriter``), or a callable ``sink(scalars, step)``
            taking a ``dict`` of named floats (e.g. ``lambda s, i: wandb.log(s, step=i)``, or a
            :class:`History`).
        every: log one step in ``every`` (the first, then every ``every``-th), default 1.
        task_names: one name per task (default ``task0``, ``task1``, ...).
        prefix: the first part of every tag (default ``"mtl"``; ``""`` for none).
        level: the diagnostics level to switch on for a logged step, ``True`` or ``"full"``
            (default: the optimizer's setting when it is on, else ``True``).
        control: switch the optimizer's diagnostics off on the steps not logged (default), so
            they cost nothing.

    A step that the optimizer skipped (``nonfinite="skip"``) or that had no task present is not
    logged.  Errors name the bad argument.
    """

    def __init__(self, opt: Any, sink: Any, *, every: int = 1,
                 task_names: Sequence[str] | None = None, prefix: str = "mtl",
                 level: bool | str | None = None, control: bool = True) -> None:
        if not hasattr(opt, "compute_diagnostics") or not hasattr(opt, "diagnostics"):
            raise TypeError(f"opt must be a MultiTaskOptimizer, got {type(opt).__name__}")
        if hasattr(sink, "add_scalar"):
            writer = sink

            def emit(scalars: dict[str, float], step: int) -> None:
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, step)
            self._emit: Sink = emit
        elif callable(sink):
            self._emit = sink
        else:
            raise TypeError("sink must have add_scalar(tag, value, step) (a TensorBoard "
                            "SummaryWriter) or be a callable sink(scalars, step), got "
                            f"{type(sink).__name__}")
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if task_names is not None:
            task_names = [str(t) for t in task_names]
            if len(set(task_names)) != len(task_names):
                raise ValueError(f"task_names must be distinct, got {task_names}")
        original = opt.compute_diagnostics
        if level is None:
            level = original if original else True
        if level not in (True, "full"):
            raise ValueError(f"level must be True or 'full', got {level!r}")
        self.opt, self.every, self.prefix = opt, every, prefix
        self.task_names = task_names
        self.level, self.control = level, bool(control)
        self._original = original
        self.count = 0  # steps seen
        self._skipped = opt.skipped_steps
        self._arm()

    def _logs(self, i: int) -> bool:
        return i % self.every == 0

    def _arm(self) -> None:
        """Set the optimizer's diagnostics for the coming step."""
        if self.control:
            self.opt.compute_diagnostics = self.level if self._logs(self.count) else False

    def step(self, global_step: int | None = None) -> dict[str, float] | None:
        """After ``opt.step()``: log this step's diagnostics if it is a logged one (returns the
        scalars written, else ``None``).  ``global_step`` (default: the number of steps seen
        before this one) is the x-axis value given to the sink."""
        i = self.count
        at = i if global_step is None else int(global_step)
        self.count += 1
        skipped = self.opt.skipped_steps != self._skipped
        self._skipped = self.opt.skipped_steps
        out = None
        diag = self.opt.diagnostics
        if self._logs(i) and not skipped and diag:
            T = self._num_tasks(diag)
            names = self.task_names if self.task_names is not None else [f"task{t}"
                                                                        for t in range(T)]
            if len(names) != T:
                raise ValueError(f"task_names has {len(names)} names but the optimizer has {T} "
                                 "tasks: pass one name per task")
            out = flatten_diagnostics(diag, task_names=names, param_names=self.opt.layout.names,
                                      prefix=self.prefix)
            self._emit(out, at)
        self._arm()
        return out

    @staticmethod
    def _num_tasks(diag: Mapping[str, Tensor]) -> int:
        for key in ("weights", "losses", "grad_norms", "present"):
            if key in diag:
                return int(diag[key].shape[0])
        raise ValueError(f"the diagnostics have none of weights/losses/grad_norms: {sorted(diag)}")

    def close(self) -> None:
        """Put the optimizer's diagnostics setting back as it was (and flush a writer)."""
        if self.control:
            self.opt.compute_diagnostics = self._original

    def __enter__(self) -> DiagnosticsLogger:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
