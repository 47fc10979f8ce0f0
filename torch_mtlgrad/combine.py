"""Combine: from what a step captured to the direction of the shared parameters.

    synchronise (plugins' collectives) -> unscale (GradScaler) -> check (the non-finite policy)
      -> plugins' transform -> aggregator -> lift (representation mode) -> :class:`Outcome`

The Gramian path does the same from per-parameter gradient blocks: ``G`` from the blocks, the
check on ``G``, the weights from ``G`` (:mod:`torch_mtlgrad.aggregators.blocks`); only a
non-finite value makes it build ``J``, to name the task.  The loss-only route asks the method for
its weights before the capture (:meth:`Combiner.loss_weights`) and checks the one backward's
gradients after it.  Nothing is written here: the outcome says what the write-back stage writes.

The method is called with ``check_finite=False``: this stage has applied the non-finite policy
already (and ``nonfinite="unchecked"`` must not synchronise).

Tasks absent from a step (``None`` losses) have no row: the method runs on the present rows and
is told which tasks they are (``present=``); per-task diagnostics are scattered back to all ``T``
tasks with NaN at the absent ones, and ``diagnostics["present"]`` says which.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ._checks import NonFinitePolicy, ZeroRowWarning, all_finite, find_nonfinite, nonfinite_loss
from .aggregators import Aggregator
from .aggregators.blocks import block_matrices, block_row_norms, gramian_of_blocks
from .capture import CaptureBuffers, Captured, RowStats, jacobian_from_blocks
from .capture.captured import present_mask
from .diagnostics import gramian_step_diagnostics, step_diagnostics
from .plugins import call_hook, has_hook, plugin_diagnostics

__all__ = ["Combiner", "Outcome", "scatter_tasks"]

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What the write-back stage does with a step.

    Exactly one of: ``skip`` (the non-finite policy skipped the step: nothing is written),
    ``overflow`` (a GradScaler overflow: NaN goes into the shared ``.grad`` so that
    ``scaler.step`` skips and ``scaler.update`` lowers the scale), ``direction`` (``[D]``, times
    the GradScaler scale), ``weights`` with ``blocks`` (the Gramian path: ``d = w^T J`` is
    written parameter by parameter; under GradScaler the blocks are scaled, so is ``d``) or
    ``shared`` (the loss-only route: the one backward's gradient of each shared parameter).
    """

    skip: bool = False
    overflow: bool = False
    direction: Tensor | None = None
    weights: Tensor | None = None
    blocks: list[Tensor | None] | None = None
    diagnostics: dict[str, Tensor] | None = field(default=None)
    shared: list[Tensor | None] | None = None  # the loss-only route's shared gradients


# Per-task diagnostics and how many leading task dimensions each has (for absent tasks).
_PER_TASK = {"grad_norms": 1, "angle": 1, "cosine": 2, "param_grad_norms": 1}


def scatter_tasks(diag: dict[str, Tensor], tasks: list[int] | None, T: int) -> dict[str, Tensor]:
    """Per-task diagnostics over the present rows, placed at their tasks among all ``T`` (NaN at
    absent tasks), with ``"present"``; unchanged when every task is present.

    Example:
        >>> out = scatter_tasks({"grad_norms": torch.tensor([1.0, 2.0])}, [0, 2], 3)
        >>> out["grad_norms"].tolist(), out["present"].tolist()
        ([1.0, nan, 2.0], [True, False, True])
    """
    if tasks is None:
        return diag
    out = dict(diag)
    idx = torch.tensor(tasks, dtype=torch.long)
    for key, dims in _PER_TASK.items():
        v = diag.get(key)
        if v is None:
            continue
        full = v.new_full((T,) * dims + tuple(v.shape[dims:]), float("nan"))
        i = idx.to(v.device)
        if dims == 1:
            full[i] = v
        else:
            full[i.unsqueeze(1), i.unsqueeze(0)] = v
        out[key] = full
    out["present"] = present_mask(tasks, T)
    return out


