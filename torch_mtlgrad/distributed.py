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

Automatic: ``distributed="auto"``
---------------------------------
A :class:`~torch_mtlgrad.MultiTaskOptimizer` built with the default ``distributed="auto"`` does
this on its own: at its first step (or before it loads a checkpoint), when a process group of
more than one rank is initialised and :func:`distribute` was not called, it attaches the same
:class:`JacobianAllReduce` (first among the plugins) and logs it once at ``logging.INFO``
(:func:`first_step`).  It does not broadcast parameters then (the first forward has already run on
them, and they are saved for the backward); it checks once that the replicas hold the same
parameters and refuses the step if not.  ``distributed=False`` opts out; a process group uses
that group.

With ``DistributedDataParallel``
--------------------------------
The optimizer computes per-task gradients with ``torch.autograd.grad``, which never runs the
``AccumulateGrad`` nodes that DDP's reducer hooks into, so DDP reduces nothing and raises
nothing: without the all-reduce of ``J`` every rank would step on its own slice.  A legacy loop
(``loss_t.backward()`` per task, several backward passes per forward) *does* trigger DDP's
reducer after a forward outside ``no_sync()``, which fails ("mark a variable ready only once").
At its first step the optimizer finds the DDP modules that own its parameters and, after each of
their forwards outside ``no_sync()``, tells their reducer to expect no gradient (DDP otherwise
runs as usual: buffers are broadcast from rank 0 at every forward).  So the plain loop works::

    ddp = DistributedDataParallel(model)
    opt = MultiTaskOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1),
                             shared=ddp.module.encoder, aggregator="mgda")
    for x, ys in loader:
        opt.zero_grad()
        losses = [loss_fn(out, y) for out, y in zip(ddp(x), ys)]
        opt.backward(losses)
        opt.step()

and so does the same loop with the forward and ``opt.backward`` inside ``ddp.no_sync()`` (DDP
then prepares no reduction; it broadcasts buffers only at the first forward).  With
``DistributedDataParallel(static_graph=True)`` only ``opt.backward`` outside ``no_sync()`` works;
the other two are refused at the first step with the fix in the message.

