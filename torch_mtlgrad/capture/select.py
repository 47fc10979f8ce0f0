"""Which capture serves a step: the mode rule, the batched pass's fallback, chunking, and the
timed choice.

The capture modes (all exact ones give the same ``J`` up to float rounding):

* ``"loop"``: one backward pass per task (:mod:`.loop`).
* ``"batched"``: one batched backward over the whole graph (:mod:`.batched`).
* ``"feature"``: per-task backward through the heads only, then one batched pass through the
  encoder; needs ``features=`` (:mod:`.feature`).
* ``"representation"``: the approximation on the features' gradients (:mod:`.representation`).
* ``"auto"``: a fixed rule, so that two runs with the same seed give the same bits.  A method
  whose weights read only the loss values (``aggregator.reads == "losses"``: sum, mean,
  constant, RLW, DWA, UW, FAMO), with no plugin, no ``diagnostics="full"`` and no gradient
  accumulation, takes the loss-only route: ``J`` is never built, one backward of
  ``sum_t w_t L_t`` gives the shared gradients (:mod:`.weighted`).  GradNorm with ``layer=``
  (``reads == "layer"``) likewise, after one small backward per task for that layer's gradient
  norms (:mod:`.layer`).  Otherwise: on a GPU
  ``"feature"`` given ``features=``, else ``"loop"``; elsewhere ``"loop"`` (the fastest or within
  noise of the fastest everywhere measured on the CPU).
* ``"timed"``: like ``"auto"`` on a GPU; elsewhere the first steps (for each T) alternate the
  loop and the batched candidate (``"feature"`` given ``features=``, else ``"batched"``), one
  untimed and two timed steps each, and keep the batched pass if its best capture time is below
  0.9 of the loop's (:class:`~.tuner.CaptureTuner`).  The modes agree to float rounding, but which
  one runs depends on timing, so two runs may differ in the last bits (as with
  ``torch.backends.cudnn.benchmark``); the choice is saved in the optimizer's ``state_dict``.

A batched pass that cannot run on a model (vmap limits) makes the step fall back to the loop with
one warning, for good.  A batched or feature step in one piece whose aggregator's direction is
``w^T J`` from the Gramian (``aggregator.from_gramian``) and that runs no plugin takes the
Gramian path: ``G`` is summed from the batched pass's per-parameter gradient blocks and
``d = w^T`` block is written per parameter (:mod:`.blocks`; the same step up to float rounding,
tested; ``J`` is built only when a non-finite value must be traced to its task).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .._stack import user_stacklevel
from .tuner import CaptureTuner

__all__ = ["CAPTURES", "CaptureSelector", "Plan", "auto_chunk_size", "available_memory"]

CAPTURES = ("auto", "timed", "loop", "batched", "feature", "representation")


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can still get, or ``None`` if unknown.

    CUDA: the device's free memory plus what PyTorch's caching allocator holds unused (no host
    synchronisation; ``None`` while a CUDA graph is being captured).  CPU: ``MemAvailable`` of
    ``/proc/meminfo`` (Linux); ``None`` elsewhere.
    """
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():  # no driver queries inside a CUDA graph
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def auto_chunk_size(num_tasks: int, numel: int, itemsize: int, available: int | None) -> int | None:
    """Tasks per batched pass so that its batched gradients fit: ``None`` (all at once) when they
    do, else the largest chunk whose estimate fits.

    The estimate per task is twice the shared gradients' bytes (``2 * numel * itemsize``: the
    batched parameter gradients plus as much again for the batched intermediate gradients), and
    the budget half of ``available``.

    Example:
        >>> auto_chunk_size(40, 1_000_000, 4, available=10**10), auto_chunk_size(40, 1_000_000, 4, 10**8)
        (None, 6)
    """
    if available is None:
        return None
    per_task = 2 * max(1, numel) * itemsize
    k = int(0.5 * available) // per_task
    return None if k >= num_tasks else max(1, k)


@dataclass(frozen=True)
class Plan:
    """The capture one step runs.

    Attributes:
        mode: ``"loop"``, ``"batched"``, ``"feature"``, ``"representation"``, ``"losses"`` (the
            loss-only route) or ``"layer"`` (GradNorm's norms at one layer, then the same).
        chunk: tasks per batched pass (``None``: all at once).
        gramian: take the Gramian path (per-parameter blocks, no ``J``).
        keep_graph: retain the graph through the capture (the user asked, a batched pass may
            need the loop to take over, or the loop may have to name a non-finite task).
        retain_graph: the user's ``retain_graph``.
        name_tasks: after a batched pass, a non-finite value is traced to its task by the loop
            on the kept graph (a batched pass spreads one task's NaN over every row).
        tuning: ``(key, mode, timed)`` when ``capture="timed"`` is still measuring.
    """

    mode: str
    chunk: int | None = None
    gramian: bool = False
    keep_graph: bool = False
    retain_graph: bool = False
    name_tasks: bool = False
    tuning: tuple[str, str, bool] | None = None