class Combiner:
    """The combine stage of a :class:`~torch_mtlgrad.MultiTaskOptimizer`.

    Args:
        aggregator: the method.
        plugins: the plugins, in order (``synchronize`` then ``transform`` hooks).
        policy: the non-finite policy.
        zero_rows: the once-per-task warning for rows of ``J`` that are zero.
        buffers: the ``J`` buffer the Gramian path fills when it must name a non-finite task.
        scaler: a ``torch.amp.GradScaler`` or ``None``.
        diagnostics: whether to compute the step's diagnostics.
    """

    def __init__(self, aggregator: Aggregator, plugins: list[Any], policy: NonFinitePolicy,
                 zero_rows: ZeroRowWarning, buffers: CaptureBuffers, scaler: Any = None,
                 diagnostics: bool = True) -> None:
        self.aggregator, self.plugins, self.policy = aggregator, plugins, policy
        self.zero_rows, self.buffers, self.scaler = zero_rows, buffers, scaler
        self.diagnostics = diagnostics
        self._snapshot: dict[str, Any] | None = None  # the method's state before loss_weights

    @property
    def sync_plugins(self) -> list[Any]:
        """The plugins with a collective ``synchronize`` (e.g. ``distributed.JacobianAllReduce``)."""
        return [p for p in self.plugins if has_hook(p, "synchronize")]

    @property
    def scaling(self) -> bool:
        """A GradScaler is on: the captured gradients are times its scale."""
        return self.scaler is not None and self.scaler.is_enabled()

    def scale_factor(self, like: Tensor) -> Tensor:
        """GradScaler's current scale as a 0-d tensor of ``like``'s dtype and device."""
        return self.scaler.scale(torch.ones((), dtype=like.dtype, device=like.device))

    def __call__(self, captured: Captured) -> Outcome:
        self.zero_rows(captured.task_of(captured.zero_rows))
        if captured.tasks is not None:
            self._check_absent_plugins(captured)
        if captured.shared is not None:
            return self._from_losses(captured)
        if captured.blocks is not None:
            return self._from_blocks(captured)
        return self._from_jacobian(captured)

    def _check_absent_plugins(self, c: Captured) -> None:
        absent = sorted(set(range(c.num_tasks)) - set(c.tasks or ()))
        for plugin in self.plugins:
            if not getattr(plugin, "supports_absent_tasks", False):
                raise ValueError(
                    f"tasks {absent} are absent this step, and the plugin "
                    f"{type(plugin).__name__} does not support absent tasks (it reads every "
                    "task's row of J): pass every task's loss, or drop the plugin")

    def _aggregate(self, J: Tensor, values: Tensor | None, c: Captured) -> Any:
        return self.aggregator.aggregate(J, values, present=c.present(J.device), check_finite=False)

    # -- The loss-only route -------------------------------------------------------------------
    def loss_weights(self, values: Tensor, num_tasks: int, tasks: list[int] | None) -> Any:
        """The method's weights from the loss values alone (``[T]``, 0 at absent tasks) for the
        loss-only route, which takes one backward of ``sum_t w_t L_t``; the method's state is
        kept so that a step found non-finite after the backward can be undone
        (:meth:`undo_weights`)."""
        agg = self.aggregator
        present = self._keep_state(values, num_tasks, tasks)
        return agg.aggregate_losses(values, num_tasks=num_tasks, dtype=values.dtype,
                                    device=values.device, present=present, check_finite=False)

    def norm_weights(self, norms: Tensor, values: Tensor, num_tasks: int,
                     tasks: list[int] | None) -> Any:
        """GradNorm's route: the weights from the task gradients' norms at its layer and the
        losses, kept for :meth:`undo_weights` as :meth:`loss_weights` does."""
        present = self._keep_state(values, num_tasks, tasks)
        return self.aggregator.aggregate_norms(norms, values, present=present, check_finite=False)

    def _keep_state(self, values: Tensor, num_tasks: int, tasks: list[int] | None) -> Tensor | None:
        agg = self.aggregator
        # Only a checked step (or GradScaler's overflow) can undo the weights: only then keep them.
        undoable = agg.stateful and (self.policy.checked or self.scaling)
        self._snapshot = copy.deepcopy(agg.state_dict()) if undoable else None
        return present_mask(tasks, num_tasks, values.device)

    def undo_weights(self) -> None:
        """Put the method's state back as it was before :meth:`loss_weights`."""
        if self._snapshot is not None:
            self.aggregator.load_state_dict(self._snapshot)
        self._snapshot = None

    def _from_losses(self, c: Captured) -> Outcome:
        assert c.shared is not None
        if self.policy.checked or self.scaling:
            first = torch.ones((), dtype=torch.bool, device=self.buffers.layout.device)
            bad = None
            if not all_finite(first, c.values, [*c.shared, *c.grads]):
                bad = self._name_nonfinite(c)  # None: only a sum of finite values overflowed
            if bad is not None:
                self.undo_weights()
                if self.scaling:
                    log.info("GradScaler overflow: %s; the shared .grad is NaN, scaler.step() skips",
                             bad)
                    return Outcome(overflow=True)
                return Outcome(skip=self.policy.apply(bad))
        self._snapshot = None
        diag = None
        if self.diagnostics and c.diagnostics is not None:
            diag = dict(c.diagnostics)
            if c.tasks is not None:
                diag["present"] = c.present()
        return Outcome(shared=c.shared, diagnostics=diag)

    def _name_nonfinite(self, c: Captured) -> str | None:
        bad = nonfinite_loss(c.values, c.tasks)
        if bad is not None:
            return bad
        layout = self.buffers.layout
        for g, name in zip(c.shared or (), layout.names):
            if g is not None and not bool(torch.isfinite(g).all()):
                return (f"the combined gradient sum_t w_t dL_t of shared parameter {name!r} is not "
                        "finite (the loss-only route takes one backward, so the task is not known; "
                        "capture='loop' names it)")
        for i, g in enumerate(c.grads):
            if g is not None and not bool(torch.isfinite(g).all()):
                return (f"the summed task gradient of task-specific parameter {i} (shape "
                        f"{tuple(c.params[i].shape)}) is not finite")
        return None

    # -- J ---------------------------------------------------------------------------------------
    def _from_jacobian(self, c: Captured) -> Outcome:
        J = c.J
        assert J is not None
        values = None if c.values is None else c.values.to(J.dtype)
        stats = c.stats
        sync = self.sync_plugins
        if stats is not None and sync:
            stats = RowStats(stats.sq_norms, None)  # J changes in synchronize: count afresh
        for plugin in sync:  # in place, before any check: a NaN on one rank reaches all
            plugin.synchronize(J, values, c.grads, c.params)
        scale = self.scale_factor(J) if self.scaling else None
        if scale is not None:
            J.div_(scale)
        if self.policy.checked or scale is not None:
            what = c.what if c.lift is not None else None
            counts = None if stats is None else stats.nonfinite
            bad = find_nonfinite(J, values, c.grads, c.params, self.buffers.layout, what, counts,
                                 c.tasks)
            if bad is not None and scale is not None:
                log.info("GradScaler overflow: %s; the shared .grad is NaN, scaler.step() skips", bad)
                return Outcome(overflow=True)
            if bad is not None:
                if c.name_tasks is not None and not sync:
                    # A batched pass spreads one task's NaN over every row: the loop on the kept
                    # graph names the task (for the message only; the decision is made).
                    c.name_tasks(J)
                    bad = find_nonfinite(J, values, c.grads, c.params, self.buffers.layout,
                                         what, tasks=c.tasks) or bad
                return Outcome(skip=self.policy.apply(bad))
        agg = self.aggregator
        if agg.needs_losses and values is None:
            raise ValueError(f"{type(agg).__name__} reads the loss values: in a legacy loop pass them "
                             "as opt.task(t, loss=loss_t)")
        Jw = J
        for plugin in self.plugins:
            Jw = call_hook(plugin, "transform", Jw, values, default=Jw)
        result = self._aggregate(Jw, values, c)
        d = result.direction
        assert d is not None
        d_params = c.lift(d) if c.lift is not None else d
        if scale is not None:
            d_params = d_params * scale
        diag = None
        if self.diagnostics:
            diag = self._step_diagnostics(Jw, d, result, c)
            if stats is not None and stats.sq_norms is not None:
                sq = stats.sq_norms if scale is None else stats.sq_norms / scale.square()
                diag["param_grad_norms"] = sq.sqrt()
            diag = scatter_tasks(diag, c.tasks, c.num_tasks)
            diag.update(result.diagnostics)
            diag.update(plugin_diagnostics(self.plugins))
        return Outcome(direction=d_params, diagnostics=diag)

    @staticmethod
    def _step_diagnostics(J: Tensor, d: Tensor, result: Any, c: Captured) -> dict[str, Tensor]:
        """The step's diagnostics; from the method's own ``G`` and ``w`` when it formed ``G`` on
        the way and ``d = w^T J`` (``J d = G w``, ``||d||^2 = w^T G w``: no second ``J J^T``)."""
        G, w = result.gramian, result.weights
        if G is None or w is None:
            return step_diagnostics(J, d, w)
        w = c.present_rows(w)  # w covers all T tasks, G the present rows
        diag = {k: v.to(J.dtype) for k, v in gramian_step_diagnostics(G, w.to(G.dtype)).items()}
        diag["weights"] = result.weights
        return diag

    # -- Per-parameter blocks (the Gramian path) --------------------------------------------------
    def _from_blocks(self, c: Captured) -> Outcome:
        assert c.blocks is not None and c.values is not None
        T = c.values.shape[0]
        layout = self.buffers.layout
        wd = self.buffers.dtype
        mats = block_matrices(c.blocks, T, wd)
        G = gramian_of_blocks(mats, T, wd, layout.device)
        lw = c.values.to(wd)
        scale = None
        if self.scaling:
            # The blocks hold scale * gradients: G / scale^2 is the unscaled Gramian and w^T
            # blocks the scaled direction that scaler.step() unscales (both exact for the
            # power-of-two scales GradScaler uses: the same bits as the path through J).
            scale = self.scale_factor(G)
            G = G / scale.square()
        if self.policy.checked or scale is not None:
            if not all_finite(torch.isfinite(G).all(), lw, c.grads):
                # Only now is J built: the J path names the culprit, or lets GradScaler skip.
                J = self.buffers.jacobian(T)
                if c.name_tasks is not None and scale is None:
                    c.name_tasks(J)
                else:
                    jacobian_from_blocks(layout, J, c.blocks)
                return self._from_jacobian(replace(c, J=J, blocks=None, stats=None, name_tasks=None,
                                                   zero_rows=[]))
            if self.policy.checked:
                self.zero_rows(c.task_of((torch.diagonal(G) == 0).nonzero().flatten().tolist()))
        result = self.aggregator.aggregate_gramian(G, lw, present=c.present(G.device),
                                                   check_finite=False)
        w = result.weights
        assert w is not None
        w = c.present_rows(w)  # the weights of all T tasks; the blocks have the present rows
        diag = None
        if self.diagnostics:
            diag = gramian_step_diagnostics(G, w)
            norms = block_row_norms(mats, T, wd, G.device)
            diag["param_grad_norms"] = norms / scale if scale is not None else norms
            diag = scatter_tasks(diag, c.tasks, c.num_tasks)
            if result.weights is not None:
                diag["weights"] = result.weights
            diag.update(result.diagnostics)
        return Outcome(weights=w, blocks=mats, diagnostics=diag)
