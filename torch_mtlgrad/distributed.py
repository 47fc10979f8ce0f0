"""Data-parallel multi-task training on ``torch.distributed``.

With ``N`` data-parallel ranks, each rank sees its own slice of the batch and captures its own
task Jacobian ``J_r`` (``[T, D]``).  Every aggregator in this library is non-linear in ``J``, so
averaging the ranks' *directions* (what DDP's gradient all-reduce would do) is not the direction
of the averaged gradients.  The right object to share is ``J`` itself: with equal per-rank batch
sizes and mean-reduced losses,

    J = (1 / N) sum_r J_r          and          L_t = (1 / N) sum_r L_{t, r}

are exactly the Jacobian and the losses of the concatenated batch, so every rank then computes
the same direction ``d`` as one process training on the whole batch, and the replicas never
drift.  Task-specific gradients are averaged in the same collective.

:class:`JacobianAllReduce` is the gradient plugin that does it, in one bucketed ``all_reduce``
per step (``J``, the loss values and the task-specific gradients copied into one flat buffer that
is reused between steps); :func:`distribute` attaches it to a :class:`MultiTaskOptimizer`.

With ``DistributedDataParallel``
--------------------------------
The optimizer computes per-task gradients with ``torch.autograd.grad``, which never runs the
``AccumulateGrad`` nodes that DDP's reducer hooks into, so DDP does not all-reduce them; a
legacy loop (``loss_t.backward()`` per task, several backward passes per forward) *would* trigger
DDP's reducer and fail ("mark a variable ready only once").  Run the forward and the backward
passes inside ``ddp.no_sync()`` in both cases: DDP then neither prepares nor expects a
reduction, but still broadcasts the parameters at construction and the buffers (BatchNorm
statistics) at every forward::

    ddp = DistributedDataParallel(model)
    opt = MultiTaskOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1),
                             shared=ddp.module.encoder, aggregator="mgda")
    distribute(opt)                           # all-reduce J, losses, task-specific grads
    for x, ys in loader:
        opt.zero_grad()
        with ddp.no_sync():
            losses = [loss_fn(out, y) for out, y in zip(ddp(x), ys)]
            opt.backward(losses)
        opt.step()

Without DDP, build the same model on every rank from the same seed (or pass
``broadcast=True`` to :func:`distribute`, the default, which copies rank 0's parameters).

Sharded training (FSDP, DTensor parameters) is not supported yet and refused by
:func:`distribute`: FSDP expects one backward per forward and hands back gradient shards, not
per-task gradients.  The documentation's Robustness page describes the Gramian-based path that
would support it.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .aggregators import work_dtype
from .capture.layout import FlatLayout
from .optimizer import MultiTaskOptimizer

__all__ = ["JacobianAllReduce", "broadcast_parameters", "distribute", "task_specific_parameters"]

log = logging.getLogger(__name__)


def _group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) "
            "before building the distributed optimizer"
        )
    return dist.get_world_size(group)


def _work_dtype(tensors: Iterable[Tensor | None]) -> torch.dtype:
    """The aggregation's work dtype of the tensors' common dtype: float64 when any is float64,
    else float32 (bf16/fp16 are reduced in float32)."""
    common = functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None),
                              torch.float32)
    return work_dtype(common)


def task_specific_parameters(optimizer: Any) -> list[Tensor]:
    """The tensors a :class:`~torch_mtlgrad.MultiTaskOptimizer` gives the summed gradient to.

    Every parameter of the wrapped optimizer's param groups that is not shared, then the tensors
    that plugins list through a ``parameters()`` method, each once, in that order (the order is
    the same on every rank when the model is).

    Example:
        >>> from torch_mtlgrad import MultiTaskOptimizer
        >>> enc, head = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)
        >>> opt = MultiTaskOptimizer(torch.optim.SGD([*enc.parameters(), *head.parameters()],
        ...                          lr=0.1), shared=enc)
        >>> [tuple(p.shape) for p in task_specific_parameters(opt)]
        [(1, 3), (1,)]
    """
    return optimizer.task_specific_parameters()


class JacobianAllReduce:
    """Gradient plugin: average ``J``, the loss values and the task-specific gradients over the
    ranks of a process group, in one ``all_reduce`` per step.

    The result on every rank is ``J = mean_r J_r`` and ``L = mean_r L_r`` (see the module doc:
    the Jacobian and losses of the concatenated batch), so the aggregator sees identical inputs
    everywhere and, being deterministic given its state, returns the identical direction.

    Two ways in:

    * ``synchronize(J, losses, grads)`` (in place), called by the optimizer *before* its
      non-finite checks, with the task-specific gradients of the step: one collective for
      everything, and a NaN/Inf on any rank reaches every rank, so all ranks raise or skip the
      step together.
    * ``transform(J, losses)``, the plain plugin hook, for an optimizer that does not call
      ``synchronize``: averages ``J`` and (in place) the loss values in one collective;
      :func:`distribute` then averages the task-specific gradients in a step pre-hook (a second
      collective).  A non-finite gradient on one rank is caught by that rank's check before
      ``transform`` runs, so only use ``nonfinite="raise"`` there (a lone skip would leave the
      other ranks waiting in the collective).

    Exactly one of ``transform``'s or ``synchronize``'s collective runs per step: after
    ``synchronize`` the plugin remembers that the step is reduced.

    Args:
        process_group: the group to average over (default: the default group).

    Memory: the bucket is one flat buffer of ``T * D + T +`` (task-specific numel) values in
    float32 (float64 when ``J`` is), kept between steps.  A group of one rank reduces nothing.

    Example:
        >>> import os, tempfile, torch.distributed as dist
        >>> store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> plugin = JacobianAllReduce()
        >>> plugin.bind(FlatLayout([torch.zeros(2)]))
        >>> J, losses, grads = torch.ones(3, 2), torch.ones(3), [torch.ones(4), None]
        >>> plugin.synchronize(J, losses, grads)    # one rank: the average is the input
        >>> J.sum().item(), grads[1]
        (6.0, None)
        >>> dist.destroy_process_group()
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self.world_size = _group_size(process_group)
        self.numel: int | None = None
        self._bucket: Tensor | None = None
        self._reduced = False  # synchronize() already reduced this step

    def __repr__(self) -> str:
        return f"JacobianAllReduce(world_size={self.world_size})"

    # GradientPlugin -------------------------------------------------------------------------
    def bind(self, layout: FlatLayout) -> None:
        """Check that every rank has the same number of shared values ``D`` (one collective)."""
        self.numel = layout.numel
        if self.world_size == 1:
            return
        mine = torch.tensor([layout.numel, -layout.numel], dtype=torch.int64, device=layout.device)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.process_group)
        if int(mine[0]) != layout.numel or int(-mine[1]) != layout.numel:
            raise ValueError(
                f"the ranks disagree on the shared parameters: this rank has D = {layout.numel} "
                f"shared values, others between {int(-mine[1])} and {int(mine[0])}; build the same "
                "model and shared set on every rank"
            )

    def synchronize(self, J: Tensor, losses: Tensor | None, grads: list[Tensor | None],
                    params: list[Tensor] | None = None) -> None:
        """Average ``J``, ``losses`` and ``grads`` over the ranks, in place, in one collective.

        ``grads`` is the list of task-specific gradients of this step, ``params`` the tensors
        they belong to (to shape an average where this rank has ``None``).  ``None`` counts as
        zeros; an entry that is ``None`` on every rank stays ``None`` (so, e.g., Adam still skips
        that parameter), otherwise it is replaced by the average.  A NaN/Inf anywhere on any rank
        spreads to the same entries on every rank, so the optimizer's non-finite check decides
        alike everywhere.
        """
        self._reduced = True
        if self.world_size == 1:
            return
        shapes = params if params is not None else grads
        out = self._all_reduce_mean([J, losses], list(grads), list(shapes))
        grads[:] = out

    def transform(self, J: Tensor, losses: Tensor | None) -> Tensor:
        """Average ``J`` and (in place) ``losses`` over the ranks unless :meth:`synchronize`
        already did this step; returns ``J``."""
        if self._reduced:
            return J
        if self.world_size > 1:
            self._all_reduce_mean([J, losses], [], [])
        return J

    def reduce_gradients(self, params: list[Tensor]) -> None:
        """Average the ``.grad`` of ``params`` over the ranks (one collective), unless
        :meth:`synchronize` already did this step.  What :func:`distribute`'s step pre-hook runs."""
        if self._reduced:
            self._reduced = False
            return
        if self.world_size == 1 or not params:
            return
        out = self._all_reduce_mean([], [p.grad for p in params], list(params))
        for p, g in zip(params, out):
            p.grad = g

    def state_dict(self) -> dict[str, Any]:
        """Nothing is kept between steps (the bucket is a cache)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accepts only the empty state of :meth:`state_dict`."""
        if state:
            raise ValueError(f"JacobianAllReduce keeps no state, got keys {sorted(state)}")

    # The collective -----------------------------------------------------------------------------
    def _all_reduce_mean(self, dense: list[Tensor | None], optional: list[Tensor | None],
                         shapes: list[Tensor]) -> list[Tensor | None]:
        """One ``all_reduce`` of a flat bucket; averages written back.

        ``dense``: tensors present on every rank (``None`` entries skipped), averaged in place.
        ``optional``: tensors that may be ``None`` on some ranks, shaped like ``shapes``; they
        travel with a presence flag each, and the returned list holds their averages (in place
        where this rank had the tensor, new tensors of ``shapes[i]``'s dtype otherwise, ``None``
        where no rank had one).
        """
        dense_t = [t for t in dense if t is not None]
        sizes = [t.numel() for t in dense_t] + [s.numel() for s in shapes]
        total = sum(sizes) + len(optional)
        device = (dense_t[0] if dense_t else shapes[0]).device
        dtype = _work_dtype([*dense_t, *optional, *shapes])
        bucket = self._bucket
        if bucket is None or bucket.numel() < total or bucket.dtype != dtype or bucket.device != device:
            bucket = self._bucket = torch.empty(total, dtype=dtype, device=device)
        flat = bucket[:total]
        parts = list(flat.split([*sizes, len(optional)]))
        flags = parts.pop()
        for part, t in zip(parts, [*dense_t, *optional]):
            if t is None:
                part.zero_()
            else:
                part.copy_(t.detach().reshape(-1))
        for i, t in enumerate(optional):
            flags[i] = 0.0 if t is None else 1.0
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        flat.div_(self.world_size)
        with torch.no_grad():
            for part, t in zip(parts, dense_t):
                t.copy_(part.view(t.shape))
        # Reading the flags syncs with the device: only needed where this rank has no gradient.
        present = (flags > 0).tolist() if any(t is None for t in optional) else [True] * len(optional)
        out: list[Tensor | None] = []
        for part, t, s, here in zip(parts[len(dense_t):], optional, shapes, present):
            if t is not None:
                with torch.no_grad():
                    t.copy_(part.view(t.shape))
                out.append(t)
            elif here:
                out.append(part.view(s.shape).to(s.dtype, copy=True))
            else:
                out.append(None)
        return out