class CaptureSelector:
    """Chooses each step's :class:`Plan` and remembers what it learnt (fallback, chunk sizes,
    timed choices).

    Args:
        capture: one of :data:`CAPTURES`.
        chunk_size: tasks per batched pass, ``None`` (all at once) or ``"auto"`` (from the memory
            free when a batched pass first runs with a given T, :func:`auto_chunk_size`).
        device: the shared parameters' device.
        numel: the number of shared values ``D``.
        itemsize: bytes per value of ``J``.

    Example:
        >>> sel = CaptureSelector("batched", None, torch.device("cpu"), numel=10, itemsize=4)
        >>> sel.plan(None, 3, retain_graph=False, checked=True, gramian=True).mode
        'batched'
    """

    def __init__(self, capture: str, chunk_size: int | str | None, device: torch.device,
                 numel: int, itemsize: int) -> None:
        if capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
        if chunk_size is not None and chunk_size != "auto" and (
                isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer, 'auto' or None, got {chunk_size!r}")
        self.capture = capture
        self.chunk_size = chunk_size
        self.device = device
        self.numel, self.itemsize = numel, itemsize
        self.tuner = CaptureTuner()
        self.batched_failed = False  # a batched pass could not run on this model: the loop for good
        self.batched_proven = False  # a batched pass has run once: no graph kept for a fallback
        self._auto_chunks: dict[int, int | None] = {}

    def mode(self, features: Any, num_tasks: int | None) -> tuple[str, tuple[str, str, bool] | None]:
        """The capture mode for a step with these ``features`` and T, and the tuning it is part of."""
        mode = self.capture
        tuning = None
        cuda = self.device.type == "cuda"
        if mode == "auto" or (mode == "timed" and (cuda or not num_tasks or num_tasks < 2
                                                   or self.batched_failed)):
            mode = "feature" if features is not None and cuda else "loop"
        elif mode == "timed":
            key = self.tuner.key(num_tasks or 0, features is not None)
            mode, timed = self.tuner.mode(key)
            tuning = (key, mode, timed)
        if mode in ("feature", "representation"):
            if features is None:
                raise ValueError(f"capture={mode!r} needs the shared features: opt.backward(losses, "
                                 "features=z)")
            if not isinstance(features, torch.Tensor) or not features.requires_grad:
                raise ValueError("features must be the shared encoder's output tensor (requiring grad)")
        if mode in ("batched", "feature") and self.batched_failed:
            mode = "loop"
        return mode, tuning

    def chunk(self, num_tasks: int) -> int | None:
        """Tasks per batched pass for this T (``"auto"``: estimated once per T, then kept)."""
        if self.chunk_size != "auto":
            return self.chunk_size  # type: ignore[return-value]
        if num_tasks not in self._auto_chunks:
            self._auto_chunks[num_tasks] = auto_chunk_size(
                num_tasks, self.numel, self.itemsize, available_memory(self.device))
        return self._auto_chunks[num_tasks]

    def plan(self, features: Any, num_tasks: int, *, retain_graph: bool, checked: bool,
             gramian: bool, route: str | None = None) -> Plan:
        """The plan of one ``backward(losses)`` step.

        ``checked``: the non-finite policy looks at the values (then a batched pass keeps the graph
        so that the loop can name a culprit).  ``gramian``: the step could take the Gramian path
        (a ``from_gramian`` aggregator, no plugin, one dtype); it does when the batched pass runs
        in one piece.  ``route``: ``"losses"`` when the step needs only the loss values,
        ``"layer"`` when it needs them and the task gradients' norms at one layer (GradNorm with
        ``layer=``); with ``capture="auto"`` or ``"timed"`` the step then takes that route.
        """
        if route is not None and self.capture in ("auto", "timed"):
            return Plan(route, retain_graph=retain_graph, keep_graph=retain_graph)
        mode, tuning = self.mode(features, num_tasks)
        batched = mode in ("batched", "feature")
        chunk = self.chunk(num_tasks) if batched else None
        name_tasks = batched and checked
        keep = retain_graph or name_tasks or (batched and not self.batched_proven)
        return Plan(mode, chunk, gramian=batched and gramian and chunk is None, keep_graph=keep,
                    retain_graph=retain_graph, name_tasks=name_tasks, tuning=tuning)

    def fall_back(self, plan: Plan, err: BaseException) -> Plan:
        """A batched pass failed: the loop from now on (one warning).  Re-raises when a batched
        pass has worked before on this model (the failure is then not a vmap limit)."""
        if self.batched_proven:
            raise err
        self.batched_failed = True
        warnings.warn(f"capture={plan.mode!r} cannot run on this model ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:200]}); falling back to the per-task loop",
                      RuntimeWarning, stacklevel=user_stacklevel())
        # The loop keeps the graph where the user asked, or where the batched plan would have.
        return Plan("loop", keep_graph=plan.retain_graph or plan.name_tasks,
                    retain_graph=plan.retain_graph, tuning=plan.tuning)

    def succeeded(self, plan: Plan) -> None:
        """A batched pass ran: it is proven on this model."""
        if plan.mode in ("batched", "feature"):
            self.batched_proven = True

    def record(self, plan: Plan, seconds: float) -> None:
        """A step of ``plan`` completed (not skipped) with a capture of ``seconds``: the timed
        choice learns from it."""
        if plan.tuning is None:
            return
        key, tried, timed = plan.tuning
        if self.batched_failed:
            self.tuner.decide(key, "loop")
        else:
            self.tuner.record(key, tried, seconds, timed)
