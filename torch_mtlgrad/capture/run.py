"""Run the capture a :class:`~.select.Plan` names and hand back one :class:`~.captured.Captured`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._kernels import RowStats, triton_available
from .batched import capture_batched
from .blocks import batched_shared_grads
from .captured import CaptureBuffers, Captured, zero_rows
from .compiled import DonatedBufferError, through_compiled
from .feature import capture_feature, feature_gradients
from .layer import layer_norms
from .layout import FlatLayout
from .loop import capture_loop
from .representation import encoder_vjp
from .select import CaptureSelector, Plan
from .weighted import capture_weighted

__all__ = ["Capturer"]


class Capturer:
    """Captures one step's task gradients of the shared parameters.

    Args:
        layout: the shared parameters' flat layout.
        selector: the plan's selector (told when a batched pass runs or cannot run).
        buffers: where ``J`` and its row statistics are written (reused across steps).
    """

    def __init__(self, layout: FlatLayout, selector: CaptureSelector, buffers: CaptureBuffers) -> None:
        self.layout, self.selector, self.buffers = layout, selector, buffers

    def capture(self, plan: Plan, losses: Sequence[Tensor], values: Tensor, features: Tensor | None,
                specific: list[Tensor], *, norms: bool, checked: bool) -> tuple[Plan, Captured]:
        """Run ``plan`` (falling back to the loop when a batched pass cannot run on the model);
        returns the plan that ran and what it captured.

        ``values``: the detached loss values; ``norms``: record per-parameter row norms (for the
        diagnostics); ``checked``: the non-finite policy will look at ``J`` (then the row kernel
        counts NaN/Inf on CUDA, and zero rows are found for the warning).
        """
        prior = [p.grad for p in self.layout.params]
        if plan.mode == "representation":
            assert features is not None
            Z, acc = feature_gradients(losses, features, specific, self.buffers.dtype)
            Z = Z.reshape(len(losses), -1)

            def lift(dz: Tensor) -> Tensor:
                d = torch.empty(self.layout.numel, dtype=dz.dtype, device=dz.device)
                encoder_vjp(features, dz, self.layout, d, retain_graph=plan.retain_graph)
                return d

            return plan, Captured("representation", values, specific, acc, prior, J=Z, lift=lift,
                                  what="the shared features")
        start = time.perf_counter()
        out: Captured | None = None
        if plan.mode in ("batched", "feature"):
            try:
                out = self._batched(plan, losses, values, features, specific, prior, norms, checked)
            except DonatedBufferError:  # not a vmap limit: the loop cannot run either
                raise
            except (RuntimeError, NotImplementedError) as err:
                plan = self.selector.fall_back(plan, err)
            else:
                self.selector.succeeded(plan)
        if out is None:
            out = self._loop(plan, losses, values, specific, prior, norms, checked)
        out.seconds = time.perf_counter() - start
        return plan, out

    def weighted(self, plan: Plan, losses: Sequence[Tensor], values: Tensor,
                 weights: Sequence[Tensor] | None, specific: list[Tensor],
                 scale: Callable[[Tensor], Tensor] | None = None) -> Captured:
        """The loss-only route: one backward of ``sum_t weights[t] * losses[t]`` (``None``: unit
        weights) for the shared parameters, the plain sum for the task-specific ones; no ``J``
        (``scale``: GradScaler's, applied to the sums)."""
        prior = [p.grad for p in self.layout.params]
        start = time.perf_counter()
        shared, grads = through_compiled(capture_weighted)(losses, weights, self.layout, specific,
                                                           plan.retain_graph, scale)
        return Captured("losses", values, specific, grads, prior, shared=shared,
                        seconds=time.perf_counter() - start)

    def norms(self, losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """Each task's gradient norm over ``params`` (one layer), for GradNorm's route."""
        return through_compiled(layer_norms)(losses, params, self.buffers.dtype)

    def _stats(self, T: int, norms: bool, checked: bool) -> RowStats | None:
        # Off the Triton kernel NaN/Inf counts would cost extra passes over J: the check stage
        # pre-checks the row sums instead.
        counts = checked and self.layout.device.type == "cuda" and triton_available()
        return self.buffers.row_stats(T, norms=norms, check=counts)

    def _loop(self, plan: Plan, losses: Sequence[Tensor], values: Tensor, specific: list[Tensor],
              prior: list[Tensor | None], norms: bool, checked: bool) -> Captured:
        T = len(losses)
        J = self.buffers.jacobian(T)
        stats = self._stats(T, norms, checked)
        acc, zeros = capture_loop(losses, self.layout, specific, J, plan.keep_graph, stats)
        if checked:  # a row of zeros (0 * loss) as well as one no loss reaches
            zeros = zero_rows(J)
        return Captured("loop", values, specific, acc, prior, J=J, stats=stats, zero_rows=zeros)

    def _batched(self, plan: Plan, losses: Sequence[Tensor], values: Tensor, features: Tensor | None,
                 specific: list[Tensor], prior: list[Tensor | None], norms: bool,
                 checked: bool) -> Captured:
        T = len(losses)
        feats = features if plan.mode == "feature" else None
        name_tasks = None
        if plan.name_tasks:
            def name_tasks(J: Tensor) -> None:
                capture_loop(losses, self.layout, specific, J, retain_graph=True)

        if plan.gramian:
            blocks, acc = batched_shared_grads(losses, self.layout, specific, feats, plan.keep_graph)
            return Captured(plan.mode, values, specific, acc, prior, blocks=blocks,
                            name_tasks=name_tasks)
        J = self.buffers.jacobian(T)
        stats = self._stats(T, norms, checked)
        if feats is None:
            acc = capture_batched(losses, self.layout, specific, J, plan.keep_graph, plan.chunk, stats)
        else:
            acc = capture_feature(losses, feats, self.layout, specific, J, plan.keep_graph,
                                  plan.chunk, stats)
        zeros = zero_rows(J) if checked else []
        return Captured(plan.mode, values, specific, acc, prior, J=J, stats=stats,
                        zero_rows=zeros, name_tasks=name_tasks)