def broadcast_parameters(params: nn.Module | Iterable[Tensor], process_group: Any = None,
                         src: int = 0) -> None:
    """Copy rank ``src``'s parameters (and, for a module, its buffers) to every rank, in one
    collective, so the replicas start identical (what DDP does at construction).

    ``src`` is a global rank.  Example (one rank: nothing changes)::

        broadcast_parameters(model)
    """
    if isinstance(params, nn.Module):
        tensors = [*params.parameters(), *params.buffers()]
    else:
        tensors = list(params)
    if _group_size(process_group) == 1 or not tensors:
        return
    floats = [t for t in tensors if t.is_floating_point()]
    others = [t for t in tensors if not t.is_floating_point()]
    for batch in (floats, others):
        if not batch:
            continue
        dtype = _work_dtype(batch) if batch is floats else torch.int64
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in batch])
        dist.broadcast(flat, src=src, group=process_group)
        off = 0
        with torch.no_grad():
            for t in batch:
                n = t.numel()
                t.copy_(flat[off : off + n].view(t.shape))
                off += n


def _check_not_sharded(params: Iterable[Tensor]) -> None:
    """Sharded parameters (FSDP's FlatParameter, DTensor) are not supported yet: refuse them."""
    dtensor_mod = sys.modules.get("torch.distributed.tensor")  # no import: none exist otherwise
    dtensor = getattr(dtensor_mod, "DTensor", None)
    for i, p in enumerate(params):
        if (dtensor is not None and isinstance(p, dtensor)) or type(p).__name__ == "FlatParameter":
            raise NotImplementedError(
                f"parameter {i} of the optimizer is sharded ({type(p).__name__}): FSDP / DTensor "
                "training is not supported yet (FSDP expects one backward per forward, the per-task "
                "capture runs several); use DDP, or keep the shared encoder replicated"
            )


