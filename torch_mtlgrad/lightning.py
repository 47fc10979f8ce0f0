"""PyTorch Lightning: :class:`~torch_mtlgrad.MultiTaskOptimizer` in a ``LightningModule`` with
manual optimisation, through Lightning's own backward path.

Lightning applies its precision plugin (autocast, and for ``precision="16-mixed"`` the
``GradScaler``), its strategy's backward hooks and ``on_before_backward`` /
``on_after_backward`` only to backward passes it runs itself, through
``LightningModule.manual_backward``.  ``opt.backward(losses)`` runs its own autograd calls and so
bypasses all of them.  This module routes each task's backward through ``manual_backward``
instead, inside ``opt.task(t)`` (the legacy-loop capture), so Lightning's path applies to every
task::

    import lightning as L
    from torch_mtlgrad import lightning as mtl_lightning

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False          # manual optimisation
            self.encoder, self.heads = ..., ...

        def configure_optimizers(self):
            base = torch.optim.Adam(self.parameters(), lr=1e-3)
            return mtl_lightning.multitask_optimizer(self, base, shared=self.encoder,
                                                     num_tasks=2, aggregator="upgrad")

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            losses = ...                                  # one scalar loss per task
            mtl_lightning.manual_backward(self, losses)   # instead of self.manual_backward(sum)
            opt.step()                                    # Lightning's step: scaler.step under 16-mixed

What each piece does:

* :func:`multitask_optimizer` builds the :class:`~torch_mtlgrad.MultiTaskOptimizer` with the
  precision plugin's ``GradScaler`` (``precision="16-mixed"``), so the task gradients, which
  ``manual_backward`` scales, are unscaled before they are combined, and the direction is
  written at the scaler's scale for Lightning's ``scaler.unscale_`` / ``scaler.step`` (an
  overflow writes NaN, so ``scaler.step`` skips the step and lowers the scale, as without this
  library).  ``num_tasks`` is required: the direction must be in ``.grad`` before Lightning's
  optimizer step unscales (and clips) them.
* :func:`manual_backward` runs ``module.manual_backward(loss_t, retain_graph=...)`` inside
  ``opt.task(t, loss=loss_t)`` for every task present (``None``: absent), then, when a task is
  absent, computes the direction at once, for the same reason.
* Checkpoints: Lightning saves ``optimizer.state_dict()`` and loads it back on resume; the
  :class:`~torch_mtlgrad.MultiTaskOptimizer`'s state dict carries the aggregator's and plugins'
  state under ``"mtlgrad"`` (checked on load), so ``ModelCheckpoint`` and
  ``Trainer.fit(ckpt_path=...)`` save and resume the multi-task state with no extra code, and the
  ``GradScaler``'s state with the precision plugin's.

The functions need ``lightning`` (``pip install "torch_mtlgrad[lightning]"``) and import it on
first use; ``import torch_mtlgrad`` and ``import torch_mtlgrad.lightning`` do not.  Not supported: automatic optimisation (Lightning
then calls one backward of the loss ``training_step`` returns), strategies that shard the
parameters (FSDP, DeepSpeed: see the robustness notes), several optimizers without naming the
one to use (pass ``optimizer=``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from .aggregators import Aggregator
from .optimizer import MultiTaskOptimizer

__all__ = ["manual_backward", "multitask_optimizer", "unwrap"]


def _lightning_module_class() -> type:
    """``lightning.pytorch.LightningModule``, imported on first use (so that this module, and
    its doctests, import without Lightning)."""
    try:
        from lightning.pytorch import LightningModule
    except ImportError as e:
        raise ImportError("torch_mtlgrad.lightning needs PyTorch Lightning: pip install lightning "
                          '(or pip install "torch_mtlgrad[lightning]")') from e
    return LightningModule


def _check_module(module: Any, what: str) -> None:
    if not isinstance(module, _lightning_module_class()):
        raise TypeError(f"{what}: module must be a lightning.pytorch.LightningModule, got "
                        f"{type(module).__name__}")
    if module.automatic_optimization:
        raise RuntimeError(f"{what} needs manual optimisation: set self.automatic_optimization = "
                           "False in the LightningModule's __init__ (with automatic optimisation "
                           "Lightning runs one backward of the summed loss)")


def unwrap(optimizer: Any) -> MultiTaskOptimizer:
    """The :class:`~torch_mtlgrad.MultiTaskOptimizer` behind ``self.optimizers()``.

    Lightning hands a ``LightningOptimizer`` around the optimizer ``configure_optimizers``
    returned; it forwards attribute reads but not writes, so the multi-task calls must go to the
    optimizer itself (:func:`manual_backward` does this).

    Example:
        >>> import torch
        >>> enc, head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)
        >>> opt = MultiTaskOptimizer(torch.optim.SGD([*enc.parameters(), *head.parameters()],
        ...                                          lr=0.1), shared=enc)
        >>> unwrap(opt) is opt
        True
    """
    try:
        from lightning.pytorch.core.optimizer import LightningOptimizer
    except ImportError:  # then it is not a LightningOptimizer
        pass
    else:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
    if not isinstance(optimizer, MultiTaskOptimizer):
        raise TypeError("expected the MultiTaskOptimizer returned by configure_optimizers "
                        f"(see multitask_optimizer), got {type(optimizer).__name__}")
    return optimizer


def multitask_optimizer(module: Any, optimizer: Optimizer, shared: nn.Module | Iterable[Tensor],
                        *, num_tasks: int, aggregator: str | Aggregator = "sum",
                        **kwargs: Any) -> MultiTaskOptimizer:
    """A :class:`~torch_mtlgrad.MultiTaskOptimizer` for ``configure_optimizers``.

    Args:
        module: the ``LightningModule`` (``self``), attached to its ``Trainer``, with
            ``automatic_optimization = False``.
        optimizer, shared, aggregator: as for :class:`~torch_mtlgrad.MultiTaskOptimizer`.
        num_tasks: T (required: the direction is then written when the last task's backward
            ends, before Lightning's optimizer step unscales or clips ``.grad``).
        **kwargs: the other :class:`~torch_mtlgrad.MultiTaskOptimizer` arguments, except
            ``scaler`` (taken from the precision plugin: ``precision="16-mixed"``'s
            ``GradScaler``, else none).
    """
    _check_module(module, "multitask_optimizer")
    if "scaler" in kwargs:
        raise TypeError("multitask_optimizer takes the GradScaler from the Trainer's precision "
                        "plugin; do not pass scaler= (choose precision= on the Trainer)")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    try:
        trainer = module.trainer
    except RuntimeError as e:
        raise RuntimeError("multitask_optimizer: the module is not attached to a Trainer; call "
                           "it from configure_optimizers") from e
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return MultiTaskOptimizer(optimizer, shared, aggregator, num_tasks=num_tasks, scaler=scaler,
                              **kwargs)


def manual_backward(module: Any, losses: Sequence[Tensor | None],
                    optimizer: Any = None) -> None:
    """The multi-task ``self.manual_backward``: every task's backward through Lightning.

    For each task ``t`` present (``losses[t]`` not ``None``), runs
    ``module.manual_backward(losses[t], retain_graph=...)`` inside ``opt.task(t, loss=losses[t])``
    (the graph is kept until the last task's backward).  When it returns, the shared parameters'
    ``.grad`` hold the combined direction (times the GradScaler's scale under ``"16-mixed"``)
    and the task-specific ones the sum of the task gradients; call ``opt.step()`` next.

    Args:
        module: the ``LightningModule`` (``self`` in ``training_step``).
        losses: one scalar loss per task, ``None`` for a task absent from the batch; as many as
            the optimizer's ``num_tasks``.
        optimizer: the optimizer to use (``self.optimizers()`` or the ``MultiTaskOptimizer``);
            default: the module's one optimizer.

    Errors (raised before any backward runs): a module in automatic optimisation, an optimizer
    that is not a ``MultiTaskOptimizer``, several optimizers and no ``optimizer=``, a number of
    losses other than ``num_tasks``, a loss that is not a scalar tensor, every loss ``None``.
    """
    _check_module(module, "manual_backward")
    if optimizer is None:
        optimizer = module.optimizers()
        if isinstance(optimizer, list):
            raise ValueError(f"the module has {len(optimizer)} optimizers: pass the multi-task "
                             "one as optimizer=")
    opt = unwrap(optimizer)
    if isinstance(losses, Tensor) or not isinstance(losses, Sequence):
        raise TypeError(f"losses must be a list of scalar tensors (None for an absent task), got "
                        f"{type(losses).__name__}")
    if opt.num_tasks is None:
        raise ValueError("the MultiTaskOptimizer needs num_tasks=T here (build it with "
                         "multitask_optimizer)")
    if len(losses) != opt.num_tasks:
        raise ValueError(f"expected {opt.num_tasks} losses (num_tasks), got {len(losses)}")
    for t, loss in enumerate(losses):
        if loss is not None and (not isinstance(loss, Tensor) or loss.numel() != 1):
            raise TypeError(f"loss of task {t} must be a scalar tensor (or None if the task is "
                            f"absent), got {type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
    present = [t for t, loss in enumerate(losses) if loss is not None]
    if not present:
        raise ValueError("every loss is None: no task is present in this batch (skip the step)")
    for t in present:
        loss = losses[t]
        assert loss is not None
        with opt.task(t, loss=loss):
            module.manual_backward(loss, retain_graph=t != present[-1])
    if len(present) < opt.num_tasks:
        # A task is absent: task() leaves the direction to step(), but Lightning's optimizer step
        # unscales (and may clip) .grad before it calls step(); combine now instead.
        opt._finish_hooks()