Without DDP, build the same model on every rank from the same seed (or pass
``broadcast=True`` to :func:`distribute`, the default, which copies rank 0's parameters).

Equal per-rank batch sizes are assumed (each rank's losses weigh ``1 / N``).  Sharded training
(FSDP, DTensor parameters) is not supported yet and refused; the documentation's Distributed
training page explains why and the Gramian-based path that would support it.
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .aggregators import work_dtype
from .capture.layout import FlatLayout

__all__ = ["JacobianAllReduce", "broadcast_parameters", "distribute", "first_step",
           "task_specific_parameters"]

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


def _is_multitask(optimizer: Any) -> bool:
    """``isinstance(optimizer, MultiTaskOptimizer)`` without importing the optimizer's module
    (it imports this one): an instance exists only once that module is loaded."""
    cls = getattr(sys.modules.get(f"{__package__}.optimizer"), "MultiTaskOptimizer", None)
    return cls is not None and isinstance(optimizer, cls)


def _unique_params(optimizer: Any) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _check_distributable(optimizer: Any) -> None:
    if optimizer.capture == "representation":
        raise ValueError(
            "capture='representation' cannot be distributed: its encoder backward is local to each "
            "rank after aggregation; use capture='feature' (exact, and as cheap on the heads)"
        )
    _check_not_sharded(_unique_params(optimizer))


def _attach(optimizer: Any, process_group: Any) -> JacobianAllReduce:
    """Insert a bound :class:`JacobianAllReduce` first and the step pre-hook that averages the
    task-specific gradients when ``synchronize`` did not (what :func:`distribute` does)."""
    plugin = JacobianAllReduce(process_group)
    optimizer.add_plugin(plugin, first=True)  # binds it: every rank checks D

    def pre_hook(opt: Any, args: Any, kwargs: Any) -> None:
        plugin.reduce_gradients(task_specific_parameters(opt))

    optimizer.register_step_pre_hook(pre_hook)
    return plugin


def distribute(optimizer: Any, process_group: Any = None, *, broadcast: bool = True) -> JacobianAllReduce:
    """Make a :class:`~torch_mtlgrad.MultiTaskOptimizer` data-parallel over ``process_group``.

    Inserts a :class:`JacobianAllReduce` as the first plugin (so conflict noticing and every
    other plugin see the averaged ``J``), binds it, and registers a step pre-hook that averages
    the task-specific gradients when the optimizer did not already hand them to
    ``JacobianAllReduce.synchronize``.  With ``broadcast=True`` (default) rank 0's values of all
    the optimizer's parameters are copied to every rank first.

    The optimizer's default ``distributed="auto"`` does the same at its first step (without the
    broadcast, see :func:`first_step`); calling ``distribute`` is then only needed for the
    broadcast, another process group, or to be explicit.  Call it on every rank, once, right
    after building the optimizer and before loading a checkpoint (the plugin's state is empty,
    but the optimizer checks the number of plugins).

    Returns the plugin.

    Example (with ``torch.distributed`` initialised on every rank)::

        opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters()), shared=model.encoder,
                                 aggregator="central+tension")
        distribute(opt)
    """
    if not _is_multitask(optimizer):
        raise TypeError(f"distribute() takes a MultiTaskOptimizer, got {type(optimizer).__name__}")
    _check_distributable(optimizer)
    if any(isinstance(p, JacobianAllReduce) for p in optimizer.plugins):
        raise ValueError("this optimizer is already distributed (it has a JacobianAllReduce plugin)")
    plugin = _attach(optimizer, process_group)
    if broadcast:
        broadcast_parameters(_unique_params(optimizer), process_group)
    log.debug("distributed %r over %d ranks", optimizer, plugin.world_size)
    return plugin


# -- distributed="auto": what the optimizer does at its first step ------------------------------
def _ddp_class() -> Any:
    mod = sys.modules.get("torch.nn.parallel.distributed")  # no import: no DDP exists otherwise
    return getattr(mod, "DistributedDataParallel", None)


def _ddp_modules(optimizer: Any, setting: Any) -> list[nn.Module]:
    """The DistributedDataParallel modules that own any of the optimizer's parameters: the one
    given as ``distributed=``, else found among the live objects (one scan, at the first step)."""
    cls = _ddp_class()
    if cls is None:
        return []
    if isinstance(setting, cls):
        return [setting]
    mine = {id(p) for p in _unique_params(optimizer)}
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): the scan meets dead weak proxies, whose __class__ raises
        if issubclass(type(obj), cls) and any(id(p) in mine for p in obj.module.parameters()):
            found.append(obj)
    return found


def _check_replicas(optimizer: Any, process_group: Any) -> None:
    """One collective: refuse a first step whose replicas hold different parameters (each
    parameter's float64 sum and norm, compared as a max and a min over the ranks)."""
    params = [p for p in _unique_params(optimizer) if p.is_floating_point()]
    if not params:
        return
    device = params[0].device
    with torch.no_grad():
        f = torch.stack([s.to(device) for p in params
                         for s in (p.sum(dtype=torch.float64),
                                   torch.linalg.vector_norm(p, dtype=torch.float64))])
    both = torch.cat([f, -f])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=process_group)
    hi, lo = both[: f.numel()], -both[f.numel():]
    tol = 1e-6 * torch.maximum(hi.abs(), lo.abs()) + 1e-12
    bad = ((hi - lo) > tol).nonzero()
    if bad.numel():
        i = int(bad[0]) // 2
        raise RuntimeError(
            f"the replicas' parameters differ at the first step (parameter {i} of the optimizer, "
            f"shape {tuple(params[i].shape)}): the data-parallel step (distributed='auto') would "
            "keep them apart. Build the model from the same seed on every rank, wrap it in "
            "DistributedDataParallel (which copies rank 0's at construction), or call "
            "torch_mtlgrad.distributed.distribute(opt) (it broadcasts rank 0's) before the first "
            "forward; distributed=False trains each rank on its own"
        )


def _reducer_expects_gradients(ddp: Any) -> bool:
    """True after a forward outside ``no_sync()`` with autograd on: DDP's reducer then waits for
    the gradient hooks of its parameters (DDP sets ``require_forward_param_sync`` exactly then)."""
    return bool(getattr(ddp, "require_forward_param_sync", False))


def _release_reducer(ddp: Any, *args: Any) -> None:
    """A forward hook on the DDP module: after a forward outside ``no_sync()``, reset the reducer
    so that it expects no gradient hooks this iteration (the optimizer reduces ``J`` itself)."""
    if _reducer_expects_gradients(ddp):
        ddp.reducer._reset_state()