def distribute(optimizer: Any, process_group: Any = None, *, broadcast: bool = True) -> JacobianAllReduce:
    """Make a :class:`~torch_mtlgrad.MultiTaskOptimizer` data-parallel over ``process_group``.

    Inserts a :class:`JacobianAllReduce` as the first plugin (so conflict noticing and every
    other plugin see the averaged ``J``), binds it, and registers a step pre-hook that averages
    the task-specific gradients when the optimizer did not already hand them to
    ``JacobianAllReduce.synchronize``.  With ``broadcast=True`` (default) rank 0's values of all
    the optimizer's parameters are copied to every rank first.

    Call it on every rank, once, right after building the optimizer and before loading a
    checkpoint (the plugin's state is empty, but the optimizer checks the number of plugins).

    Returns the plugin.

    Example (with ``torch.distributed`` initialised on every rank)::

        opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters()), shared=model.encoder,
                                 aggregator="central+tension")
        distribute(opt)
    """
    if not isinstance(optimizer, MultiTaskOptimizer):
        raise TypeError(f"distribute() takes a MultiTaskOptimizer, got {type(optimizer).__name__}")
    if optimizer.capture == "representation":
        raise ValueError(
            "capture='representation' cannot be distributed: its encoder backward is local to each "
            "rank after aggregation; use capture='feature' (exact, and as cheap on the heads)"
        )
    if any(isinstance(p, JacobianAllReduce) for p in optimizer.plugins):
        raise ValueError("this optimizer is already distributed (it has a JacobianAllReduce plugin)")
    _check_not_sharded(p for g in optimizer.param_groups for p in g["params"])
    plugin = JacobianAllReduce(process_group)
    optimizer.add_plugin(plugin, first=True)  # binds it: every rank checks D
    if broadcast:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        seen: set[int] = set()
        unique = [p for p in params if not (id(p) in seen or seen.add(id(p)))]  # type: ignore[func-returns-value]
        broadcast_parameters(unique, process_group)

    def pre_hook(opt: Any, args: Any, kwargs: Any) -> None:
        plugin.reduce_gradients(task_specific_parameters(opt))

    optimizer.register_step_pre_hook(pre_hook)
    log.debug("distributed %r over %d ranks", optimizer, plugin.world_size)
    return plugin
