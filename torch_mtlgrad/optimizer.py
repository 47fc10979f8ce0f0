"""MultiTaskOptimizer: wrap any ``torch.optim`` optimizer so that the shared parameters step along
a combination of the task gradients instead of their sum.

The flow of one step (``ARCHITECTURE.md``)::

    losses -> capture J [T, D] (per-task backward passes, or hooks in a legacy loop)
           -> plugins transform J -> aggregator J -> d -> d written into the shared .grad
           -> wrapped optimizer.step() -> plugins' post_step()

This module orchestrates; the math lives in ``aggregators/``, ``diagnostics.py`` and the plugins.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._autotune import CaptureTuner
from ._flat import FlatLayout
from ._kernels import RowStats, fill_rows_fused, triton_available
from .aggregators import Aggregator, Tensioned, WeightedAggregator, get
from .capture import (
    auto_chunk_size,
    available_memory,
    batched_shared_grads,
    capture_batched,
    capture_feature,
    capture_loop,
    encoder_vjp,
    feature_gradients,
)
from .diagnostics import gramian_step_diagnostics, step_diagnostics
from .plugins import plugin_state

__all__ = ["MultiTaskOptimizer", "NonFiniteError"]

log = logging.getLogger(__name__)

_STATE_KEY = "mtlgrad"
_CAPTURES = ("auto", "timed", "loop", "batched", "feature", "representation")
_NONFINITE = ("raise", "skip", "unchecked")


class NonFiniteError(FloatingPointError, ValueError):
    """A NaN/Inf loss or task gradient under ``nonfinite="raise"`` (names the task)."""


def _check_checkpoint(mine: Any) -> None:
    """Types of the ``"mtlgrad"`` entry of a state dict (clear errors for malformed files)."""
    if not isinstance(mine, dict):
        raise TypeError(f"checkpoint's {_STATE_KEY!r} entry must be a dict, got {type(mine).__name__}")
    missing = {"num_tasks", "shared_shapes", "aggregator_type", "aggregator", "plugins"} - set(mine)
    if missing:
        raise ValueError(f"checkpoint's {_STATE_KEY!r} entry lacks {sorted(missing)}")
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


def _resolve_shared(shared: Any) -> tuple[list[Tensor], list[str]]:
    if isinstance(shared, nn.Module):
        named = list(shared.named_parameters())
        return [p for _, p in named], [n for n, _ in named]
    if isinstance(shared, Tensor):
        return [shared], ["shared[0]"]
    try:
        params = list(shared)
    except TypeError:
        raise TypeError(
            f"shared must be an nn.Module or an iterable of parameters, got {type(shared).__name__}"
        ) from None
    return params, [f"shared[{i}]" for i in range(len(params))]


class MultiTaskOptimizer(Optimizer):
    """A drop-in wrapper that combines the task gradients of the shared parameters.

    Args:
        optimizer: any ``torch.optim.Optimizer`` holding all the model's parameters.
        shared: the shared part: an ``nn.Module`` or an iterable of parameters.  Every other
            parameter the wrapped optimizer holds is task-specific and receives the plain sum of
            the task gradients, exactly as ``sum(losses).backward()`` gives it.
        aggregator: an :class:`~torch_mtlgrad.aggregators.Aggregator` or a short name
            (``"mean"``, ``"sum"``, ``"mgda"``, ``"central"``, ``"<name>+tension"``; see
            :func:`torch_mtlgrad.aggregators.available`).
        num_tasks: T, if known up front (else taken from the first step and then fixed).  When
            known, a legacy loop's direction is computed as soon as its last task's backward ends,
            so ``clip_grad_norm_`` between the loop and ``step()`` sees it.
        plugins: gradient plugins (:class:`~torch_mtlgrad.plugins.GradientPlugin`) run on ``J``
            in order before the aggregator.  A plugin may list extra tensors to differentiate
            through a ``parameters()`` method (they receive their summed gradient too).
        conflict_noticing: CoNAL's conflict noticing on these shared modules (input to output),
            run before any other plugin; see :mod:`torch_mtlgrad.conal`.
        capture: how ``J`` is built (all exact modes give the same ``J``; see
            :mod:`torch_mtlgrad.capture`):

            * ``"loop"``: one backward pass per task.
            * ``"batched"``: one batched backward over the whole graph (vmap over tasks).
            * ``"feature"``: needs ``backward(losses, features=z)`` with ``z`` the shared encoder's
              output; per-task backward through the heads only, then one batched pass through
              the encoder.  Exact when the losses reach the shared parameters only through ``z``.
            * ``"representation"``: needs ``features=`` too.  An approximation (as MGDA-UB): the
              aggregator combines the gradients with respect to ``z`` and the encoder is
              backpropagated once with the combined gradient.  Only for aggregators that read
              just the Gramian (and their ``+tension``); plugins on ``J`` cannot run in it.
            * ``"auto"`` (default): the fastest exact mode measured for the device, chosen by a
              fixed rule so that two runs with the same seed give the same bits: on a GPU
              ``"feature"`` when ``features=`` is given, else ``"loop"`` (ResNet-18, T = 40,
              H100: the feature mode took 71-77 ms per step, the loop 200 ms); elsewhere
              ``"loop"`` (on the 2-core CPU the loop was the fastest or within noise of the
              fastest everywhere measured; ``benchmarks/RESULTS.md``).
            * ``"timed"``: like ``"auto"`` on a GPU; elsewhere the first steps (for each T)
              alternate the loop and the batched pass (``"feature"`` given ``features=``, else
              ``"batched"``), one untimed and two timed steps each, and keep the batched pass if
              its best capture time is below 0.9 of the loop's (see
              :mod:`torch_mtlgrad._autotune`).  The modes agree to float rounding, but which one
              runs depends on timing, so two runs may differ in the last bits (as with
              ``torch.backends.cudnn.benchmark``).  The choice is in :attr:`capture_choices` and
              the ``state_dict`` (a run resumed after the choice goes on with it).

            :attr:`last_capture` names the mode the last step ran.

            When a batched pass cannot run on a model (vmap limits), the step falls back to the
            loop with one warning, and stays on it.  A batched or feature step in one piece whose
            aggregator is a weighting (a :class:`~torch_mtlgrad.aggregators.WeightedAggregator`,
            ``d = w^T J``) and that runs no plugin never builds ``J``: ``G`` is summed from the
            per-parameter gradient blocks of the batched pass and ``d = w^T`` block is written
            per parameter (the same step up to float rounding, tested; ``J`` is built only when
            a non-finite value must be traced to its task).
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
            not called that step.  Costs one host synchronisation per step for the check.
        diagnostics: compute per-step diagnostics (task weights, gradient norms, pairwise cosines,
            each gradient's angle to the direction, the aggregator's own, e.g. ``c`` and
            ``delta`` for tensioners, and each plugin's tensor diagnostics as
            ``"<PluginClass>.<name>"``, e.g. ``"ConflictNoticing.conflict_pstar"``) into
            :attr:`diagnostics`.  Costs one more ``J J^T``.  With ``opt.backward`` the
            diagnostics also hold ``param_grad_norms`` (``[T, P]``: the norm of each task's
            gradient of each shared parameter, as captured, before plugins).

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

    scaler: Any = None  # torch.amp.GradScaler, see the constructor

    def __init__(
        self,
        optimizer: Optimizer,
        shared: nn.Module | Iterable[Tensor],
        aggregator: str | Aggregator = "mean",
        *,
        num_tasks: int | None = None,
        plugins: Sequence[Any] = (),
        conflict_noticing: Sequence[nn.Module] | None = None,
        capture: str = "auto",
        chunk_size: int | str | None = "auto",
        nonfinite: str = "raise",
        diagnostics: bool = True,
        scaler: Any = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError("optimizer is already a MultiTaskOptimizer")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if capture not in _CAPTURES:
            raise ValueError(f"capture must be one of {_CAPTURES}, got {capture!r}")
        if chunk_size is not None and chunk_size != "auto" and (
                isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer, 'auto' or None, got {chunk_size!r}")
        if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        if scaler is not None and not (callable(getattr(scaler, "scale", None))
                                       and callable(getattr(scaler, "is_enabled", None))):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        params, names = _resolve_shared(shared)
        layout = FlatLayout(params, names)  # validates: non-empty, no duplicates, one device
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for p, n in zip(params, names):
            if id(p) not in held:
                raise ValueError(f"shared parameter {n!r} is not held by the wrapped optimizer")
            if not p.requires_grad:
                raise ValueError(f"shared parameter {n!r} does not require grad")
        self.optimizer = optimizer
        self.layout = layout
        self.aggregator: Aggregator = self._resolve_aggregator(aggregator)
        self.plugins: list[Any] = list(plugins)
        if conflict_noticing is not None:
            from .conal import ConflictNoticing

            self.plugins.insert(0, ConflictNoticing(list(conflict_noticing)))
        for plugin in self.plugins:
            if not callable(getattr(plugin, "transform", None)):
                raise TypeError(f"plugin {plugin!r} has no transform(J, losses) method")
            bind = getattr(plugin, "bind", None)
            if callable(bind):
                bind(layout)
        self.num_tasks = num_tasks
        self.capture = capture
        self.chunk_size = chunk_size
        if capture == "representation":
            self._check_representation()
        self._batched_failed = False
        self._batched_proven = False
        self._tuner = CaptureTuner()
        self._auto_chunks: dict[int, int | None] = {}
        self._tuning: tuple[str, str, bool] | None = None
        self.last_capture: str | None = None  # the capture mode the last step ran
        self.nonfinite = nonfinite
        self.scaler = scaler
        self.compute_diagnostics = diagnostics
        self.diagnostics: dict[str, Tensor] = {}
        self.skipped_steps = 0

        # What Optimizer.__init__ would set up, minus the param groups (those are the wrapped
        # optimizer's, exposed through properties), so schedulers, scalers and hooks work.
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        self._J: Tensor | None = None  # [T, D] reused across steps
        self._stats: RowStats | None = None  # [T, P] statistics of J's rows, reused likewise
        self._stats_key: tuple[Any, ...] | None = None
        self._grad_flat: Tensor | None = None  # [D] flat .grad buffer of the shared parameters
        self._skip = False
        self._warned_zero: set[int] = set()
        # Legacy-loop capture state (between the first `task()` and the aggregation).
        self._hook_rows: dict[int, Tensor] = {}
        self._hook_losses: dict[int, Tensor] = {}
        self._hook_stash: list[Tensor | None] | None = None
        self._in_task: int | None = None

    # -- Optimizer look-alike -------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def capture_choices(self) -> dict[str, str]:
        """``capture="timed"`` off the GPU: the mode chosen by timing, per setting (T and the
        batched candidate), e.g. ``{"T=3,batched": "loop"}``; empty until a choice is made."""
        return self._tuner.choices

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"MultiTaskOptimizer({type(self.optimizer).__name__}, aggregator={self.aggregator!r}, "
                f"shared={len(self.layout.params)} tensors / {self.layout.numel} values)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a (task-specific) parameter group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)

    @staticmethod
    def _resolve_aggregator(aggregator: str | Aggregator) -> Aggregator:
        if isinstance(aggregator, Aggregator):
            return aggregator
        if isinstance(aggregator, str):
            return get(aggregator)
        raise TypeError(f"aggregator must be a name or an Aggregator, got {type(aggregator).__name__}")

    # -- Parameters --------------------------------------------------------------------------------
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
            fn = getattr(plugin, "parameters", None)
            for p in (fn() if callable(fn) else ()):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    # -- Checks ------------------------------------------------------------------------------------
    def _check_count(self, T: int) -> None:
        if self.num_tasks is not None and T != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} task losses (one per task), got {T}")

    def _check_losses(self, losses: Any) -> list[Tensor]:
        if isinstance(losses, Tensor):
            if losses.dim() != 1:
                raise ValueError(
                    f"losses as one tensor must be 1-D with one value per task, got shape "
                    f"{tuple(losses.shape)}"
                )
            losses = list(losses.unbind())
        elif isinstance(losses, dict):
            raise TypeError("losses is a dict: pass a list of scalar tensors in task order")
        elif isinstance(losses, (str, bytes)) or not isinstance(losses, Iterable):
            raise TypeError(f"losses must be a sequence of scalar tensors, got {type(losses).__name__}")
        losses = list(losses)
        if not losses:
            raise ValueError("losses is empty: pass one scalar loss per task")
        for t, loss in enumerate(losses):
            self._check_loss(t, loss)
        self._check_loss_devices(losses)
        self._check_count(len(losses))
        return losses

    @staticmethod
    def _check_loss_devices(losses: list[Tensor]) -> None:
        devices = [loss.device for loss in losses]
        if len(set(devices)) > 1:
            where = ", ".join(f"task {t}: {d}" for t, d in enumerate(devices))
            raise ValueError(f"the losses are on several devices ({where}); all must be on one device")

    @staticmethod
    def _check_loss(t: int, loss: Any) -> None:
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss of task {t} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss of task {t} is not a scalar: shape {tuple(loss.shape)}")
        if not loss.is_floating_point():
            raise TypeError(f"loss of task {t} has dtype {loss.dtype}: a loss must be a real "
                            "floating-point tensor")
        if not loss.requires_grad:
            raise ValueError(f"loss of task {t} does not require grad (was it detached?)")

    def _nonfinite(self, message: str) -> bool:
        """Apply the non-finite policy; returns True when the step is to be skipped."""
        if self.nonfinite == "raise":
            raise NonFiniteError(message + " (pass nonfinite='skip' to skip such steps)")
        self.skipped_steps += 1
        self._skip = True
        log.warning("skipping step: %s (%d skipped so far)", message, self.skipped_steps)
        return True

    # -- Capture: per-task backward passes -----------------------------------------------------
    def _buffer(self, T: int) -> Tensor:
        dtype = self._work_dtype()
        if self._J is None or self._J.shape[0] != T or self._J.dtype != dtype:
            self._J = torch.empty(T, self.layout.numel, dtype=dtype, device=self.layout.device)
        return self._J

    def _stats_buffer(self, T: int) -> RowStats | None:
        """Per-(task, parameter) NaN/Inf counts (checked modes) and squared norms (diagnostics),
        filled while J is captured (on CUDA by the fused row kernel, in the same pass).

        Off the Triton kernel the counts would cost two more passes over ``J`` and a ``[T, D]``
        temporary, so there they are not recorded: :meth:`_find_nonfinite` pre-checks the row
        sums instead (one read of ``J``) and looks closer only when one is not finite.
        """
        norms = self.compute_diagnostics
        check = (self.nonfinite != "unchecked" and self.layout.device.type == "cuda"
                 and triton_available())
        if not (check or norms):
            return None
        key = (T, self._work_dtype(), norms, check)
        if self._stats is None or self._stats_key != key:
            self._stats = RowStats.empty(len(self.layout.params), T, self._work_dtype(),
                                         self.layout.device, norms=norms, check=check)
            self._stats_key = key
        return self._stats

    def backward(self, losses: Sequence[Tensor] | Tensor, retain_graph: bool = False,
                 features: Tensor | None = None) -> None:
        """Replace ``sum(losses).backward()``: capture each task's gradient of the shared
        parameters into a row of ``J``, combine them, and write the direction into their ``.grad``.

        Args:
            losses: one scalar loss per task (a sequence, or a 1-D tensor).
            retain_graph: keep the graph after the step (as ``backward(retain_graph=True)``).
            features: the shared encoder's output ``z`` the heads read; enables the
                ``"feature"`` and ``"representation"`` capture modes.

        Task-specific parameters (and tensors that plugins list) get the sum of the task
        gradients, accumulated into ``.grad`` as ``backward()`` does.  Nothing is written when a
        check fails.
        """
        losses = self._check_losses(losses)
        if self._hook_rows or self._in_task is not None:
            raise RuntimeError("backward() called while a legacy task() capture is pending")
        mode = self._mode(features, len(losses))
        values = torch.stack([loss.detach().reshape(()) for loss in losses])
        # Checked before capture (the graph survives an error) unless ranks must first agree on
        # them (a plugin's synchronize) or GradScaler must see the overflow: then in _finish.
        scaling = self._scaling
        early = not scaling and not self._sync_plugins
        if early and self.nonfinite != "unchecked" and not bool(torch.isfinite(values).all()):
            t = int((~torch.isfinite(values)).nonzero()[0])
            self._nonfinite(f"loss of task {t} is not finite ({float(values[t])})")
            return
        if scaling:
            losses = [self.scaler.scale(loss) for loss in losses]
        specific = self.task_specific_parameters()
        prior = [p.grad for p in self.layout.params]
        if mode == "representation":
            assert features is not None
            Z, acc = feature_gradients(losses, features, specific, self._work_dtype())
            self.last_capture = mode
            Z = Z.reshape(len(losses), -1)

            def lift(dz: Tensor) -> Tensor:
                d = torch.empty(self.layout.numel, dtype=dz.dtype, device=dz.device)
                encoder_vjp(features, dz, self.layout, d, retain_graph=retain_graph)
                return d

            self._finish(Z, values, prior, lambda: self._write_specific(specific, acc), lift=lift,
                         what="the shared features", grads=acc, params=specific)
            return
        T = len(losses)
        # A batched pass spreads one task's NaN over every row of J (see docs/robustness.md);
        # checked, it keeps the graph so that the loop can name the culprit if one turns up.
        blame = mode in ("batched", "feature") and self.nonfinite != "unchecked"
        start = time.perf_counter()
        blocks = J = stats = None
        if mode in ("batched", "feature") and self._gramian_ok(T):
            got = self._try_batched(mode, lambda keep: batched_shared_grads(
                losses, self.layout, specific, features if mode == "feature" else None, keep),
                retain_graph or blame)
            if got is None:
                mode = "loop"
            else:
                blocks, acc = got
        if blocks is None:
            J = self._buffer(T)
            stats = self._stats_buffer(T)
            acc = self._capture(mode, losses, features, specific, J, retain_graph or blame, stats)
        seconds = time.perf_counter() - start

        def recapture(into: Tensor) -> None:
            capture_loop(losses, self.layout, specific, into, retain_graph=True)

        use_blame = blame and self.last_capture != "loop"
        write = lambda: self._write_specific(specific, acc)
        if blocks is not None:
            done = self._finish_gramian(blocks, values, prior, write, acc, specific,
                                        recapture if use_blame else None)
        else:
            assert J is not None
            done = self._finish(J, values, prior, write, grads=acc, params=specific, stats=stats,
                                recapture=(lambda: recapture(J)) if use_blame else None)
        if done and self._tuning is not None:  # a skipped or failed step changes no state
            key, tried, timed = self._tuning
            if self._batched_failed:
                self._tuner.decide(key, "loop")
            else:
                self._tuner.record(key, tried, seconds, timed)

    def _gramian_ok(self, num_tasks: int) -> bool:
        """Whether a batched step can skip ``J``: the aggregator's direction is ``w^T J`` with
        weights that read only the Gramian (``gramian_only``) or nothing of ``J`` (fixed or
        loss-based weightings), no plugin reads ``J``, one dtype, and the batched pass runs in
        one piece (no chunks)."""
        agg = self.aggregator
        return (isinstance(agg, WeightedAggregator) and not self.plugins
                and self.layout.dtype is not None and self._chunk(num_tasks) is None)

    def _finish_gramian(self, blocks: list[Tensor | None], values: Tensor, prior: list[Tensor | None],
                        write_specific: Callable[[], None], grads: list[Tensor | None],
                        params: list[Tensor], recapture: Callable[[Tensor], None] | None) -> bool:
        """:meth:`_finish` without ``J``: ``G`` is the sum over shared parameters of their
        ``[T, n_i]`` gradient blocks' Gramians and ``d``, per parameter, ``w^T`` times its block.

        A non-finite value (or a zero row, for the warning) is found from ``G``; only then is
        ``J`` built (from the blocks, or by the loop to name the task) and the step handed to
        :meth:`_finish`, which raises, skips or logs exactly as in the other captures.
        """
        T = values.shape[0]
        wd = self._work_dtype()
        mats = [None if g is None else g.reshape(T, -1).to(wd) for g in blocks]
        G = torch.zeros(T, T, dtype=wd, device=self.layout.device)
        for m in mats:
            if m is not None:
                G.addmm_(m, m.T)
        lw = values.to(wd)
        scaling = self._scaling
        if scaling:
            # The blocks hold scale * gradients: G / scale^2 is the unscaled Gramian and w^T
            # blocks the scaled direction that scaler.step() unscales (both exact for the
            # power-of-two scales GradScaler uses: the same bits as the path through J).
            scale = self._scale_factor(G)
            G = G / scale.square()
        if self.nonfinite != "unchecked" or scaling:
            if not self._all_finite(torch.isfinite(G).all(), lw, grads):
                J = self._buffer(T)  # _finish names the culprit, or lets GradScaler skip
                if recapture is not None and not scaling:
                    recapture(J)
                else:
                    fill_rows_fused(self.layout, J, blocks, norms=False, check=False)
                return self._finish(J, values, prior, write_specific, grads=grads, params=params)
            if self.nonfinite != "unchecked":
                for t in (torch.diagonal(G) == 0).nonzero().flatten().tolist():
                    self._warn_zero(t)
        agg = self.aggregator
        assert isinstance(agg, WeightedAggregator)
        # The weighting reads G (gramian_only) or nothing of J: G stands in for J's shape.
        w = agg.weighting(G, G if agg.gramian_only else None, lw)
        agg.weights = w
        layout = self.layout
        if self.num_tasks is None:
            self.num_tasks = T
        if layout.dtype == wd and all(g is None for g in prior):
            # Straight into the flat .grad buffer, parameter by parameter: no [D] temporary.
            buf = self._grad_buffer()
            for m, o, n in zip(mats, layout.offsets, layout.numels):
                if m is None:
                    buf[o : o + n].zero_()
                else:
                    torch.mm(w[None], m, out=buf[o : o + n][None])
            self._point_grads(buf)
        else:
            self._write_shared(torch.cat([torch.zeros(n, dtype=wd, device=G.device) if m is None
                                          else w @ m for m, n in zip(mats, layout.numels)]), prior)
        write_specific()
        self._skip = False
        if self.compute_diagnostics:
            diag = gramian_step_diagnostics(G, w)
            norms = torch.stack([torch.zeros(T, dtype=wd, device=G.device) if m is None
                                 else m.norm(dim=1) for m in mats], dim=1)
            diag["param_grad_norms"] = norms / scale if scaling else norms
            diag.update(agg.diagnostics)
            self.diagnostics = {k: v.detach() for k, v in diag.items()}
        return True

    def _mode(self, features: Tensor | None, num_tasks: int | None = None) -> str:
        """The capture the next step runs (``num_tasks``: its T; needed for the timed choice)."""
        mode = self.capture
        self._tuning = None
        cuda = self.layout.device.type == "cuda"
        if mode == "auto" or (mode == "timed" and (cuda or not num_tasks or num_tasks < 2
                                                   or self._batched_failed)):
            mode = "feature" if features is not None and cuda else "loop"
        elif mode == "timed":
            key = self._tuner.key(num_tasks or 0, features is not None)
            mode, timed = self._tuner.mode(key)
            self._tuning = (key, mode, timed)
        if mode in ("feature", "representation"):
            if features is None:
                raise ValueError(f"capture={mode!r} needs the shared features: opt.backward(losses, "
                                 "features=z)")
            if not isinstance(features, Tensor) or not features.requires_grad:
                raise ValueError("features must be the shared encoder's output tensor (requiring grad)")
        if mode in ("batched", "feature") and self._batched_failed:
            mode = "loop"
        return mode

    def _try_batched(self, mode: str, run: Callable[[bool], Any], retain_graph: bool) -> Any:
        """``run(keep_graph)`` for a batched capture; ``None`` when the batched pass cannot run on
        this model (first time only: one warning, then the loop for good)."""
        # Until a batched pass has worked once, keep the graph so the loop can take over.
        keep = retain_graph or not self._batched_proven
        try:
            out = run(keep)
        except (RuntimeError, NotImplementedError) as err:
            if self._batched_proven:
                raise
            self._batched_failed = True
            warnings.warn(f"capture={mode!r} cannot run on this model ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); falling back to the per-task loop",
                          RuntimeWarning, stacklevel=4)
            return None
        self._batched_proven = True
        self.last_capture = mode
        return out

    def _capture(self, mode: str, losses: list[Tensor], features: Tensor | None,
                 specific: list[Tensor], J: Tensor, retain_graph: bool,
                 stats: RowStats | None = None) -> list[Tensor | None]:
        if mode in ("batched", "feature"):
            chunk = self._chunk(len(losses))

            def run(keep: bool) -> list[Tensor | None]:
                if mode == "batched":
                    return capture_batched(losses, self.layout, specific, J, keep, chunk, stats)
                assert features is not None
                return capture_feature(losses, features, self.layout, specific, J, keep, chunk, stats)

            acc = self._try_batched(mode, run, retain_graph)
            if acc is not None:
                if self.nonfinite != "unchecked":
                    self._warn_zero_rows(J)
                return acc
        acc, zero_rows = capture_loop(losses, self.layout, specific, J, retain_graph, stats)
        self.last_capture = "loop"
        for t in zero_rows:
            self._warn_zero(t)
        return acc

    def _chunk(self, num_tasks: int) -> int | None:
        """Tasks per batched pass: ``chunk_size``, or for ``"auto"`` the estimate of
        :func:`~torch_mtlgrad.capture.auto_chunk_size` from the memory free when a batched pass
        first runs with this T (then kept)."""
        if self.chunk_size != "auto":
            return self.chunk_size
        if num_tasks not in self._auto_chunks:
            self._auto_chunks[num_tasks] = auto_chunk_size(
                num_tasks, self.layout.numel, torch.empty((), dtype=self._work_dtype()).element_size(),
                available_memory(self.layout.device))
        return self._auto_chunks[num_tasks]

    def _warn_zero_rows(self, J: Tensor) -> None:
        for t in (~(J != 0).any(dim=1)).nonzero().flatten().tolist():
            self._warn_zero(t)

    def _work_dtype(self) -> torch.dtype:
        return torch.float64 if self.layout.dtype == torch.float64 else torch.float32

    def _check_representation(self) -> None:
        agg = self.aggregator
        base = agg.base if isinstance(agg, Tensioned) else agg
        if not (base.gramian_only or isinstance(base, WeightedAggregator)):
            raise ValueError(f"capture='representation' needs an aggregator that reads only the Gramian "
                             f"(or a fixed weighting); {type(base).__name__} reads J itself")
        if self.plugins:
            raise ValueError("capture='representation' cannot run plugins on J (there is no J)")

    def _warn_zero(self, t: int) -> None:
        if t not in self._warned_zero:
            self._warned_zero.add(t)
            warnings.warn(f"task {t}'s loss does not depend on the shared parameters: its row of J is "
                          "zero", RuntimeWarning, stacklevel=3)

    @staticmethod
    def _write_specific(specific: list[Tensor], acc: list[Tensor | None]) -> None:
        for p, g in zip(specific, acc):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g)

    # -- Capture: legacy loops ------------------------------------------------------------------------
    @contextmanager
    def task(self, t: int, loss: Tensor | None = None) -> Iterator[None]:
        """Route the backward passes inside this block into row ``t`` of ``J``.

        For loops that already call ``loss_t.backward()`` once per task::

            for t, loss_t in enumerate(losses):
                with opt.task(t, loss=loss_t):     # loss= only if the aggregator reads losses
                    loss_t.backward(retain_graph=t < T - 1)
            opt.step()

        Task-specific parameters accumulate their gradients as usual.  The direction is computed
        when the last task's block ends (if ``num_tasks`` is known) or at ``step()``.
        """
        if self._in_task is not None:
            raise RuntimeError(f"task({t}) opened inside task({self._in_task}): blocks do not nest")
        if not isinstance(t, int) or t < 0 or (self.num_tasks is not None and t >= self.num_tasks):
            bound = f"[0, {self.num_tasks})" if self.num_tasks is not None else ">= 0"
            raise ValueError(f"task index must be an integer in {bound}, got {t!r}")
        if loss is not None:
            self._check_loss(t, loss)
        if self._hook_stash is None:
            # First task of this step: keep what .grad held, so the direction is added to it.
            self._hook_stash = [p.grad for p in self.layout.params]
            for p in self.layout.params:
                p.grad = None
        row = self._hook_rows.get(t)
        if row is None:
            dtype = self._work_dtype()
            row = torch.zeros(self.layout.numel, dtype=dtype, device=self.layout.device)
            self._hook_rows[t] = row
        views = self.layout.views(row)
        handles = [p.register_hook(self._row_hook(v)) for p, v in zip(self.layout.params, views)]
        self._in_task = t
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._in_task = None
        if loss is not None:
            self._hook_losses[t] = loss.detach().reshape(())
        if self.num_tasks is not None and len(self._hook_rows) == self.num_tasks:
            self._aggregate_hooked()

    @staticmethod
    def _row_hook(view: Tensor) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            view.add_(grad)

        return hook

    def _aggregate_hooked(self) -> None:
        rows, stash = self._hook_rows, self._hook_stash
        T = max(rows) + 1
        self._hook_rows, self._hook_stash = {}, None
        absent = [t for t in range(T) if t not in rows]
        if absent:
            self._restore(stash)
            raise ValueError(f"tasks {absent} had no task() block this step (got rows for {sorted(rows)})")
        try:
            self._check_count(T)
        except ValueError:
            self._restore(stash)
            raise
        losses = self._hook_losses
        self._hook_losses = {}
        if losses and len(losses) != T:
            self._restore(stash)
            raise ValueError(f"loss= was given for tasks {sorted(losses)} only; give it for all or none")
        J = self._buffer(T)
        for t in range(T):
            J[t].copy_(rows[t])
        self.last_capture = "task hooks"
        checked = self.nonfinite != "unchecked"
        if checked:
            self._warn_zero_rows(J)
        values = torch.stack([losses[t] for t in range(T)]).to(J.dtype) if losses else None
        assert stash is not None
        specific = self.task_specific_parameters()
        grads = [p.grad for p in specific]

        def write_specific() -> None:
            for p, g in zip(specific, grads):
                p.grad = g

        try:
            done = self._finish(J, values, stash, write_specific, grads=grads, params=specific)
        except Exception:
            self._restore(stash)
            raise
        if not done:
            self._restore(stash)

    def _restore(self, stash: list[Tensor | None] | None) -> None:
        if stash is not None:
            for p, g in zip(self.layout.params, stash):
                p.grad = g

    # -- Aggregate and write back ----------------------------------------------------------------
    def _finish(self, J: Tensor, values: Tensor | None, prior: list[Tensor | None],
                write_specific: Callable[[], None] | None,
                lift: Callable[[Tensor], Tensor] | None = None, what: str = "",
                grads: list[Tensor | None] | None = None, params: list[Tensor] | None = None,
                stats: RowStats | None = None,
                recapture: Callable[[], None] | None = None) -> bool:
        """Synchronise, check, transform, aggregate, write.  Returns False when the step is skipped.

        ``lift`` maps the aggregated direction to the shared parameters (representation mode,
        where ``J`` holds the gradients with respect to the features, described by ``what``).
        ``grads``: this step's task-specific gradients (of ``params``), for plugins'
        ``synchronize``, which may replace entries (``write_specific`` writes the list).
        ``stats``: the rows' per-parameter statistics recorded during the capture: their NaN/Inf
        counts replace a pass over ``J`` in the check (unless a plugin's ``synchronize`` changed
        ``J`` since), their norms go into the diagnostics.  ``recapture`` refills ``J`` by the
        per-task loop, to name the task of a non-finite gradient after a batched capture.
        """
        T = J.shape[0]
        if values is not None:
            values = values.to(J.dtype)
        if stats is not None and self._sync_plugins:
            stats = RowStats(stats.sq_norms, None)  # J changes in synchronize: count afresh
        self._synchronize(J, values, grads if grads is not None else [], params or [])
        scale = self._scale_factor(J) if self._scaling else None
        if scale is not None:
            J.div_(scale)
        if self.nonfinite != "unchecked" or scale is not None:
            bad = self._find_nonfinite(J, values, grads, params, lift, what,
                                       None if stats is None else stats.nonfinite)
            if bad is not None and scale is not None:
                # An overflow under GradScaler: NaN in .grad makes scaler.step() skip the step and
                # scaler.update() lower the scale, as without us.  Aggregator and plugins untouched.
                log.info("GradScaler overflow: %s; the shared .grad is NaN, scaler.step() skips", bad)
                nan = torch.full((self.layout.numel,), float("nan"), dtype=J.dtype, device=J.device)
                self._write_shared(nan, prior)
                if write_specific is not None:
                    write_specific()
                self._skip = False
                return True
            if bad is not None:
                if recapture is not None and not self._sync_plugins:
                    # J came from a batched pass: refill it by the loop (the graph was kept) to
                    # name the task.  Only for the message: the decision is already made.
                    recapture()
                    bad = self._find_nonfinite(J, values, grads, params, lift, what) or bad
                self._nonfinite(bad)
                return False
        if self.aggregator.needs_losses and values is None:
            raise ValueError(
                f"{type(self.aggregator).__name__} reads the loss values: in a legacy loop pass them "
                "as opt.task(t, loss=loss_t)"
            )
        Jw = J
        lw = values.to(J.dtype) if values is not None else None
        for plugin in self.plugins:
            Jw = plugin.transform(Jw, lw)
        d = self.aggregator(Jw, lw)
        d_params = lift(d) if lift is not None else d
        if scale is not None:
            d_params = d_params * scale
        # Everything is checked and computed: only now is anything written.
        if self.num_tasks is None:
            self.num_tasks = T
        self._write_shared(d_params, prior)
        if write_specific is not None:
            write_specific()
        self._skip = False
        if self.compute_diagnostics:
            diag = step_diagnostics(Jw, d, self.aggregator.weights)
            if stats is not None and stats.sq_norms is not None:
                sq = stats.sq_norms if scale is None else stats.sq_norms / scale.square()
                diag["param_grad_norms"] = sq.sqrt()
            diag.update(self.aggregator.diagnostics)
            for plugin in self.plugins:  # e.g. "ConflictNoticing.conflict_pstar"
                for k, v in (getattr(plugin, "diagnostics", None) or {}).items():
                    if isinstance(v, Tensor):
                        diag[f"{type(plugin).__name__}.{k}"] = v
            self.diagnostics = {k: v.detach() for k, v in diag.items()}
        return True

    def _find_nonfinite(self, J: Tensor, values: Tensor | None, grads: list[Tensor | None] | None,
                        params: list[Tensor] | None, lift: Any, what: str,
                        counts: Tensor | None = None) -> str | None:
        """The first NaN/Inf among the loss values, the rows of ``J`` and the task-specific
        gradients, described for the error; ``None`` when all are finite (one host sync).
        ``counts``: ``[T, P]`` NaN/Inf counts of ``J`` recorded during the capture (no pass
        over ``J`` then)."""
        present = [(i, g) for i, g in enumerate(grads or ()) if g is not None]
        # Without counts, a pre-check on the row sums: a NaN or Inf in a row makes its sum
        # non-finite; a finite row whose sum overflows only sends us to the exact check below.
        if self._all_finite(torch.isfinite(J.sum(dim=1)).all() if counts is None else counts.sum() == 0,
                            values, grads):
            return None
        if values is not None and not bool(torch.isfinite(values).all()):
            t = int((~torch.isfinite(values)).nonzero()[0])
            return f"loss of task {t} is not finite ({float(values[t])})"
        finite = torch.isfinite(J).all(dim=1) if counts is None else counts.sum(1) == 0
        if not bool(finite.all()):
            t = int((~finite).nonzero()[0])
            if lift is not None:
                return f"task {t} has a non-finite gradient in {what}"
            if counts is not None:
                bad = self.layout.names[int(counts[t].nonzero()[0])]
            else:
                bad = next(self.layout.names[i] for i, v in enumerate(self.layout.views(J[t]))
                           if not bool(torch.isfinite(v).all()))
            return f"task {t} has a non-finite gradient in shared parameter {bad!r}"
        i = next((i for i, g in present if not bool(torch.isfinite(g).all())), None)
        if i is None:  # the pre-check flagged an overflowing sum of finite values
            return None
        shape = tuple(params[i].shape) if params else ()
        return (f"the summed task gradient of task-specific parameter {i} (shape {shape}) is not "
                "finite")

    @staticmethod
    def _all_finite(first: Tensor, values: Tensor | None, grads: Sequence[Tensor | None] | None) -> bool:
        """``first`` (a 0-d bool: the check of ``J`` or ``G``) and finite loss values and summed
        task-specific gradients (each by its sum: a NaN/Inf makes it non-finite), in one host
        synchronisation.  A sum of finite values that overflows reads as not finite: callers then
        look closer."""
        ok = [first]
        if values is not None:
            ok.append(torch.isfinite(values).all())
        ok += [torch.isfinite(g.sum()) for g in grads or () if g is not None]
        return bool(torch.stack([o.to(first.device) for o in ok]).all())

    @property
    def _sync_plugins(self) -> list[Any]:
        """The plugins with a collective ``synchronize`` (e.g. ``distributed.JacobianAllReduce``)."""
        return [p for p in self.plugins if callable(getattr(p, "synchronize", None))]

    @property
    def _scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def _scale_factor(self, like: Tensor) -> Tensor:
        """GradScaler's current scale as a 0-d tensor of ``like``'s dtype and device."""
        return self.scaler.scale(torch.ones((), dtype=like.dtype, device=like.device))

    def _synchronize(self, J: Tensor, values: Tensor | None, grads: list[Tensor | None],
                     params: list[Tensor]) -> None:
        """Plugins' collectives (``synchronize``, e.g. ``distributed.JacobianAllReduce``), in
        place, before any check: a NaN on one rank then reaches all, and all decide alike."""
        for plugin in self._sync_plugins:
            plugin.synchronize(J, values, grads, params)

    def _write_shared(self, d: Tensor, prior: list[Tensor | None]) -> None:
        """Write ``d`` into the shared ``.grad`` as views of one flat buffer (added to what
        ``.grad`` held before this step, as ``backward()`` accumulates)."""
        layout = self.layout
        if layout.dtype is None:  # mixed dtypes: one tensor per parameter
            for p, v, g in zip(layout.params, layout.views(d), prior):
                p.grad = v.to(p.dtype).clone() if g is None else g.add_(v.to(g.dtype))
            return
        buf = self._grad_buffer()
        if all(g is None for g in prior):
            buf.copy_(d)
        else:
            views = layout.views(buf)
            ours = all(g is not None and g.data_ptr() == v.data_ptr() for g, v in zip(prior, views))
            if not ours:
                layout.fill_row(buf, [None if g is None else g.to(buf.dtype) for g in prior])
            buf.add_(d.to(buf.dtype))
        self._point_grads(buf)

    def _grad_buffer(self) -> Tensor:
        """The flat ``[D]`` buffer the shared ``.grad`` are views of (one dtype), kept across steps."""
        layout = self.layout
        buf = self._grad_flat
        if buf is None or buf.dtype != layout.dtype:
            buf = self._grad_flat = torch.zeros(layout.numel, dtype=layout.dtype, device=layout.device)
        return buf

    def _point_grads(self, buf: Tensor) -> None:
        for p, v in zip(self.layout.params, self.layout.views(buf)):
            p.grad = v

    # -- Optimizer API ------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients and drop an unfinished legacy capture."""
        self._restore(self._hook_stash)
        self._hook_rows, self._hook_losses, self._hook_stash = {}, {}, None
        self._skip = False
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Finish a pending legacy capture, then step the wrapped optimizer (unless the step was
        skipped for non-finite values), then the plugins' ``post_step``."""
        if self._hook_rows:
            self._aggregate_hooked()
        if self._skip:
            self._skip = False
            return None
        result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        for plugin in self.plugins:
            post = getattr(plugin, "post_step", None)
            if callable(post):
                post()
        return result

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict plus ours under ``"mtlgrad"``: the aggregator's and
        plugins' state, T, the shared parameters' shapes and names (checked on load), and the
        ``capture="timed"`` choices."""
        sd = self.optimizer.state_dict()
        sd[_STATE_KEY] = {
            "num_tasks": self.num_tasks,
            "shared_shapes": [tuple(s) for s in self.layout.shapes],
            "shared_names": list(self.layout.names),
            "aggregator_type": type(self.aggregator).__name__,
            "aggregator": self.aggregator.state_dict(),
            "plugins": [plugin_state(p) for p in self.plugins],
            "skipped_steps": self.skipped_steps,
            "capture_tuning": self._tuner.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` returned; a checkpoint made with another number of tasks,
        other shared parameters or another aggregator is an error (nothing is loaded then)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        sd = dict(state_dict)
        mine = sd.pop(_STATE_KEY, None)
        if mine is not None:
            _check_checkpoint(mine)
            shapes = [tuple(s) for s in mine["shared_shapes"]]
            if shapes != [tuple(s) for s in self.layout.shapes]:
                raise ValueError(
                    f"checkpoint has {len(shapes)} shared parameters with shapes {shapes[:4]}..., this "
                    f"optimizer has {len(self.layout.shapes)} with shapes "
                    f"{[tuple(s) for s in self.layout.shapes][:4]}...: different shared parameters"
                )
            names = mine.get("shared_names")  # absent in older checkpoints
            if names is not None and _named(names) and _named(self.layout.names) \
                    and list(names) != list(self.layout.names):
                diff = next(i for i, (a, b) in enumerate(zip(names, self.layout.names)) if a != b)
                raise ValueError(
                    f"checkpoint's shared parameter {diff} is {names[diff]!r}, this optimizer's is "
                    f"{self.layout.names[diff]!r}: different shared parameters (or another order)"
                )
            if mine["num_tasks"] is not None and self.num_tasks is not None and mine["num_tasks"] != self.num_tasks:
                raise ValueError(f"checkpoint was made with {mine['num_tasks']} tasks, this optimizer has "
                                 f"{self.num_tasks}")
            if mine["aggregator_type"] != type(self.aggregator).__name__:
                raise ValueError(f"checkpoint's aggregator is {mine['aggregator_type']}, this optimizer's "
                                 f"is {type(self.aggregator).__name__}")
            if len(mine["plugins"]) != len(self.plugins):
                raise ValueError(f"checkpoint has {len(mine['plugins'])} plugins, this optimizer has "
                                 f"{len(self.plugins)}")
        # All or nothing: a part that fails to load rolls the others back.
        if mine is not None and "capture_tuning" in mine:  # absent in older checkpoints
            tuner = CaptureTuner()
            tuner.load_state_dict(mine["capture_tuning"])
        else:
            tuner = self._tuner
        backup = (self.optimizer.state_dict(), self.aggregator.state_dict(),
                  [plugin_state(p) for p in self.plugins], self.num_tasks, self.skipped_steps)
        try:
            self.optimizer.load_state_dict(sd)
            if mine is not None:
                self.aggregator.load_state_dict(mine["aggregator"])
                for plugin, st in zip(self.plugins, mine["plugins"]):
                    load = getattr(plugin, "load_state_dict", None)
                    if callable(load):
                        load(st)
                if mine["num_tasks"] is not None:
                    self.num_tasks = mine["num_tasks"]
                self.skipped_steps = int(mine.get("skipped_steps", 0))
            self._tuner = tuner
        except Exception as err:
            self.optimizer.load_state_dict(backup[0])
            self.aggregator.load_state_dict(backup[1])
            for plugin, st in zip(self.plugins, backup[2]):
                load = getattr(plugin, "load_state_dict", None)
                if callable(load):
                    load(st)
            self.num_tasks, self.skipped_steps = backup[3], backup[4]
            if isinstance(err, (ValueError, TypeError)):
                raise
            raise ValueError(f"malformed checkpoint ({type(err).__name__}: {err}); nothing was "
                             "loaded") from err