def _adopt_ddp(ddp: Any, when: str) -> None:
    """Make ``ddp``'s reducer stay out of the optimizer's backward passes, from this step on, or
    refuse a configuration DDP itself cannot run, with what to change."""
    if getattr(ddp, "static_graph", False):
        # static_graph runs an all-reduce callback at the first backward that needs the reducer
        # prepared (a forward outside no_sync) and expects exactly one backward per forward.
        if when == "task":
            raise RuntimeError(
                "DistributedDataParallel(static_graph=True) cannot run a legacy loop "
                "(several backward passes per forward): use opt.backward(losses) instead of the "
                "opt.task(t) blocks, or build DistributedDataParallel without static_graph=True")
        if not _reducer_expects_gradients(ddp) and not getattr(
                ddp, "_static_graph_delay_allreduce_enqueued", True):
            raise RuntimeError(
                "DistributedDataParallel(static_graph=True) fails in its reducer when the first "
                "forward runs inside ddp.no_sync() (an internal assert in its first backward): "
                "remove the `with ddp.no_sync():` (MultiTaskOptimizer needs none), or build "
                "DistributedDataParallel without static_graph=True")
        return  # an autograd.grad backward never triggers its hooks: nothing else to do
    if getattr(ddp, "_mtlgrad_release", None) is not None:
        return  # another optimizer on this module already did it
    if not hasattr(getattr(ddp, "reducer", None), "_reset_state"):
        if when == "task" and _reducer_expects_gradients(ddp):
            raise RuntimeError(
                "this torch's DistributedDataParallel reducer cannot be told to skip a step: run "
                "the forward and the opt.task(t) blocks inside `with ddp.no_sync():`")
        return
    if _reducer_expects_gradients(ddp):
        ddp.reducer._reset_state()  # this step's forward has already run
    ddp._mtlgrad_release = ddp.register_forward_hook(_release_reducer)


def first_step(optimizer: Any, setting: Any = "auto", when: str = "backward") -> bool:
    """What a :class:`~torch_mtlgrad.MultiTaskOptimizer`'s ``distributed=`` setting does at the
    first step (``when="backward"`` or ``"task"``, the call that starts it) and before a
    checkpoint loads (``when="load"``).  Returns ``True`` once nothing is left to do.

    * ``setting=False``: nothing.
    * Otherwise, when ``torch.distributed`` is initialised: the process group is ``setting`` if
      it is one, the group of the DistributedDataParallel module owning the optimizer's
      parameters if there is exactly one (found among the live objects, or ``setting`` itself),
      else the default group.  With more than one rank and no :class:`JacobianAllReduce` yet
      (:func:`distribute` not called), one is attached as :func:`distribute` does, without the
      broadcast, and ``logging.INFO`` says so; at the step (not at ``"load"``, when the model may
      not be loaded yet) one more collective checks that the replicas' parameters agree.
    * Once the optimizer is distributed (either way) and DDP modules own its parameters, their
      reducers are told after each forward outside ``no_sync()`` to expect no gradient (DDP's
      own all-reduce cannot serve per-task gradients, and a legacy loop's backward passes would
      make it fail); DDP's buffer broadcast still runs.  Configurations DDP itself cannot run
      (``static_graph=True`` with a legacy loop or a first forward inside ``no_sync()``) are
      refused with what to change.

    Every rank must reach its first step (the collectives above run on all of them).
    """
    if setting is False or not (dist.is_available() and dist.is_initialized()):
        return True
    ddps = _ddp_modules(optimizer, setting)
    plugin = next((p for p in optimizer.plugins if isinstance(p, JacobianAllReduce)), None)
    if plugin is None:
        if isinstance(setting, dist.ProcessGroup):
            group = setting
        elif len(ddps) == 1:
            group = ddps[0].process_group
        else:
            group = None
        if dist.get_world_size(group) == 1:
            return True
        _check_distributable(optimizer)
        plugin = _attach(optimizer, group)
        plugin.auto = True  # type: ignore[attr-defined]
        log.info(
            "MultiTaskOptimizer: a process group of %d ranks is initialised: averaging J, the "
            "losses and the task-specific gradients over them in one all_reduce per step "
            "(distributed='auto'%s); pass distributed=False to opt out", plugin.world_size,
            ", DistributedDataParallel's reducer set aside" if ddps else "")
    if when == "load":
        return False
    if getattr(plugin, "auto", False):
        _check_replicas(optimizer, plugin.process_group)
    for ddp in ddps:
        _adopt_ddp(ddp, when)
    return True
