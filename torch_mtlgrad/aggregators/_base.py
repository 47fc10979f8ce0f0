"""The aggregator interface shared by every gradient-combination method.

An aggregator maps the task Jacobian ``J`` (shape ``[T, D]``, row ``t`` the gradient of
loss ``t`` with respect to the shared parameters) and optionally the loss values ``[T]`` to
one direction ``d`` of shape ``[D]``.  It is plain math on tensors: nothing here knows about
optimizers, hooks or models.

Two kinds of subclasses:

* :class:`Aggregator`: implement :meth:`Aggregator.forward` (``J, losses -> d``).
* :class:`WeightedAggregator`: the method is a weighting ``w`` of the rows, ``d = w^T J``.
  Implement :meth:`WeightedAggregator.weighting`, which is handed ``G = J J^T`` when the class
  is ``gramian_only`` and no matrix at all otherwise (fixed or loss-based weights): it never
  sees ``J``.  That is what lets :meth:`WeightedAggregator.aggregate_gramian` run on ``G`` alone.

:meth:`Aggregator.aggregate` returns an :class:`Aggregation`: the direction, the task weights when
the direction is a combination of the rows (else ``None``) and the method's diagnostics; callers
use it (``agg(J, losses)`` is its ``direction``).  The attributes ``agg.weights`` and
``agg.diagnostics`` are the last call's, the same tensors as the returned :class:`Aggregation`,
for interactive use.

Read-only properties tell a caller (the optimizer) which routes a method allows, so that it
needs no ``isinstance`` check and never reads a wrapper's base: :attr:`Aggregator.reads` (what the
method reads: ``"losses"``, ``"gramian"`` or ``"jacobian"``), :attr:`Aggregator.from_gramian`
(the weights can come from ``G`` without ``J``) and :attr:`Aggregator.runs_on_features` (the
method may run on any matrix with the same Gramian as ``J``).

Absent tasks (``present=``).  Multi-task datasets often label only some tasks in a batch.
:meth:`Aggregator.aggregate`, :meth:`WeightedAggregator.aggregate_gramian` and
:meth:`WeightedAggregator.aggregate_losses` take ``present``: ``None`` (every task present, the
plain call) or a 1-D bool tensor or sequence of bools with one entry per task (``T_total``) and at
least one ``True``.  ``J`` (``G``, the losses) then holds only the present tasks' rows (values),
in task order.  The rules, the same for every method:

* The method runs on the present rows as if they were all its tasks (e.g. ``mean`` averages over
  the present tasks, random methods draw for ``T_present`` tasks).
* ``weights`` have length ``T_total``, exactly 0 at absent tasks, the present tasks' weights in
  their places.
* ``diagnostics`` are the method's on the present rows: a per-task diagnostic has length
  ``T_present`` (``[T_present, T_present]`` for pairwise ones), in task order; the caller holds
  ``present`` to place them.
* State: an absent task's per-task state (its histories, tracked rows, learned parameters and
  their optimiser moments) is left untouched, bit for bit; the present tasks' state is updated
  as if the method ran on the present rows alone with its state restricted to them; state that
  is not per task (step counters, the random generator) advances as on a plain step.  A task
  absent at the first steps gets its initial state when it first appears.  Each stateful
  method's docstring says what it does with an absent task (some exceptions, e.g. DWA's
  multi-step epochs, are stated there).
* An error names the task by its index among all ``T_total`` tasks.
* A malformed ``present`` (wrong length, not bool, all ``False``, or a row count that does not
  match) is a ``ValueError`` raised before anything changes.
* ``present`` all ``True`` is the plain call (bit-identical to ``present=None``).

The mechanism (for implementers): :meth:`Aggregator._task_state` names the attributes holding
per-task tensors and their task axes; :meth:`Aggregator._restrict` slices them to the present
tasks before the call and :meth:`Aggregator._scatter` writes the updated slices back after it
(filling never-seen tasks with the method's initial value), so a method's own code only ever
sees ``T_present`` tasks.  Methods with state that is not a plain slice override the two hooks.

Non-finite inputs.  :meth:`Aggregator.aggregate`, :meth:`WeightedAggregator.aggregate_gramian`
and :meth:`WeightedAggregator.aggregate_losses` check that ``J`` (``G``) and the losses are finite
before anything else happens (no state changes on a failed call): a NaN or inf raises
:class:`~torch_mtlgrad.NonFiniteError` (a ``FloatingPointError`` and a ``ValueError``)
naming the task by its index among all tasks (with ``present=``), for every method alike.  The
check costs one host-device synchronisation; pass ``check_finite=False`` to a call, or set the
attribute ``agg.check_finite = False`` (on an instance or a class), to skip it: non-finite inputs
then give whatever the method's arithmetic makes of them (NaN, or an error from a solver).
:class:`~torch_mtlgrad.MultiTaskOptimizer` checks ``J`` itself under its ``nonfinite=`` policy.
An aggregator called inside another's call (a wrapper's base) is not checked again.

:func:`work_dtype` is the one rule for the dtype aggregation runs in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

__all__ = ["Aggregation", "Aggregator", "Reads", "WeightedAggregator", "check_finite_input",
           "check_gramian", "check_losses", "check_matrix", "check_present", "restrict_tensor",
           "scatter_tensor", "work_dtype"]

Reads = Literal["losses", "gramian", "jacobian"]


def work_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype aggregation runs in: float64 stays, everything else (half precision, or mixed
    dtypes given as ``None``) becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Aggregation:
    """What one call of an aggregator found.

    Attributes:
        direction: ``d`` (``[D]``, in ``J``'s dtype); ``None`` from
            :meth:`WeightedAggregator.aggregate_gramian`, which never sees ``J``.
        weights: ``[T]`` task weights when ``d = w^T J`` (else ``None``).
        diagnostics: the method's own tensors (e.g. ``c`` and ``delta`` for tensioners).
        gramian: ``G = J J^T`` of the rows the call combined, when the method formed it on the
            way (``None`` otherwise), so that a caller's diagnostics (cosines, norms, each row's
            angle to ``d = w^T J``, from ``G`` and ``w``) need not form it again.
    """

    direction: Tensor | None
    weights: Tensor | None
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    gramian: Tensor | None = None


def check_matrix(J: Tensor) -> Tensor:
    """Validate a task Jacobian and return it in the aggregation dtype (float32 or float64)."""
    if not isinstance(J, Tensor):
        raise TypeError(f"J must be a torch.Tensor of shape [T, D], got {type(J).__name__}")
    if J.dim() != 2:
        raise ValueError(f"J must have shape [T, D] (2 dimensions), got shape {tuple(J.shape)}")
    if J.shape[0] == 0:
        raise ValueError("J has no rows: there must be at least one task")
    if not (J.is_floating_point()):
        raise TypeError(f"J must be a floating-point tensor, got dtype {J.dtype}")
    return J.to(work_dtype(J.dtype))


def check_gramian(G: Tensor) -> Tensor:
    """Validate a Gramian ``G = J J^T`` and return it in the aggregation dtype (as
    :func:`check_matrix` does for ``J``)."""
    if not isinstance(G, Tensor):
        raise TypeError(f"G must be a torch.Tensor of shape [T, T], got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square [T, T] Gramian, got shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise ValueError("G has no rows: there must be at least one task")
    if not G.is_floating_point():
        raise TypeError(f"G must be a floating-point tensor, got dtype {G.dtype}")
    return G.to(work_dtype(G.dtype))


def check_losses(losses: Any, num_tasks: int, like: Tensor) -> Tensor:
    """Validate loss values for ``num_tasks`` tasks; returns a detached 1-D tensor like ``like``."""
    if isinstance(losses, (list, tuple)):
        losses = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in losses])
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a tensor of shape [{num_tasks}], got {type(losses).__name__}")
    losses = losses.detach()
    if losses.dim() != 1 or losses.shape[0] != num_tasks:
        raise ValueError(
            f"losses must have shape [{num_tasks}] (one value per row of J), "
            f"got shape {tuple(losses.shape)}"
        )
    return losses.to(device=like.device, dtype=like.dtype)


def check_present(present: Any, num_rows: int, num_tasks: int | None = None, *,
                  rows: str = "J", _count_only: bool = False) -> Tensor | None:
    """Validate ``present`` for a call whose matrix (``rows``) has ``num_rows`` rows.

    Returns ``None`` for ``None`` or all ``True`` (the plain call), else the ``[T_total]`` bool
    mask on the CPU.  ``num_tasks`` is the number of tasks the method already knows of (its
    tracked state or per-task settings), or ``None``.  Every problem is a ``ValueError`` that says
    what to pass instead.

    Example:
        >>> check_present([True, False, True], 2)
        tensor([ True, False,  True])
        >>> check_present([True, True], 2) is None
        True
    """
    if present is None:
        return None
    hint = "pass one bool per task (True: the task has a loss this step), e.g. [True, False, True]"
    if isinstance(present, Tensor):
        if present.dtype != torch.bool:
            raise ValueError(f"present must be a bool tensor, got dtype {present.dtype}: {hint}")
        if present.dim() != 1:
            raise ValueError(f"present must be 1-D (one entry per task), got shape "
                             f"{tuple(present.shape)}: {hint}")
        mask = present.detach().to("cpu")
    elif isinstance(present, Sequence) and not isinstance(present, (str, bytes)):
        vals = []
        for i, v in enumerate(present):
            is_bool_tensor = isinstance(v, Tensor) and v.dim() == 0 and v.dtype == torch.bool
            if is_bool_tensor or type(v).__name__ == "bool_":  # a 0-d bool tensor, numpy.bool_
                v = bool(v)
            if not isinstance(v, bool):  # the interface's rule: every bad present is a ValueError
                raise ValueError(f"present[{i}] is {v!r}, not a bool: {hint}")  # noqa: TRY004
            vals.append(v)
        mask = torch.tensor(vals, dtype=torch.bool)
    else:
        raise ValueError(f"present must be None or a 1-D bool tensor / sequence of bools, got "  # noqa: TRY004
                         f"{type(present).__name__}: {hint}")
    if mask.numel() == 0:
        raise ValueError(f"present is empty: {hint}")
    if _count_only:
        return mask
    if num_tasks is not None and mask.numel() != num_tasks:
        raise ValueError(
            f"present has {mask.numel()} entries but this aggregator has {num_tasks} tasks (its "
            "state or per-task settings): pass one entry per task, absent ones False")
    n = int(mask.sum())
    if n == 0:
        raise ValueError("present has no True entry: at least one task must be present (skip "
                         "the aggregator for a step where no task has a loss)")
    if n != num_rows:
        what = "values" if rows == "losses" else "rows"
        raise ValueError(
            f"{rows} has {num_rows} {what} but present marks {n} tasks present: {rows} must hold "
            f"exactly the present tasks' {what}, in task order (drop the absent tasks' {what})")
    if n == mask.numel():
        return None
    return mask


def restrict_tensor(x: Tensor, axes: tuple[int, ...], idx: Tensor) -> Tensor:
    """A copy of ``x`` keeping the entries ``idx`` along each of the task ``axes``.

    Example:
        >>> restrict_tensor(torch.arange(9.0).reshape(3, 3), (0, 1), torch.tensor([0, 2]))
        tensor([[0., 2.],
                [6., 8.]])
    """
    idx = idx.to(x.device)
    for ax in axes:
        x = x.index_select(ax, idx)
    return x if axes else x.clone()


def scatter_tensor(full: Tensor | None, sub: Tensor, axes: tuple[int, ...], idx: Tensor,
                   num_tasks: int, fill: float = 0.0) -> Tensor:
    """``full`` (a new tensor) with ``sub`` written at ``idx`` along each of the task ``axes``;
    where ``full`` is ``None`` the other entries are ``fill`` (``num_tasks`` along each axis).

    Example:
        >>> scatter_tensor(None, torch.tensor([1.0, 2.0]), (0,), torch.tensor([0, 2]), 3)
        tensor([1., 0., 2.])
    """
    if full is None:
        shape = list(sub.shape)
        for ax in axes:
            shape[ax] = num_tasks
        full = torch.full(shape, fill, dtype=sub.dtype, device=sub.device)
    else:
        full = full.to(device=sub.device, dtype=sub.dtype)
    idx = idx.to(sub.device)

    def put(out: Tensor, part: Tensor, rest: tuple[int, ...]) -> Tensor:
        if not rest:
            return part
        inner = put(out.index_select(rest[0], idx), part, rest[1:])
        return out.index_copy(rest[0], idx, inner)

    return put(full, sub, axes)


# True while an aggregator's call runs: an aggregator called inside it (a wrapper's base, e.g.
# the tensioner's) does not check its inputs again (they are the outer call's, or derived from
# them), so check_finite=False on the outer call means no synchronisation at all.
_IN_CALL: ContextVar[bool] = ContextVar("torch_mtlgrad_aggregator_in_call", default=False)


@contextmanager
def _inner_calls() -> Iterator[None]:
    token = _IN_CALL.set(True)
    try:
        yield
    finally:
        _IN_CALL.reset(token)


def check_finite_input(x: Tensor, what: str, mask: Tensor | None = None) -> None:
    """Raise :class:`~torch_mtlgrad.NonFiniteError` when ``x`` has a NaN or inf.

    ``x`` is ``J`` (``[T, D]``), ``G`` (``[T, T]``) or the losses (``[T]``) of a call, over the
    present tasks when ``mask`` (the ``[T_total]`` bool mask of a call with ``present``) is
    given; the message names the tasks by their index among all tasks.  A row of ``G`` is
    blamed by its diagonal (``||g_t||^2``; a NaN row of ``J`` makes its column of ``G`` NaN
    too, so every row of ``G`` then holds one), else by any entry.  One host synchronisation
    (``bool(isfinite(x).all())``) when ``x`` is finite.

    Example:
        >>> check_finite_input(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]), "J")
        Traceback (most recent call last):
        ...
        torch_mtlgrad._errors.NonFiniteError: J is not finite (NaN or inf) at task 1 (row 1 of J): ...
    """
    if bool(torch.isfinite(x).all()):
        return
    from .._errors import NonFiniteError

    ok = torch.isfinite(x)
    if x.dim() == 1:
        bad = ~ok
    elif what == "G":
        bad = ~torch.diagonal(ok)
        if not bool(bad.any()):
            bad = ~ok.all(dim=1)
    else:
        bad = ~ok.all(dim=1)
    rows = bad.nonzero().flatten().tolist()
    if mask is None:
        tasks = rows
    else:
        idx = mask.nonzero().flatten().tolist()
        tasks = [idx[r] for r in rows]
    kind = "value" if x.dim() == 1 else "row"
    verb = "are" if what in ("losses", "norms") else "is"
    where = ", ".join(f"task {t} ({kind} {r} of {what})" for t, r in zip(tasks, rows))
    values = x[rows[0]] if x.dim() == 1 else x[rows[0]][~ok[rows[0]]][0]
    raise NonFiniteError(
        f"{what} {verb} not finite (NaN or inf) at {where}: e.g. {float(values)}.  Every entry must "
        "be finite (look at that task's loss and gradient); to skip this check (it costs a "
        "host-device synchronisation), pass check_finite=False or set agg.check_finite = False")


TaskFill = float | Callable[[], float]


class Aggregator(ABC):
    """Base class: ``agg.aggregate(J, losses=None, *, present=None) -> Aggregation``;
    ``agg(J, losses) -> d``.

    Subclasses set the class attributes:

    * ``gramian_only``: the direction depends on ``J`` only through ``G = J J^T`` (the weights do;
      the direction is then ``w^T J``).
    * ``needs_losses``: the method reads the loss values; calling it without them is an error.
    * ``stateful``: it keeps state between calls (returned by :meth:`state_dict`).
    * ``random``: it draws random numbers (from a seeded generator whose state is in
      :meth:`state_dict`, so that a resumed run draws what an uninterrupted one would).
    * ``paper``: the publication the method comes from, as it is cited in the methods table
      (authors, short title, venue and year; ``"baseline"`` for the plain weightings).
    * ``summary``: one line saying what the method does, for the methods table.

    ``check_finite`` (class attribute, default ``True``; may be set on an instance): whether a
    call checks its inputs for NaN/inf before running (see the module docstring).  A call's own
    ``check_finite=False`` skips the check too.

    Attributes:
        weights: the last call's task weights (``None`` before the first call, or when the
            direction is not a combination of the rows): the same tensor as that call's
            :attr:`Aggregation.weights` (``[T_total]``, 0 at absent tasks, after a call with
            ``present``).
        diagnostics: the last call's diagnostics, the same dict as :attr:`Aggregation.diagnostics`
            (per-task entries over the present tasks only, see the module docstring).

    Use the returned :class:`Aggregation` rather than these attributes: they are overwritten by
    the next call.

    Absent tasks: see the module docstring for ``present=`` and its rules.
    """

    gramian_only: ClassVar[bool] = False
    needs_losses: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    random: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    check_finite: bool = True
    # Global indices of the present tasks during a call with ``present`` (else None).
    _subset_idx: Tensor | None = None
    _subset_total: int | None = None  # T_total during such a call

    def __init__(self) -> None:
        self.weights: Tensor | None = None
        self.diagnostics: dict[str, Tensor] = {}
        self.gramian: Tensor | None = None  # G of the last call's rows, when it formed it

    def __call__(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        """The direction ``d`` (``[D]``, in ``J``'s dtype): :meth:`aggregate`'s ``direction``."""
        d = self.aggregate(J, losses).direction
        assert d is not None
        return d

    def aggregate(self, J: Tensor, losses: Tensor | None = None, *,
                  present: Tensor | Sequence[bool] | None = None,
                  check_finite: bool = True) -> Aggregation:
        """Validate ``J`` (``[T, D]``) and the losses (``[T]`` or ``None``), then combine.

        ``present``: ``None`` (every task present), or one bool per task (``T_total``, at least
        one ``True``); ``J`` and the losses then hold the present tasks' rows only, in task
        order, and the weights come back with length ``T_total`` (0 at absent tasks).

        ``check_finite``: a NaN/inf in ``J`` or the losses raises
        :class:`~torch_mtlgrad.NonFiniteError` naming the task, before any state
        changes (one host synchronisation); ``False`` (or the attribute
        ``self.check_finite = False``) skips the check.

        Example:
            >>> from torch_mtlgrad.aggregators import get
            >>> out = get("mean").aggregate(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
            >>> out.direction, out.weights
            (tensor([0.5000, 0.5000]), tensor([0.5000, 0.5000]))
            >>> out = get("mean").aggregate(torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
            ...                             present=[True, False, True])
            >>> out.direction, out.weights
            (tensor([0.5000, 0.5000]), tensor([0.5000, 0.0000, 0.5000]))
        """
        out_dtype = J.dtype if isinstance(J, Tensor) else None
        Jw = check_matrix(J)
        mask = check_present(present, Jw.shape[0], self._known_num_tasks())
        lw: Tensor | None = None
        if losses is not None:
            lw = check_losses(losses, Jw.shape[0], Jw)
        elif self.needs_losses:
            raise ValueError(f"{type(self).__name__} needs the loss values: call agg(J, losses)")
        if self._checks_finite(check_finite):
            check_finite_input(Jw, "J", mask)
            if lw is not None:
                check_finite_input(lw, "losses", mask)
        self.gramian = None
        with _inner_calls():
            if mask is None:
                d = self.forward(Jw, lw)
            else:
                with self._present_call(mask):
                    d = self.forward(Jw, lw)
        return Aggregation(d.to(out_dtype), self.weights, self.diagnostics, self.gramian)

    def _checks_finite(self, check_finite: bool) -> bool:
        """Whether this call checks its inputs: the call's and the instance's flags both on, and
        not called inside another aggregator's call."""
        return bool(check_finite) and bool(self.check_finite) and not _IN_CALL.get()

    @property
    def reads(self) -> Reads:
        """What the method reads of the tasks, so that a caller can build only that:

        * ``"losses"``: only the loss values (or nothing): a :class:`WeightedAggregator` that is
          not ``gramian_only`` (``mean``, ``sum``, ``constant``, ``rlw``, ``dwa``, ``uw``,
          ``famo``).  :meth:`WeightedAggregator.aggregate_losses` gives its weights without any
          gradient, so one backward pass of ``sum_t w_t L_t`` is the whole step.
        * ``"gramian"``: ``G = J J^T`` (and the losses): :attr:`from_gramian` and
          ``gramian_only`` (``mgda``, ``central``, ``upgrad``, ``gradnorm`` without ``layer=``...).
        * ``"jacobian"``: ``J`` itself (everything else: ``Tensioned``, ``moco``, ``graddrop``,
          ``GradNorm(layer=...)``).
        """
        if not self.from_gramian:
            return "jacobian"
        return "gramian" if self.gramian_only else "losses"

    @property
    def from_gramian(self) -> bool:
        """Whether the direction is ``w^T J`` with weights that read only ``G = J J^T`` and/or the
        losses, so that :meth:`WeightedAggregator.aggregate_gramian` can run without ``J``.

        True for every :class:`WeightedAggregator` (except GradNorm with ``layer=``, whose norms
        are over some columns of ``J``); false for every other aggregator, the tensioner included
        (its direction ``beta v + omega^T J`` needs the base direction ``v``)."""
        return False

    @property
    def runs_on_features(self) -> bool:
        """Whether the method may run on any matrix with the same Gramian as ``J``: the
        representation-gradient approximation (MGDA-UB, Sener and Koltun, *Multi-Task Learning as
        Multi-Objective Optimization*, NeurIPS 2018, Sec. 3.3) applies it to the gradients with
        respect to the shared features instead of the shared parameters.

        True when the class is ``gramian_only`` or a :class:`WeightedAggregator` (whose weights read
        ``G`` or nothing of ``J``); GradNorm with ``layer=`` is not (its columns are parameters).
        :class:`~torch_mtlgrad.aggregators.Tensioned` answers as its base method."""
        return self.gramian_only

    @abstractmethod
    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        """Compute the direction from a validated ``J`` (float32/64) and losses (or ``None``)."""

    # Absent tasks ---------------------------------------------------------------------------
    def _task_state(self) -> dict[str, tuple[tuple[int, ...], TaskFill]]:
        """The attributes holding per-task state: ``name -> (task axes, fill)``.

        Each attribute is a tensor (or ``None`` before the first call) or a
        :class:`~torch_mtlgrad.aggregators._learned.LearnedVector`.  ``fill`` is the value a
        task's entries get before the task is first present (its initial state)."""
        return {}

    def _task_config(self) -> dict[str, tuple[int, ...]]:
        """Per-task settings (constructor arguments): ``name -> task axes``.  They are restricted
        to the present tasks during a call with ``present`` and restored after it."""
        return {}

    def _known_num_tasks(self) -> int | None:
        """The number of tasks the state or the per-task settings fix (``None``: any)."""
        from ._learned import LearnedVector

        for name, (axes, _) in self._task_state().items():
            v = getattr(self, name)
            if isinstance(v, LearnedVector):
                v = v.value
            if v is not None:
                return int(v.shape[axes[0]])
        for name, axes in self._task_config().items():
            v = getattr(self, name)
            if isinstance(v, Tensor) and v.dim() > 0:
                return int(v.shape[axes[0]])
        return None

    def _task_index(self, t: int) -> int:
        """The index among all tasks of row ``t`` of this call (for error messages)."""
        return t if self._subset_idx is None else int(self._subset_idx[t])

    def _restrict(self, idx: Tensor, num_tasks: int) -> dict[str, Any]:
        """Swap the per-task state and settings for their present tasks' slices; returns what
        :meth:`_scatter` / :meth:`_unrestrict` need (the full values)."""
        from ._learned import LearnedVector

        saved: dict[str, Any] = {"state": {}, "config": {},
                                 "subset": (self._subset_idx, self._subset_total)}
        for name, (axes, fill) in self._task_state().items():
            full = getattr(self, name)
            saved["state"][name] = full
            if isinstance(full, LearnedVector):
                setattr(self, name, full.restrict(idx, fill() if callable(fill) else fill))
            elif full is not None:
                setattr(self, name, restrict_tensor(full, axes, idx))
        for name, axes in self._task_config().items():
            full = getattr(self, name)
            saved["config"][name] = full
            if isinstance(full, Tensor):
                setattr(self, name, restrict_tensor(full, axes, idx))
        if isinstance(getattr(self, "_warm", None), dict):
            # Solver warm starts (a speed-only cache): one per set of present tasks.
            saved["warm"] = self._warm
            subsets = self.__dict__.setdefault("_warm_subsets", {})
            self._warm = subsets.setdefault(tuple(idx.tolist()), {})
        self._subset_idx, self._subset_total = idx, num_tasks
        return saved

    def _unrestrict(self, saved: dict[str, Any]) -> None:
        """Put back the full state and settings unchanged (the call failed)."""
        for name, full in {**saved["state"], **saved["config"]}.items():
            setattr(self, name, full)
        if "warm" in saved:
            self._warm = saved["warm"]
        self._subset_idx, self._subset_total = saved["subset"]

    def _scatter(self, saved: dict[str, Any], idx: Tensor, num_tasks: int) -> None:
        """Write the present tasks' updated state back into the full state."""
        from ._learned import LearnedVector

        for name, (axes, fill) in self._task_state().items():
            full, sub = saved["state"][name], getattr(self, name)
            value = fill() if callable(fill) else fill
            if isinstance(sub, LearnedVector):
                base = full if isinstance(full, LearnedVector) else sub.empty_like()
                base.scatter(sub, idx, num_tasks, value)
                setattr(self, name, base)
            elif sub is None:
                setattr(self, name, full)
            else:
                setattr(self, name, scatter_tensor(full, sub, axes, idx, num_tasks, value))
        for name, full in saved["config"].items():
            setattr(self, name, full)
        if "warm" in saved:
            self._warm = saved["warm"]
        self._subset_idx, self._subset_total = saved["subset"]

    @contextmanager
    def _present_call(self, mask: Tensor) -> Iterator[None]:
        """Run the body on the present tasks' state; scatter state and weights after it."""
        idx = mask.nonzero().flatten()
        T = mask.numel()
        saved = self._restrict(idx, T)
        try:
            yield
        except BaseException:
            self._unrestrict(saved)
            raise
        self._scatter(saved, idx, T)
        if self.weights is not None:
            w = self.weights
            self.weights = w.new_zeros(T).index_copy(0, idx.to(w.device), w)

    # State -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the method keeps between calls (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    def reset(self) -> None:
        """Forget all state kept between calls (stateful methods override this)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WeightedAggregator(Aggregator):
    """An aggregator whose direction is ``d = w^T J`` for a weighting ``w`` of the rows that reads
    only ``G = J J^T`` (``gramian_only``) or nothing of ``J`` at all (fixed or loss-based weights).
    """

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        G = J @ J.T if self.gramian_only else None
        w = self.weighting(G, losses, num_tasks=J.shape[0], dtype=J.dtype, device=J.device)
        self.weights = w
        self.gramian = G
        return w @ J

    def aggregate_gramian(self, G: Tensor, losses: Tensor | None = None, *,
                          present: Tensor | Sequence[bool] | None = None,
                          check_finite: bool = True) -> Aggregation:
        """The weights from the Gramian ``G = J J^T`` (``[T, T]``) alone, for callers that never
        build ``J`` (the direction ``w^T J`` is theirs to form, e.g. block by block with
        :mod:`~torch_mtlgrad.aggregators.blocks`): an :class:`Aggregation` with ``direction=None``.

        ``G`` and the losses are validated and cast as :meth:`aggregate` does for ``J``; the call
        counts as one step of a stateful method and records ``weights`` and ``diagnostics`` just
        as :meth:`aggregate` does (the same weights as ``aggregate(J)``, up to how ``G`` was
        rounded).  Only where
        :attr:`from_gramian` is true (else ``ValueError``).  ``present`` as in :meth:`aggregate`
        (``G`` is then ``[T_present, T_present]``); ``check_finite`` as in :meth:`aggregate`
        (for ``G`` and the losses).

        Example:
            >>> from torch_mtlgrad.aggregators import get
            >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
            >>> agg = get("mgda")
            >>> torch.allclose(agg.aggregate_gramian(J @ J.T).weights, agg.aggregate(J).weights)
            True
        """
        if not self.from_gramian:
            raise ValueError(f"{self!r} reads J itself: call aggregate(J, losses)")
        G = check_gramian(G)
        T = G.shape[0]
        mask = check_present(present, T, self._known_num_tasks(), rows="G")
        if losses is None and self.needs_losses:
            raise ValueError(f"{type(self).__name__} needs the loss values: aggregate_gramian(G, losses)")
        lw = None if losses is None else check_losses(losses, T, G)
        if self._checks_finite(check_finite):
            check_finite_input(G, "G", mask)
            if lw is not None:
                check_finite_input(lw, "losses", mask)
        with _inner_calls():
            if mask is None:
                self._weights_of(G if self.gramian_only else None, lw, T, G.dtype, G.device)
            else:
                with self._present_call(mask):
                    self._weights_of(G if self.gramian_only else None, lw, T, G.dtype, G.device)
        return Aggregation(None, self.weights, self.diagnostics)

    def aggregate_losses(self, losses: Tensor | Sequence[float] | None = None, *, num_tasks: int,
                         dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                         present: Tensor | Sequence[bool] | None = None,
                         check_finite: bool = True) -> Aggregation:
        """The weights of a method that reads only the losses (:attr:`reads` is ``"losses"``),
        without any gradient: the caller then runs one backward pass of ``sum_t w_t L_t``.

        ``num_tasks`` is ``T_total``; ``losses`` (``None`` for a method that reads none) has one
        value per present task; ``present`` as in :meth:`aggregate`.  The weights are in
        :func:`work_dtype` of ``dtype`` on ``device`` (default the losses' device, else the
        CPU).  The call counts as one step of a stateful method, exactly as :meth:`aggregate`.
        Returns an :class:`Aggregation` with ``direction=None`` and ``[num_tasks]`` weights (0 at
        absent tasks).  ``ValueError`` for a method whose weights read ``G`` or ``J``.
        ``check_finite`` as in :meth:`aggregate` (for the losses).

        Example:
            >>> from torch_mtlgrad.aggregators import get
            >>> get("mean").aggregate_losses(num_tasks=3, present=[True, False, True]).weights
            tensor([0.5000, 0.0000, 0.5000])
        """
        if self.reads != "losses":
            raise ValueError(
                f"{self!r} reads {'G = J J^T' if self.reads == 'gramian' else 'J'} (reads = "
                f"{self.reads!r}), not only the losses: call aggregate(J, losses) or "
                "aggregate_gramian(G, losses)")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int (all tasks, present or not), got "
                             f"{num_tasks!r}")
        if device is None:
            device = losses.device if isinstance(losses, Tensor) else torch.device("cpu")
        like = torch.empty(0, dtype=work_dtype(dtype), device=torch.device(device))
        known = self._known_num_tasks()
        if known is not None and known != num_tasks:
            raise ValueError(f"num_tasks={num_tasks} but this aggregator has {known} tasks (its "
                             "state or per-task settings): pass num_tasks={known}")
        mask = None
        if present is not None:
            full = check_present(present, -1, _count_only=True)
            assert full is not None
            if full.numel() != num_tasks:
                raise ValueError(f"present has {full.numel()} entries but num_tasks={num_tasks}: "
                                 "pass one bool per task")
            if losses is None:
                rows = int(full.sum())
            elif isinstance(losses, Tensor):
                rows = losses.shape[0] if losses.dim() == 1 else -1
            else:
                rows = len(losses)
            mask = check_present(full, rows, num_tasks, rows="losses")
        T = num_tasks if mask is None else int(mask.sum())
        if losses is None and self.needs_losses:
            raise ValueError(f"{type(self).__name__} needs the loss values: "
                             "aggregate_losses(losses, num_tasks=...)")
        lw = None if losses is None else check_losses(losses, T, like)
        if lw is not None and self._checks_finite(check_finite):
            check_finite_input(lw, "losses", mask)
        with _inner_calls():
            if mask is None:
                self._weights_of(None, lw, T, like.dtype, like.device)
            else:
                with self._present_call(mask):
                    self._weights_of(None, lw, T, like.dtype, like.device)
        return Aggregation(None, self.weights, self.diagnostics)

    def _weights_of(self, G: Tensor | None, losses: Tensor | None, T: int, dtype: torch.dtype,
                    device: torch.device) -> None:
        self.weights = self.weighting(G, losses, num_tasks=T, dtype=dtype, device=device)

    @property
    def from_gramian(self) -> bool:
        """True: the weights read ``G`` (``gramian_only``) or nothing of ``J``."""
        return True

    @property
    def runs_on_features(self) -> bool:
        """True: ``w`` depends on ``J`` only through ``G``, and ``w^T`` applies to any matrix."""
        return True

    @abstractmethod
    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return the ``[T]`` weights (``T = num_tasks``, in ``dtype`` on ``device``).  ``G`` is
        ``J J^T`` when the class is ``gramian_only``, else ``None``: the weights then read the
        losses (or nothing).  During a call with ``present`` it sees the present tasks only."""
