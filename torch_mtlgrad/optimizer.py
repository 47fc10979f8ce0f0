"""MultiTaskOptimizer: wrap any ``torch.optim`` optimizer so that the shared parameters step along
a combination of the task gradients instead of their sum.

The facade only orchestrates; each stage of a step is one call into one module::

    opt.backward(losses)
      check      _checks.check_losses                  types, count, devices
      select     capture.CaptureSelector.plan          which capture serves the step
      capture    capture.Capturer.capture -> Captured  J, or per-parameter blocks; specific grads
      combine    combine.Combiner -> Outcome           synchronise, unscale, check, plugins, aggregate
      write      capture.SharedGrads                   d into the shared .grad (one flat buffer)
    opt.step()
      wrapped optimizer.step(), then the plugins' post_step hooks

A legacy loop (``with opt.task(t): loss_t.backward()``) captures through
:class:`~torch_mtlgrad.capture.TaskHooks` and joins the same flow at the combine stage.  The
whole picture is on the documentation's Architecture page.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import _checkpoint
from ._checks import (
    NonFiniteError,
    NonFinitePolicy,
    ZeroRowWarning,
    check_arguments,
    check_frozen,
    check_loss,
    check_losses,
    check_shared,
    nonfinite_loss,
    resolve_shared,
    warn_all_shared,
)
from ._facade import WrappedOptimizer
from ._stack import user_stacklevel
from .aggregators import Aggregator, resolve
from .aggregators.mean import Sum
from .capture import (
    Accumulation,
    CaptureBuffers,
    Captured,
    Capturer,
    CaptureSelector,
    CaptureTuner,
    FlatLayout,
    SharedGrads,
    TaskHooks,
)
from .capture.layer import layer_params
from .capture.validation import check_validation, validation_gradient
from .combine import Combiner, Outcome
from .conal.conflict import ConflictNoticing
from .plugins import call_hook, check_plugin, plugin_state

__all__ = ["MultiTaskOptimizer", "NonFiniteError"]


class MultiTaskOptimizer(WrappedOptimizer):
    """A drop-in wrapper that combines the task gradients of the shared parameters.

    With the defaults the two-line change trains exactly as ``sum(losses).backward()`` did (the
    same bits: the ``"sum"`` method on the loss-only route is that one backward); picking a method
    is the one decision left.

    Args:
        optimizer: any ``torch.optim.Optimizer`` holding all the model's trainable parameters.
        shared: the shared part: an ``nn.Module`` or an iterable of parameters.  Every other
            parameter the wrapped optimizer holds is task-specific and receives the plain sum of
            the task gradients, exactly as ``sum(losses).backward()`` gives it.  Frozen shared
            parameters (``requires_grad=False``, e.g. a pre-trained stem) are not part of ``J``
            (the others keep their names); one that is trainable must be held by the optimizer.
            A warning says so when every parameter of the optimizer is shared (``shared=`` the
            whole model instead of its encoder).
        aggregator: an :class:`~torch_mtlgrad.aggregators.Aggregator` or a short name (default
            ``"sum"``; ``"mean"``, ``"mgda"``, ``"central"``, ``"<name>+tension"``; see
            :func:`torch_mtlgrad.aggregators.available`).  Methods differ in scale: a convex
            combination (mean, MGDA, ...) steps the shared parameters about ``1/T`` as far as
            the sum; ``aggregators.scale_convention(name)`` gives each method's convention
            (``"<name>*T"`` rescales a convex one to the sum's scale).
        num_tasks: T, if known up front (else taken from the first step and then fixed).  When
            known, a legacy loop's direction is computed as soon as its last task's backward ends,
            so ``clip_grad_norm_`` between the loop and ``step()`` sees it; a legacy step whose
            direction is computed at ``step()`` (``num_tasks`` not given, or a task absent) and
            whose shared ``.grad`` were changed after the loop (by clipping) is refused with an
            error that says this.
        plugins: gradient plugins (:class:`~torch_mtlgrad.plugins.GradientPlugin`) run on ``J``
            in order before the aggregator.  A plugin may list extra tensors to differentiate
            through a ``parameters()`` method (they receive their summed gradient too).
        conflict_noticing: CoNAL's conflict noticing on these shared modules (input to output),
            run before any other plugin; see :mod:`torch_mtlgrad.conal`.
        capture: how the task gradients are captured (the exact modes give the same ``J`` up
            to float rounding; the rules in :mod:`torch_mtlgrad.capture.select`): ``"loop"`` (one
            backward per task), ``"batched"`` (one batched backward), ``"feature"`` (needs
            ``backward(losses, features=z)``: heads per task, then one batched pass through the
            encoder), ``"representation"`` (needs ``features=``; an approximation as MGDA-UB, for
            aggregators that read only the Gramian, without plugins), ``"auto"`` (default: a
            fixed rule per device, so that two runs with the same seed give the same bits; a
            method whose weights read only the losses takes one backward of ``sum_t w_t L_t``
            and never builds ``J``) or
            ``"timed"`` (off the GPU the first steps time the loop against the batched pass and
            keep the faster, :attr:`capture_choices`, saved in the ``state_dict``; two runs may
            then differ in the last bits).  :attr:`last_capture` names the mode the last step
            ran.  A batched pass that cannot run on the model falls back to the loop with one
            warning.  A batched step in one piece whose aggregator's direction is ``w^T J`` from
            the Gramian and that runs no plugin never builds ``J``.
        chunk_size: batched modes process at most this many tasks per backward pass (bounds the
            memory of the batched gradients to ``chunk_size x D``); ``None``: all at once;
            ``"auto"`` (default): all at once when the estimate of the batched pass's memory
            (twice the shared gradients' bytes per task) fits in half the memory free on the
            device when the first batched pass runs, else the largest chunk that does
            (:func:`~torch_mtlgrad.capture.auto_chunk_size`).
        nonfinite: ``"raise"`` (default): a NaN/Inf loss or task gradient is an error naming the
            task (and the first bad parameter); ``"skip"``: that step is skipped (``step()`` does
            nothing), counted in ``skipped_steps`` and logged.  Either way parameters, optimizer
            state and aggregator state are left untouched.  Both synchronise with the device to
            look.  ``"unchecked"``: no check at all (no synchronisation; non-finite values
            propagate as they would with plain ``backward()``); for when a step must stay on the
            device.
        scaler: a ``torch.amp.GradScaler``.  ``backward(losses)`` then takes the *unscaled*
            losses and scales them itself (a legacy loop runs ``scaler.scale(loss_t).backward()``
            with ``loss=loss_t``); plugins and the aggregator see the unscaled ``J`` and losses
            (``J / S`` is exact: ``S`` is a power of two), the direction is written times ``S``
            for ``scaler.step`` to unscale.  A NaN/Inf (an overflow) writes NaN into the shared
            ``.grad`` instead of applying ``nonfinite``, so ``scaler.step`` skips the step and
            ``scaler.update`` lowers the scale as without this wrapper; aggregator and plugins are
            not called that step (a loss-only method's state is put back).  Costs one host
            synchronisation per step for the check.
        diagnostics: ``True`` (default): per-step diagnostics into :attr:`diagnostics`: task
            weights, gradient norms, pairwise cosines, each gradient's angle to the direction,
            the aggregator's own (e.g. ``c`` and ``delta`` for tensioners) and each plugin's
            tensor diagnostics as ``"<PluginClass>.<name>"``, e.g.
            ``"ConflictNoticing.conflict_pstar"``; with ``opt.backward`` also
            ``param_grad_norms`` (``[T, P]``: the norm of each task's gradient of each shared
            parameter, as captured, before plugins).  Costs one more ``J J^T`` unless the
            method formed ``G`` itself (MGDA, UPGrad, the other Gramian methods).  A method whose
            weights read only the losses builds no ``J``: its diagnostics are then ``weights``
            and ``losses`` only; ``"full"`` asks for the gradient ones too (and pays for ``J``).
            ``False``: none.  With absent tasks, per-task entries have NaN at the absent ones
            and ``present`` says which.
        distributed: ``"auto"`` (default): at the first step (or before a checkpoint loads),
            when a ``torch.distributed`` process group of more than one rank is initialised and
            ``distribute()`` was not called, attach its all-reduce of ``J`` (logged once at INFO;
            DDP modules owning the parameters need no ``no_sync()``); see
            :func:`torch_mtlgrad.distributed.first_step`.  ``False``: never.  A process group, or
            the ``DistributedDataParallel`` module: use its group.
        validation_losses: for a method that meta-learns on a validation batch
            (``"autolambda"``; the registry's ``needs_validation(name)``): ``fn()`` computes
            the validation losses (one per task, ``None`` for a task without one, or their sum)
            on a batch it draws.  Each step then takes the method's look-ahead step of the
            parameters, calls ``fn()`` there, captures the gradient over the shared parameters
            (one more forward and backward) and puts the parameters back bit for bit.  Such a
            method without it raises at the first step; ``fn`` with any other method is an error.

    Absent tasks: ``opt.backward([loss_0, None, loss_2])`` (or ``present=``) combines the tasks
    present, in their places; an absent task's specific parameters get no gradient and stateful
    methods leave its state untouched.  A step where no task is present does nothing (with a
    warning).  In a legacy loop, a task whose ``task()`` block does not run is absent.

    Gradient accumulation: ``opt.backward(losses, accumulate=True)`` on every micro-batch adds
    up the task Jacobians (and loss values and task-specific gradients); the next
    ``opt.backward(losses)`` without ``accumulate``, or ``step()``, combines the sum once: one
    step on the concatenated micro-batches when each micro-batch's losses are scaled as for plain
    accumulation (a mean over the micro-batch divided by their number).  Calling
    ``opt.backward(losses)`` on every micro-batch instead sums each micro-batch's direction.

    Example:
        >>> import torch
        >>> enc = torch.nn.Linear(4, 8); heads = torch.nn.ModuleList(
        ...     [torch.nn.Linear(8, 1) for _ in range(2)])
        >>> opt = MultiTaskOptimizer(torch.optim.SGD([*enc.parameters(), *heads.parameters()],
        ...                          lr=0.1), shared=enc, aggregator="central+tension")
        >>> x = torch.randn(16, 4); ys = [torch.randn(16, 1), torch.randn(16, 1)]
        >>> opt.zero_grad()
        >>> z = enc(x)
        >>> losses = [torch.nn.functional.mse_loss(h(z), y) for h, y in zip(heads, ys)]
        >>> opt.backward(losses)
        >>> opt.step()
        >>> sorted(opt.diagnostics)[:3]
        ['angle', 'angle_base', 'c']
    """


    def __init__(
        self,
        optimizer: Optimizer,
        shared: nn.Module | Iterable[Tensor],
        aggregator: str | Aggregator = "sum",
        *,
        num_tasks: int | None = None,
        plugins: Sequence[Any] = (),
        conflict_noticing: Sequence[nn.Module] | None = None,
        capture: str = "auto",
        chunk_size: int | str | None = "auto",
        nonfinite: str = "raise",
        diagnostics: bool | str = True,
        scaler: Any = None,
        distributed: Any = "auto",
        validation_losses: Callable[[], Any] | None = None,
    ) -> None:
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError("optimizer is already a MultiTaskOptimizer")
        if not (distributed is False or (isinstance(distributed, str) and distributed == "auto") or (
                torch.distributed.is_available() and isinstance(distributed, (
                    torch.distributed.ProcessGroup, nn.parallel.DistributedDataParallel)))):
            raise ValueError("distributed must be 'auto', False, a torch.distributed process group "
                             f"or a DistributedDataParallel module, got {distributed!r}")
        check_arguments(optimizer, num_tasks, scaler)
        policy = NonFinitePolicy(nonfinite)
        if diagnostics not in (True, False, "full"):
            raise ValueError(f"diagnostics must be True, False or 'full', got {diagnostics!r}")
        params, names, frozen = resolve_shared(shared)
        layout = FlatLayout(params, names)  # validates: non-empty, no duplicates, one device
        check_shared(layout, optimizer)
        buffers = CaptureBuffers(layout)
        selector = CaptureSelector(capture, chunk_size, layout.device, layout.numel,
                                   torch.empty((), dtype=buffers.dtype).element_size())
        agg = resolve(aggregator)
        plugins = list(plugins)
        if conflict_noticing is not None:
            plugins.insert(0, ConflictNoticing(list(conflict_noticing)))
        for plugin in plugins:
            check_plugin(plugin)
        if capture == "representation":
            if not agg.runs_on_features:
                raise ValueError(f"capture='representation' needs an aggregator that reads only the "
                                 f"Gramian (or a fixed weighting); {agg!r} reads J itself")
            if plugins:
                raise ValueError("capture='representation' cannot run plugins on J (there is no J)")
        super().__init__(optimizer)
        self._layout = layout
        self.num_tasks = num_tasks
        self.diagnostics: dict[str, Tensor] = {}
        self.last_capture: str | None = None  # the capture mode the last step ran
        self._policy = policy
        self._buffers = buffers
        self._selector = selector
        self._capturer = Capturer(layout, selector, buffers)
        self._hooks = TaskHooks(layout, buffers)
        self._zero_rows = ZeroRowWarning()
        self._combine = Combiner(agg, [], policy, self._zero_rows, buffers, scaler,
                                 bool(diagnostics))
        self._full_diagnostics = diagnostics == "full"
        self._grads = SharedGrads(layout)
        self._frozen = frozen
        # GradNorm with layer=: the shared parameters of that layer, for its cheap route
        self._norm_layer = (layer_params(layout, agg.layer) if agg.reads == "layer" else None)
        self._skip = False  # the non-finite policy skipped this step: step() does nothing
        self._accumulation: Accumulation | None = None  # micro-batches added, not yet combined
        self._captured = False  # a task was captured since the last step(): not a plain backward
        self._warned_plain = False
        self._distributed, self._distributed_ready = distributed, False
        self._validation = check_validation(validation_losses, agg)
        warn_all_shared(len(self.task_specific_parameters()))
        for plugin in plugins:
            self.add_plugin(plugin)

    # -- What the wrapper is ----------------------------------------------------------------------
    @property
    def layout(self) -> FlatLayout:
        """Where each shared parameter lives in a row of ``J`` (:class:`~torch_mtlgrad.FlatLayout`)."""
        return self._layout

    @property
    def aggregator(self) -> Aggregator:
        """The method that combines the task gradients."""
        return self._combine.aggregator

    @property
    def plugins(self) -> list[Any]:
        """The gradient plugins, in the order they run (add with :meth:`add_plugin`)."""
        return self._combine.plugins

    @property
    def scaler(self) -> Any:
        """The ``torch.amp.GradScaler`` given as ``scaler=`` (or ``None``)."""
        return self._combine.scaler

    @property
    def compute_diagnostics(self) -> bool | str:
        """The ``diagnostics=`` setting (``True``, ``False`` or ``"full"``); may be switched."""
        if self._full_diagnostics:
            return "full"
        return self._combine.diagnostics

    @compute_diagnostics.setter
    def compute_diagnostics(self, value: bool | str) -> None:
        if value not in (True, False, "full"):
            raise ValueError(f"diagnostics must be True, False or 'full', got {value!r}")
        self._full_diagnostics = value == "full"
        self._combine.diagnostics = bool(value)

    @property
    def capture(self) -> str:
        """The ``capture=`` setting (:attr:`last_capture` names the mode the last step ran)."""
        return self._selector.capture

    @property
    def chunk_size(self) -> int | str | None:
        """The ``chunk_size=`` setting."""
        return self._selector.chunk_size

    @property
    def nonfinite(self) -> str:
        """The non-finite policy: ``"raise"``, ``"skip"`` or ``"unchecked"``."""
        return self._policy.mode

    @property
    def skipped_steps(self) -> int:
        """Steps skipped under ``nonfinite="skip"``."""
        return self._policy.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._policy.skipped_steps = value

    @property
    def capture_choices(self) -> dict[str, str]:
        """``capture="timed"`` off the GPU: the mode chosen by timing, per setting (T and the
        batched candidate), e.g. ``{"T=3,batched": "loop"}``; empty until a choice is made."""
        return self._selector.tuner.choices

    @property
    def jacobian(self) -> Tensor | None:
        """The last step's task Jacobian ``J`` (``[T, D]``, the work dtype), kept between steps as
        a reused buffer; ``None`` while no step has built one (the Gramian path never does).
        Plugins may have changed it in place."""
        return self._buffers.J

    def __repr__(self) -> str:
        return (f"MultiTaskOptimizer({type(self.optimizer).__name__}, aggregator={self.aggregator!r}, "
                f"shared={len(self.layout.params)} tensors / {self.layout.numel} values)")

    def add_plugin(self, plugin: Any, *, first: bool = False) -> None:
        """Add a gradient plugin (:class:`~torch_mtlgrad.plugins.GradientPlugin`) and bind it to
        the shared layout; ``first``: run it before the others (e.g. a collective that every other
        plugin must see the result of).  Add plugins before loading a checkpoint."""
        check_plugin(plugin)
        if self.capture == "representation":
            raise ValueError("capture='representation' cannot run plugins on J (there is no J)")
        call_hook(plugin, "bind", self.layout)
        if first:
            self.plugins.insert(0, plugin)
        else:
            self.plugins.append(plugin)

    def task_specific_parameters(self) -> list[Tensor]:
        """The tensors that receive the plain sum of the task gradients: every parameter the
        wrapped optimizer holds that is not shared, then those that plugins list, in order."""
        seen = {id(p) for p in self.layout.params}
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        for plugin in self.plugins:
            for p in call_hook(plugin, "parameters", default=()):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    # -- A step -------------------------------------------------------------------------------------
    def backward(self, losses: Sequence[Tensor | None] | Tensor, retain_graph: bool = False,
                 features: Tensor | None = None, *, present: Sequence[bool] | Tensor | None = None,
                 accumulate: bool = False) -> None:
        """Replace ``sum(losses).backward()``: capture each task's gradient of the shared
        parameters, combine them, and write the direction into their ``.grad``.

        Args:
            losses: one scalar loss per task (a sequence, or a 1-D tensor); ``None`` for a task
                absent from this batch.
            retain_graph: keep the graph after the step (as ``backward(retain_graph=True)``).
            features: the shared encoder's output ``z`` the heads read; enables the
                ``"feature"`` and ``"representation"`` capture modes.
            present: one bool per task, instead of ``None`` entries: ``False`` marks a task absent
                (its entry is not read).
            accumulate: add this micro-batch to an accumulated step instead of combining it; the
                next call without it (or ``step()``) combines the sum once.

        Task-specific parameters (and tensors that plugins list) get the sum of the present
        tasks' gradients, accumulated into ``.grad`` as ``backward()`` does.  Nothing is written
        when a check fails.

        Example:
            >>> enc = torch.nn.Linear(3, 4); heads = [torch.nn.Linear(4, 1) for _ in range(3)]
            >>> params = [*enc.parameters(), *(p for h in heads for p in h.parameters())]
            >>> opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), shared=enc,
            ...                          aggregator="mgda")
            >>> z = enc(torch.randn(8, 3))
            >>> opt.backward([heads[0](z).pow(2).mean(), None, heads[2](z).abs().mean()])
            >>> opt.diagnostics["weights"][1].item(), heads[1].weight.grad is None
            (0.0, True)
        """
        if not self._distributed_ready:
            self._maybe_distribute("backward")
        check_frozen(self._frozen)
        losses, tasks, T = check_losses(losses, self.num_tasks, present)
        if self._hooks.pending:
            raise RuntimeError("backward() called while a legacy task() capture is pending")
        if not isinstance(accumulate, bool):
            raise TypeError(f"accumulate must be a bool, got {type(accumulate).__name__}")
        accumulating = accumulate or self._accumulation is not None
        if accumulating and self.capture == "representation":
            raise ValueError("accumulate=True needs J of the shared parameters, which "
                             "capture='representation' never builds: use another capture mode")
        self._captured = True
        if not tasks:
            if not accumulating:
                warnings.warn(f"no task is present in this step (all {T} losses are None or "
                              "marked absent): nothing is written and step() will not step",
                              RuntimeWarning, stacklevel=user_stacklevel())
                self._skip = True
            return
        sub = None if len(tasks) == T else tasks
        combine = self._combine
        route = None
        if not accumulating and not self.plugins and not self._full_diagnostics:
            reads = self.aggregator.reads
            if reads == "losses" or (reads == "layer" and self._norm_layer is not None):
                route = reads
        plan = self._selector.plan(
            features, len(tasks), retain_graph=retain_graph, checked=self._policy.checked,
            gramian=(self.aggregator.from_gramian and not self.plugins and not accumulating
                     and self.layout.dtype is not None),
            route=route)
        values = torch.stack([loss.detach().reshape(()) for loss in losses])
        # Checked before capture (the graph survives an error) unless ranks must first agree on
        # them (a plugin's synchronize) or GradScaler must see the overflow: then in combine.  The
        # loss-only route reads the losses before its backward: always checked first.
        losses_route = plan.mode in ("losses", "layer")
        if (self._policy.checked or (losses_route and combine.scaling)) and (
                losses_route or not (combine.scaling or combine.sync_plugins)):
            bad = nonfinite_loss(values, sub)
            if bad is not None:
                if combine.scaling:
                    self._write(Outcome(overflow=True), self._grads_before())
                else:
                    self._skip = self._policy.apply(bad)
                return
        if combine.scaling and not losses_route:  # the loss-only route scales its sums
            losses = [self.scaler.scale(loss) for loss in losses]
        specific = self.task_specific_parameters()
        work = values.to(self._buffers.dtype)
        if losses_route:
            norms = None
            if plan.mode == "layer":
                assert self._norm_layer is not None
                norms = self._capturer.norms(losses, self._norm_layer)
                result = combine.norm_weights(norms, work, T, sub)
            else:
                result = combine.loss_weights(work, T, sub)
            w = result.weights
            unit = isinstance(self.aggregator, Sum)
            captured = self._capturer.weighted(plan, losses, work,
                                               None if unit else [w[t] for t in tasks], specific,
                                               self.scaler.scale if combine.scaling else None)
            full = work.new_full((T,), float("nan"))
            full[torch.tensor(tasks, device=work.device)] = work
            captured.diagnostics = {"weights": w.detach(), "losses": full, **result.diagnostics}
            captured.mode = plan.mode
        else:
            plan, captured = self._capturer.capture(plan, losses, work, features, specific,
                                                    norms=self.compute_diagnostics is not False
                                                    and not accumulating,
                                                    checked=self._policy.checked)
        captured.tasks, captured.total = sub, T
        if accumulating:
            acc = self._accumulation or Accumulation(T)
            acc.add(captured)
            self._accumulation = acc
            if accumulate:
                return
            self._accumulation = None
            captured = acc.captured()
        self.last_capture = captured.mode
        if self._finish(captured):
            self._selector.record(plan, captured.seconds)

    def _maybe_distribute(self, when: str) -> None:
        """``distributed=`` at the first step: :func:`torch_mtlgrad.distributed.first_step`."""
        from .distributed import first_step  # not at the top: distributed builds on this module

        self._distributed_ready = first_step(self, self._distributed, when)

    def _grads_before(self) -> Captured:
        """An empty capture holding the shared ``.grad`` as they are (for a write of NaN)."""
        return Captured("losses", None, [], [], [p.grad for p in self.layout.params])

    @contextmanager
    def task(self, t: int, loss: Tensor | None = None) -> Iterator[None]:
        """Route the backward passes inside this block into row ``t`` of ``J``.

        For loops that already call ``loss_t.backward()`` once per task::

            for t, loss_t in enumerate(losses):
                with opt.task(t, loss=loss_t):     # loss= only if the aggregator reads losses
                    loss_t.backward(retain_graph=t < T - 1)
            opt.step()

        Task-specific parameters accumulate their gradients as usual.  A task whose block does
        not run this step is absent.  The direction is computed when the last task's block ends
        (if ``num_tasks`` is known and every task ran) or at ``step()``; in the latter case the
        shared ``.grad`` hold the plain sum until then, and a step whose ``.grad`` were changed
        in between (``clip_grad_norm_``) is refused with an error.
        """
        if not self._distributed_ready:
            self._maybe_distribute("task")
        if loss is not None:
            check_loss(t, loss)
        if self._accumulation is not None:
            raise RuntimeError("task() called while opt.backward(..., accumulate=True) "
                               "micro-batches are pending: finish them with opt.backward(losses) "
                               "or opt.step() first")
        check_frozen(self._frozen)
        self._captured = True
        with self._hooks.task(t, loss, self.num_tasks):
            yield
        if self.num_tasks is not None and self._hooks.rows == self.num_tasks:
            self._finish_hooks()

    def _finish_hooks(self, at_step: bool = False) -> None:
        if at_step and self._hooks.touched():
            self._hooks.restore()
            raise RuntimeError(
                "the shared parameters' .grad were changed between the task() blocks and step() "
                "(e.g. by clip_grad_norm_), but they held the plain sum of the task gradients "
                "then: the direction is computed only at step() when num_tasks is not known or a "
                "task is absent. Pass num_tasks=T to MultiTaskOptimizer (then the direction is "
                "written when the last task's block ends), or use opt.backward(losses). The "
                "step's gradients of the shared parameters were dropped")
        captured = self._hooks.collect(self.num_tasks, self.task_specific_parameters(),
                                       self._policy.checked)
        self.last_capture = captured.mode
        try:
            done = self._finish(captured)
        except Exception:
            self._grads.restore(captured.prior)
            raise
        if not done:
            self._grads.restore(captured.prior)

    def _finish(self, captured: Captured) -> bool:
        """Combine and write back; returns ``False`` when the step was skipped."""
        if self._validation is not None and not self._stage_validation(captured):
            return False
        outcome = self._combine(captured)
        if outcome.skip:
            self._skip = True
            return False
        self._write(outcome, captured)
        return True

    def _stage_validation(self, captured: Captured) -> bool:
        """``validation_losses=``: the validation gradient at the method's look-ahead step, handed
        to the method for this step's call; ``False`` when the non-finite policy skips the step."""
        agg, J = self.aggregator, captured.J
        assert J is not None, "a method that needs a validation batch reads J"
        shared = None
        if agg.approximation == "unrolled":
            w = captured.present_rows(agg.current_weights(captured.num_tasks, J.dtype, J.device))
            shared = w @ J
            if captured.prior is not None and any(g is not None for g in captured.prior):
                shared = shared + self.layout.flatten(captured.prior, J.dtype)
        g, eta, value = validation_gradient(
            self._validation, agg.primary_mask(captured.num_tasks), self.layout, self.optimizer,
            J.dtype, shared=shared, specific=captured.params, specific_grads=captured.grads,
            add_grads=captured.add_grads,
            scale=self._combine.scale_factor(J) if self._combine.scaling else None)
        if self._policy.checked and not bool(torch.isfinite(g).all()) and bool(
                torch.isfinite(J).all()):
            self._skip = self._policy.apply(
                f"the gradient of the validation losses (validation_losses=) is not finite (the "
                f"validation objective is {float(value)})")
            return False
        agg.set_validation(g, eta)
        return True

    def _write(self, outcome: Outcome, captured: Captured) -> None:
        """Everything is checked and computed: only now is anything written."""
        if outcome.overflow:
            nan = torch.full((self.layout.numel,), float("nan"), dtype=self._buffers.dtype,
                             device=self.layout.device)
            self._grads.write(nan, captured.prior)
        else:
            if self.num_tasks is None:
                self.num_tasks = captured.num_tasks
            if outcome.shared is not None:
                self._grads.write_params(outcome.shared, captured.prior)
            elif outcome.direction is not None:
                self._grads.write(outcome.direction, captured.prior)
            else:
                assert outcome.weights is not None and outcome.blocks is not None
                self._grads.write_blocks(outcome.weights, outcome.blocks, captured.prior)
            if outcome.diagnostics is not None:
                self.diagnostics = {k: v.detach() for k, v in outcome.diagnostics.items()}
        SharedGrads.write_specific(captured.params, captured.grads, captured.add_grads)
        self._skip = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients and drop an unfinished legacy capture or
        accumulation."""
        self._hooks.restore()
        self._accumulation = None
        self._skip = False
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Finish a pending legacy capture or accumulation, then step the wrapped optimizer
        (unless the step was skipped for non-finite values or no task was present), then the
        plugins' ``post_step``."""
        if self._hooks.rows:
            self._finish_hooks(at_step=True)
        elif self._accumulation is not None:
            captured = self._accumulation.captured()
            self._accumulation = None
            self.last_capture = captured.mode
            self._finish(captured)
        elif not self._captured:
            self._warn_plain_backward()
        self._captured = False
        if self._skip:
            self._skip = False
            return None
        result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        for plugin in self.plugins:
            call_hook(plugin, "post_step")
        return result

    def _warn_plain_backward(self) -> None:
        """A step with gradients on the shared parameters but no captured task: most likely
        ``sum(losses).backward()`` left next to this optimizer.  Warns once."""
        if self._warned_plain:
            return
        grads = [p.grad for p in self.layout.params if p.grad is not None]
        if grads and bool(torch.stack([g.abs().sum() for g in grads]).sum() > 0):
            self._warned_plain = True
            warnings.warn(
                "step() found gradients on the shared parameters but no task was captured since "
                "the last step: was sum(losses).backward() (or loss.backward()) left in place of "
                "opt.backward(losses)? This step ran on those gradients as they are, without "
                "combining the tasks (warned once)", UserWarning, stacklevel=user_stacklevel())

    # -- Checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict plus ours under ``"mtlgrad"``: the aggregator's and
        plugins' state, T, the shared parameters' shapes and names (checked on load), and the
        ``capture="timed"`` choices."""
        sd = self.optimizer.state_dict()
        sd[_checkpoint.STATE_KEY] = _checkpoint.entry(
            self.num_tasks, self.layout, self.aggregator, [plugin_state(p) for p in self.plugins],
            self.skipped_steps, self._selector.tuner.state_dict())
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` returned; a checkpoint made with another number of tasks,
        other shared parameters or another aggregator is an error (nothing is loaded then)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if not self._distributed_ready:  # distributed='auto' attaches its plugin before loading
            self._maybe_distribute("load")
        sd = dict(state_dict)
        mine = sd.pop(_checkpoint.STATE_KEY, None)
        parts: list[tuple[Callable[[], Any], Callable[[Any], None], Any]] = [
            (self.optimizer.state_dict, self.optimizer.load_state_dict, sd)]
        if mine is not None:
            _checkpoint.check_entry(mine)
            _checkpoint.check_compatible(mine, self.layout, self.num_tasks,
                                         type(self.aggregator).__name__, len(self.plugins))
            num_tasks = mine["num_tasks"] if mine["num_tasks"] is not None else self.num_tasks
            parts += [
                (self.aggregator.state_dict, self.aggregator.load_state_dict, mine["aggregator"]),
                (lambda: [plugin_state(p) for p in self.plugins], self._load_plugins, mine["plugins"]),
                (lambda: (self.num_tasks, self.skipped_steps), self._load_counts,
                 (num_tasks, int(mine.get("skipped_steps", 0)))),
            ]
            if "capture_tuning" in mine:  # absent in older checkpoints
                tuner = CaptureTuner()
                tuner.load_state_dict(mine["capture_tuning"])  # checked before anything loads
                parts.append((lambda: self._selector.tuner, self._load_tuner, tuner))
        _checkpoint.load_all_or_nothing(parts)

    def _load_plugins(self, states: list[dict[str, Any]]) -> None:
        for plugin, st in zip(self.plugins, states):
            call_hook(plugin, "load_state_dict", st)

    def _load_counts(self, counts: tuple[int | None, int]) -> None:
        self.num_tasks, self.skipped_steps = counts

    def _load_tuner(self, tuner: CaptureTuner) -> None:
        self._selector.tuner = tuner
