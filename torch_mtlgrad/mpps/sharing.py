"""The :class:`MPPS` module: progressive parameter sharing attached to a backbone.

Shi et al., *Deep Multitask Learning with Progressive Parameter Sharing* (ICCV 2023).
:class:`MPPS` puts forward hooks on chosen layers of a shared backbone (default: its last 6
``Conv2d``/``Linear`` layers) and multiplies their output channels (Conv) or output features
(Linear) by a mask drawn for the task whose forward is running.  One training step::

    losses = mpps.losses(lambda t: loss_fn[t](heads[t](backbone(x)), y[t]))   # T masked forwards
    opt.backward(losses)          # MultiTaskOptimizer, any aggregator; or sum(losses).backward()
    opt.step()
    ...
    mpps.end_epoch()              # once per epoch: scheduler + target update (Algorithm 1)

``losses[t]`` is eq. (3) for task ``t``: its loss under its mask, plus ``beta`` times the
closed-form ``KL(q_t || p_t)``, plus (Bernoulli) a REINFORCE surrogate whose *value* is zero and
whose *gradient* is the score-function estimate of ``d E_m[L_t] / d phi[:, t]``.

This file holds the configuration, the parameters and buffers and the saved state; the rest of
the module comes from three parts: the hooks and the contexts that draw the masks
(:mod:`~torch_mtlgrad.mpps.hooks`, with the layer selection in :mod:`~torch_mtlgrad.mpps.layers`),
the eq. (3) objective (:mod:`~torch_mtlgrad.mpps.objective`) and the curriculum bookkeeping
(:mod:`~torch_mtlgrad.mpps.curriculum`).  The choices the paper leaves open, and when to use the
sequential or the batched form, are on the documentation's MPPS page.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..aggregators import work_dtype
from .curriculum import Curriculum
from .hooks import MaskHooks
from .layers import MASKABLE, neurons, select_layers
from .masks import Family, check_family, exclusive_phi, logit
from .objective import TaskObjective
from .schedulers import ECScheduler, Linear
from .target import Granularity

__all__ = ["MASKABLE", "MPPS"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


class MPPS(MaskHooks, TaskObjective, Curriculum, nn.Module):
    """Progressive parameter sharing (MPPS) attached to a backbone through forward hooks.

    Args:
        backbone: the shared network.  It is not modified: only forward hooks are added, and
            :meth:`remove` takes them off again (the backbone is not a submodule of ``MPPS``).
        num_tasks: ``T >= 2``.
        scheduler: an :class:`~torch_mtlgrad.mpps.schedulers.ECScheduler`, or an ``int`` number of
            epochs for the default ``Linear(epochs)`` schedule.
        layers: how many of the backbone's last ``Conv2d``/``Linear`` modules (in registration
            order, ``backbone.named_modules()``) to mask, default 6 (all of them, logged at INFO,
            when there are fewer); or a sequence of modules of the backbone or of their names
            (any ``Linear``/``Conv*d``/``ConvTranspose*d``).
        family: ``"bernoulli"`` (REINFORCE) or ``"gaussian"`` (reparameterisation).
        eps: exclusive initialisation ``phi = 1 - eps`` / ``eps`` and clip range of the target.
        beta: weight of the KL term in eq. (3) (the paper's appendix 7.4 ``beta``), default 1.
        target_update: ``"neuron"`` (Algorithm 1: per-neuron ``C``) or ``"distribution"`` (one
            ``C`` for all neurons); see :func:`~torch_mtlgrad.mpps.target.update_target`.
        adaptive_target: ``True`` (the paper's "w/ updating") rebuilds ``Pi`` from the learnt
            ``Phi``; ``False`` ("w/o updating") rebuilds it from the initial exclusive ``Phi``.
        baseline_decay: decay of the REINFORCE baseline's moving average, in ``[0, 1)``;
            ``None`` for no baseline.
        seed: seed of the module's own random generator (masks); ``None`` seeds it from torch's
            global generator.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_mtlgrad.mpps import MPPS
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        >>> heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])
        >>> mpps = MPPS(backbone, num_tasks=2, scheduler=10)
        >>> [tuple(p.shape) for p in mpps.parameters()]
        [(8, 2), (8, 2)]
        >>> x, y = torch.randn(16, 4), torch.randn(2, 16, 1)
        >>> losses = mpps.losses(lambda t: ((heads[t](backbone(x)) - y[t]) ** 2).mean())
        >>> len(losses), losses[0].dim()
        (2, 0)
        >>> sum(losses).backward()
        >>> round(mpps.ec().item(), 2), mpps.end_epoch()
        (0.99, 0.8888888888888888)
        >>> mpps.remove()
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_tasks: int,
        *,
        scheduler: ECScheduler | int,
        layers: int | Sequence[nn.Module | str] = 6,
        family: Family = "bernoulli",
        eps: float = 0.01,
        beta: float = 1.0,
        target_update: Granularity = "neuron",
        adaptive_target: bool = True,
        baseline_decay: float | None = 0.9,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 2:
            raise ValueError(f"num_tasks must be an int >= 2, got {num_tasks!r}")
        if isinstance(scheduler, int) and not isinstance(scheduler, bool):
            scheduler = Linear(scheduler)
        if not isinstance(scheduler, ECScheduler):
            raise TypeError(
                f"scheduler must be an ECScheduler or an int number of epochs, got {type(scheduler).__name__}"
            )
        if not (0.0 < float(eps) < 0.5):
            raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
        if not (math.isfinite(float(beta)) and float(beta) >= 0.0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if target_update not in ("neuron", "distribution"):
            raise ValueError(
                f"target_update must be 'neuron' or 'distribution', got {target_update!r}"
            )
        if baseline_decay is not None and not (0.0 <= float(baseline_decay) < 1.0):
            raise ValueError(
                f"baseline_decay must lie in [0, 1) or be None, got {baseline_decay!r}"
            )

        self.num_tasks = num_tasks
        self.family: Family = check_family(family)
        self.eps = float(eps)
        self.beta = float(beta)
        self.scheduler = scheduler
        self.target_update = target_update
        self.adaptive_target = bool(adaptive_target)
        self.baseline_decay = None if baseline_decay is None else float(baseline_decay)
        self.epoch = 0

        named = select_layers(backbone, layers)
        # Plain lists: the backbone's modules must not become submodules of MPPS.
        self.layer_names: list[str] = [n for n, _ in named]
        self._layers: list[nn.Module] = [m for _, m in named]
        self._dims: list[int] = []
        # phi lives in float32 (float64 if the layer is float64) on the first masked layer's device
        ref = getattr(named[0][1], "weight", None)
        is_float = isinstance(ref, Tensor) and not isinstance(
            ref, nn.parameter.UninitializedParameter
        )
        dtype = work_dtype(ref.dtype) if is_float else torch.float32
        device = ref.device if is_float else torch.device("cpu")
        logits = []
        for i, (name, module) in enumerate(named):
            n, dim = neurons(module)
            self._dims.append(dim)
            phi0 = exclusive_phi(n, num_tasks, self.eps, dtype=dtype, device=device)
            logits.append(nn.Parameter(logit(phi0)))
            self.register_buffer(f"target_{i}", phi0.clone())
        self.logits = nn.ParameterList(logits)
        self.register_buffer("baseline", torch.zeros(num_tasks, dtype=dtype, device=device))
        self.register_buffer("baseline_weight", torch.zeros(num_tasks, dtype=dtype, device=device))

        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(int(seed))

        self._mode: str | None = None  # None, "task" or "batched"
        self._active: list[Tensor] | None = None  # per layer: [N] or [T, N]
        self._drawn: dict[int, list[Tensor]] = {}  # task -> per-layer mask of its last context
        self.register_buffer(
            "_diag_kl", torch.zeros(num_tasks, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "_diag_base", torch.zeros(num_tasks, dtype=dtype, device=device), persistent=False
        )

        if scheduler.value(0) < 1.0:
            # Only FullShare (or a custom schedule not starting exclusive): the first course's
            # target must already have the scheduled EC.  Otherwise Pi starts equal to Phi.
            self._set_target(scheduler.value(0))

        self._handles = [
            m.register_forward_hook(functools.partial(MPPS._hook, self, i))
            for i, m in enumerate(self._layers)
        ]
        logger.debug("MPPS attached to %s", ", ".join(self.layer_names))

    def get_extra_state(self) -> dict[str, Any]:
        """Non-tensor state saved in ``state_dict()``: epoch, RNG state and the configuration."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "rng": self._generator.get_state(),
            "num_tasks": self.num_tasks,
            "family": self.family,
            "layer_names": list(self.layer_names),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved; refuses a state of another configuration."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("MPPS state_dict: unknown or missing version of the extra state")
        for key in ("num_tasks", "family", "layer_names"):
            mine = getattr(self, key)
            if state[key] != mine:
                raise ValueError(
                    f"MPPS state_dict was saved with {key}={state[key]!r}, this one has {mine!r}"
                )
        self.epoch = int(state["epoch"])
        self._generator.set_state(state["rng"].clone())
        self._drawn = {}

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, family={self.family!r}, layers={self.layer_names}, "
            f"eps={self.eps}, beta={self.beta}, scheduler={self.scheduler!r}, epoch={self.epoch}"
        )
