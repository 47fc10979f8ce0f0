"""MPPS: progressive parameter sharing through per-task masks on a backbone's neurons.

Shi et al., *Deep Multitask Learning with Progressive Parameter Sharing* (ICCV 2023).
:class:`MPPS` attaches forward hooks to chosen layers of a shared backbone (default: its last 6 ``Conv2d``/``Linear`` layers) and multiplies their output channels
(Conv) or output features (Linear) by a mask drawn for the task whose forward is running.

One training step::

    losses = mpps.losses(lambda t: loss_fn[t](heads[t](backbone(x)), y[t]))   # T masked forwards
    opt.backward(losses)          # MultiTaskOptimizer, any aggregator; or sum(losses).backward()
    opt.step()
    ...
    mpps.end_epoch()              # once per epoch: scheduler + target update (Algorithm 1)

``losses[t]`` is eq. (3) for task ``t``: its loss under its mask, plus ``beta`` times the closed-form
``KL(q_t || p_t)``, plus (Bernoulli) a REINFORCE surrogate whose *value* is zero and whose
*gradient* is the score-function estimate of ``d E_m[L_t] / d phi[:, t]``.

The reading choices where the paper leaves one open (the parameterisation of phi and where its
learning rate goes, the KL terms, the REINFORCE baseline, one mask per task per step, no
rescaling of Bernoulli masks, masks on the layer's output, the full backbone outside
:meth:`~MPPS.task`) and when to use the sequential or the batched form are in ``docs/mpps.md``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..aggregators import work_dtype
from .ec import distribution_ec, layer_ec, task_shares
from .masks import (
    Family,
    bernoulli_log_prob,
    check_family,
    exclusive_phi,
    kl_divergence,
    logit,
    sample_masks,
)
from .schedulers import ECScheduler, Linear
from .target import Granularity, update_target

__all__ = ["MASKABLE", "MPPS"]

logger = logging.getLogger(__name__)

_CONV = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: Module types whose outputs MPPS can mask (neurons = output channels / output features).
MASKABLE: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV)
_DEFAULT_KINDS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
_STATE_VERSION = 1


def _neurons(module: nn.Module) -> tuple[int, int]:
    """(number of neurons, position of the neuron dim counted from the end of the output)."""
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, _CONV):
        return module.out_channels, -(len(module.kernel_size) + 1)
    raise TypeError(
        f"MPPS masks outputs of {', '.join(t.__name__ for t in MASKABLE)}; got {type(module).__name__}"
    )


class MPPS(nn.Module):
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

        named = self._select_layers(backbone, layers)
        # Plain lists: the backbone's modules must not become submodules of MPPS.
        self.layer_names: list[str] = [n for n, _ in named]
        self._layers: list[nn.Module] = [m for _, m in named]
        self._dims: list[int] = []
        # phi lives in float32 (float64 if the layer is float64) on the first masked layer's device
        ref = getattr(named[0][1], "weight", None)
        is_float = isinstance(ref, Tensor) and not isinstance(
            ref, nn.parameter.UninitializedParameter
        )
        dtype = work_dtype(ref.dtype if is_float else None)
        device = ref.device if is_float else torch.device("cpu")
        logits = []
        for i, (name, module) in enumerate(named):
            n, dim = _neurons(module)
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

    # ------------------------------------------------------------------ layers and hooks
    @staticmethod
    def _select_layers(
        backbone: nn.Module, layers: int | Sequence[nn.Module | str]
    ) -> list[tuple[str, nn.Module]]:
        named = list(backbone.named_modules())
        if isinstance(layers, int) and not isinstance(layers, bool):
            if layers < 1:
                raise ValueError(
                    f"layers must be a positive count or a sequence of modules, got {layers}"
                )
            cands = [(n, m) for n, m in named if isinstance(m, _DEFAULT_KINDS)]
            if not cands:
                raise ValueError(
                    "the backbone has no Conv2d or Linear layer to mask; pass layers=[...]"
                )
            if len(cands) < layers:
                logger.info(
                    "backbone has %d Conv2d/Linear layers, fewer than layers=%d: masking all of them",
                    len(cands),
                    layers,
                )
            return cands[-layers:]
        if (
            isinstance(layers, (str, nn.Module))
            or not isinstance(layers, Sequence)
            or len(layers) == 0
        ):
            raise TypeError(
                "layers must be a positive int or a non-empty sequence of modules/names"
            )
        by_id = {id(m): n for n, m in named}
        out: list[tuple[str, nn.Module]] = []
        for item in layers:
            if isinstance(item, str):
                try:
                    module = backbone.get_submodule(item)
                except AttributeError as exc:
                    raise ValueError(
                        f"layers: the backbone has no submodule named {item!r}"
                    ) from exc
                name = item
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(
                        f"layers: {type(item).__name__} module is not part of the backbone"
                    )
                module, name = item, by_id[id(item)]
            else:
                raise TypeError(
                    f"layers entries must be modules or names, got {type(item).__name__}"
                )
            _neurons(module)  # type check with a clear error
            if any(module is m for _, m in out):
                raise ValueError(f"layers: module {name!r} is given twice")
            out.append((name, module))
        return out

    def _hook(self, idx: int, module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
        if self._mode is None or not module.training:
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"MPPS: layer {self.layer_names[idx]!r} returned {type(output).__name__}"
            )
        assert self._active is not None
        mask = self._active[idx].to(output.dtype)
        dim = self._dims[idx]
        n = mask.shape[-1]
        ch = output.dim() + dim
        if ch < 0 or output.shape[ch] != n:
            raise ValueError(
                f"MPPS: output of layer {self.layer_names[idx]!r} has shape {tuple(output.shape)}, "
                f"expected {n} neurons at dim {dim}"
            )
        if self._mode == "task":
            return output * mask.reshape([n] + [1] * (-dim - 1))
        # batched: output is [T*B, ...] with task-major blocks
        t = self.num_tasks
        if ch < 1 or output.shape[0] % t != 0:
            raise ValueError(
                f"MPPS batched form: output of layer {self.layer_names[idx]!r} has shape "
                f"{tuple(output.shape)}; its first dim must be T * batch (T = {t})"
            )
        shape = [t, output.shape[0] // t, *output.shape[1:]]
        mshape = [t] + [1] * output.dim()
        mshape[ch + 1] = n
        return (output.reshape(shape) * mask.reshape(mshape)).reshape(output.shape)

    def remove(self) -> None:
        """Take the hooks off the backbone; it then computes exactly what it did before.

        Example:
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(2, 4))
            >>> MPPS(net, 2, scheduler=4).remove()
            >>> len(net[0]._forward_hooks)
            0
        """
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the backbone."""
        return bool(self._handles)

    @property
    def layers(self) -> list[nn.Module]:
        """The masked modules of the backbone, in order."""
        return list(self._layers)

    # ------------------------------------------------------------------ sampling and contexts
    def _gen(self) -> torch.Generator:
        dev = self.logits[0].device
        if self._generator.device != dev:  # the module was moved: continue on a derived stream
            seed = int(torch.randint(0, 2**62, (), generator=self._generator).item())
            self._generator = torch.Generator(device=dev)
            self._generator.manual_seed(seed)
        return self._generator

    def _draw(self, t: int) -> list[Tensor]:
        gen = self._gen()
        masks = []
        for a in self.logits:
            is_owner = a.detach().argmax(-1) == t
            masks.append(sample_masks(a[:, t], is_owner, self.family, gen))
        return masks

    def _check_task(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, int) or not (0 <= t < self.num_tasks):
            raise ValueError(f"task must be an int in [0, {self.num_tasks}), got {t!r}")
        return t

    def _enter(self) -> None:
        if not self._handles:
            raise RuntimeError("MPPS was removed from the backbone; build a new one to mask again")
        if self._mode is not None:
            raise RuntimeError(
                "MPPS contexts do not nest: leave the current task/batched block first"
            )

    @contextmanager
    def task(self, t: int) -> Iterator[None]:
        """Mask the backbone for task ``t`` inside the block (sequential form).

        A fresh mask is drawn for every masked layer on entry; it is the one :meth:`regularize`
        scores.  In eval mode the hooks pass through (full backbone).

        Example:
            >>> import torch; from torch import nn
            >>> net = nn.Sequential(nn.Linear(3, 4)).train()
            >>> mpps = MPPS(net, 2, scheduler=3, family="bernoulli")
            >>> with mpps.task(0):
            ...     out = net(torch.ones(1, 3))
            >>> bool(torch.equal(out[0, :2], net(torch.ones(1, 3))[0, :2]))  # task 0 owns 0, 1
            True
        """
        self._check_task(t)
        self._enter()
        masks = self._draw(t)
        self._drawn[t] = masks
        self._active, self._mode = masks, "task"
        try:
            yield
        finally:
            self._active, self._mode = None, None

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Mask a forward on the batch repeated ``T`` times, block ``t`` with task ``t``'s mask.

        The input must be task-major, ``[x; x; ...; x]`` (see :meth:`repeat`), and so are the
        outputs (``out.chunk(T)``).  Masks are drawn for tasks ``0 .. T-1`` in order, consuming
        the random stream exactly as ``T`` sequential :meth:`task` blocks would.

        Example:
            >>> import torch; from torch import nn
            >>> net = nn.Sequential(nn.Linear(3, 4))
            >>> mpps = MPPS(net, 2, scheduler=3)
            >>> with mpps.batched():
            ...     out = net(mpps.repeat(torch.ones(5, 3)))
            >>> tuple(out.shape)
            (10, 4)
        """
        self._enter()
        per_task = [self._draw(t) for t in range(self.num_tasks)]
        for t, masks in enumerate(per_task):
            self._drawn[t] = masks
        self._active = [
            torch.stack([per_task[t][i] for t in range(self.num_tasks)])
            for i in range(len(self._layers))
        ]
        self._mode = "batched"
        try:
            yield
        finally:
            self._active, self._mode = None, None

    def repeat(self, x: Tensor) -> Tensor:
        """``[x; x; ...; x]`` (``T`` copies along dim 0), the input layout of :meth:`batched`.

        Example:
            >>> import torch; from torch import nn
            >>> MPPS(nn.Linear(2, 2), 3, scheduler=3).repeat(torch.zeros(4, 2)).shape
            torch.Size([12, 2])
        """
        return x.repeat(self.num_tasks, *([1] * (x.dim() - 1)))

    # ------------------------------------------------------------------ the objective, eq. (3)
    def kl(self) -> Tensor:
        """``[T]``: ``KL(q_t || p_t)`` of every task, closed form, summed over neurons and layers.

        Example:
            >>> from torch import nn
            >>> MPPS(nn.Linear(2, 4), 2, scheduler=3).kl().detach()  # q starts equal to p
            tensor([0., 0.])
        """
        total = None
        for i, a in enumerate(self.logits):
            term = kl_divergence(self.family, a, logit(self._target(i))).sum(0)
            total = term if total is None else total + term
        assert total is not None
        return total

    def _target(self, i: int) -> Tensor:
        return getattr(self, f"target_{i}")

    def _check_loss(self, t: int, loss: Any) -> None:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss of task {t} must be a scalar tensor")
        if not bool(torch.isfinite(loss.detach()).all()):
            raise ValueError(f"loss of task {t} is not finite ({loss.detach().item()})")
        if t not in self._drawn:
            raise RuntimeError(
                f"task {t} has no mask drawn since its last objective: compute its loss inside "
                "`with mpps.task(t):` or `with mpps.batched():`"
            )

    def objective(self, t: int, loss: Tensor) -> Tensor:
        """Eq. (3) for one task: ``L_t + beta * KL_t + (s_t - s_t.detach())``.

        ``loss`` is task ``t``'s loss computed under its last drawn mask (inside :meth:`task` or
        :meth:`batched`).  For Bernoulli masks ``s_t = (L_t - b_t) * sum_guests log q(m_t;
        phi[:, t])`` is the REINFORCE surrogate (``L_t`` detached, ``b_t`` the baseline): its value
        is zero, so the result has the value ``L_t + beta * KL_t`` that loss-based aggregators
        read, and its gradient in ``phi[:, t]`` is the score-function estimate of
        ``d E_m[L_t] / d phi[:, t]`` (section 3.4).  Gaussian masks need no surrogate: ``L_t`` is
        differentiable in ``phi`` through the mask.  The result depends on ``phi[:, t]`` only.

        Per task, so a sequential loop can run backward right after each task's forward and keep
        one graph alive at a time (with ``MultiTaskOptimizer``: ``with opt.task(t, loss=obj):
        obj.backward()``).  Updates the task's baseline and ``diagnostics``.

        Example:
            >>> import torch; from torch import nn
            >>> net = nn.Linear(3, 4)
            >>> mpps = MPPS(net, 2, scheduler=3)
            >>> with mpps.task(1):
            ...     raw = net(torch.ones(2, 3)).pow(2).mean()
            >>> obj = mpps.objective(1, raw)
            >>> bool(torch.allclose(obj, raw + mpps.diagnostics["kl"][1]))
            True
        """
        self._check_task(t)
        self._check_loss(t, loss)
        a_all = list(self.logits)
        kl = sum(
            kl_divergence(self.family, a[:, t], logit(self._target(i)[:, t])).sum()
            for i, a in enumerate(a_all)
        )
        value = loss.detach().reshape(()).to(self.baseline.dtype)
        base = self._baseline_value()[t]
        obj = loss.reshape(()) + self.beta * kl
        if self.family == "bernoulli":
            logp = sum(
                (
                    bernoulli_log_prob(self._drawn[t][i], a[:, t]) * (a.detach().argmax(-1) != t)
                ).sum()
                for i, a in enumerate(a_all)
            )
            surrogate = (value - base) * logp
            obj = obj + (surrogate - surrogate.detach())
        if self.baseline_decay is not None:
            with torch.no_grad():
                d = self.baseline_decay
                self.baseline[t] = d * self.baseline[t] + (1.0 - d) * value
                self.baseline_weight[t] = d * self.baseline_weight[t] + (1.0 - d)
        del self._drawn[t]
        self._diag_kl[t] = kl.detach()
        self._diag_base[t] = base
        return obj

    def _baseline_value(self) -> Tensor:
        """Bias-corrected EMA ``b_t`` of past losses (0 before the first step or without baseline)."""
        if self.baseline_decay is None:
            return torch.zeros_like(self.baseline)
        w = self.baseline_weight
        return torch.where(w > 0, self.baseline / w.clamp_min(1e-30), torch.zeros_like(w))

    @property
    def diagnostics(self) -> dict[str, Tensor]:
        """Of the last objectives: ``kl`` ([T], the KL terms), ``baseline`` ([T], the baselines
        used) and ``ec`` (EC of ``Phi`` now)."""
        return {
            "kl": self._diag_kl.clone(),
            "baseline": self._diag_base.clone(),
            "ec": self.ec().detach(),
        }

    def regularize(self, task_losses: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`objective` for every task: the ``T`` masked task losses -> the ``T`` objectives.

        Everything is checked before anything is updated (count, scalars, finite values, a mask
        drawn for every task since its last objective).

        Example:
            >>> import torch; from torch import nn
            >>> net = nn.Linear(3, 4)
            >>> mpps = MPPS(net, 2, scheduler=3)
            >>> raw = []
            >>> for t in range(2):
            ...     with mpps.task(t):
            ...         raw.append(net(torch.ones(2, 3)).pow(2).mean())
            >>> out = mpps.regularize(raw)
            >>> bool(torch.allclose(out[1], raw[1] + mpps.diagnostics["kl"][1]))
            True
        """
        t_count = self.num_tasks
        if isinstance(task_losses, Tensor) or len(task_losses) != t_count:
            got = "a tensor" if isinstance(task_losses, Tensor) else f"{len(task_losses)}"
            raise ValueError(f"regularize needs a sequence of {t_count} task losses, got {got}")
        for t, loss in enumerate(task_losses):
            self._check_loss(t, loss)
        return [self.objective(t, loss) for t, loss in enumerate(task_losses)]

    def losses(self, task_loss: Callable[[int], Tensor]) -> list[Tensor]:
        """One training step's objectives, sequential form: the one call per step.

        Runs ``task_loss(t)`` inside :meth:`task` for ``t = 0 .. T-1`` and returns
        :meth:`regularize` of the results, ready for ``MultiTaskOptimizer.backward`` (any
        aggregator) or ``sum(...).backward()``.  ``task_loss(t)`` runs the backbone on the batch
        and returns task ``t``'s scalar loss.

        Example:
            >>> import torch; from torch import nn
            >>> net = nn.Linear(3, 4)
            >>> mpps = MPPS(net, 2, scheduler=3)
            >>> ls = mpps.losses(lambda t: net(torch.ones(2, 3))[:, t].pow(2).mean())
            >>> [l.dim() for l in ls]
            [0, 0]
        """
        raw = []
        for t in range(self.num_tasks):
            with self.task(t):
                raw.append(task_loss(t))
        return self.regularize(raw)

    def losses_batched(self, all_losses: Callable[[], Sequence[Tensor]]) -> list[Tensor]:
        """One training step's objectives, batched form (one forward on ``T`` copies of the batch).

        Runs ``all_losses()`` inside :meth:`batched`; it must feed :meth:`repeat` of the input to
        the backbone, split its output with ``.chunk(T)`` and return the ``T`` task losses.

        Example:
            >>> import torch; from torch import nn
            >>> net = nn.Linear(3, 4)
            >>> mpps = MPPS(net, 2, scheduler=3)
            >>> def all_losses():
            ...     feats = net(mpps.repeat(torch.ones(2, 3))).chunk(2)
            ...     return [feats[t][:, t].pow(2).mean() for t in range(2)]
            >>> len(mpps.losses_batched(all_losses))
            2
        """
        with self.batched():
            raw = list(all_losses())
        return self.regularize(raw)

    # ------------------------------------------------------------------ EC, schedule, target
    @property
    def phi(self) -> list[Tensor]:
        """Per layer, the ``[N_l, T]`` sharing probabilities ``Phi = sigmoid(logits)`` (detached)."""
        return [torch.sigmoid(a.detach()) for a in self.logits]

    @property
    def target(self) -> list[Tensor]:
        """Per layer, the ``[N_l, T]`` target probabilities ``Pi``."""
        return [self._target(i) for i in range(len(self._layers))]

    def ec(self, which: str = "phi") -> Tensor:
        """EC of the whole distribution (``which="phi"``) or of the target (``"target"``).

        Example:
            >>> from torch import nn
            >>> round(MPPS(nn.Linear(2, 4), 2, scheduler=3).ec().item(), 4)  # 1 - eps
            0.99
        """
        return distribution_ec(self._which(which))

    def layer_ec(self, which: str = "phi") -> list[float]:
        """EC of every masked layer, in order.

        Example:
            >>> from torch import nn
            >>> [round(v, 2) for v in MPPS(nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 4)), 2,
            ...                            scheduler=3).layer_ec()]
            [0.99, 0.99]
        """
        return [float(layer_ec(p)) for p in self._which(which)]

    def task_shares(self, which: str = "phi") -> list[Tensor]:
        """Per layer, the ``[T, T]`` share matrix of :func:`~torch_mtlgrad.mpps.ec.task_shares`.

        ``S[o, t]`` is the mean ``phi[:, t]`` on the neurons task ``o`` owns (Figure 6 plots
        ``S[0, 1] / (S[0, 1] + S[0, 2])``).

        Example:
            >>> from torch import nn
            >>> MPPS(nn.Linear(2, 4), 2, scheduler=3).task_shares()[0]
            tensor([[0.9900, 0.0100],
                    [0.0100, 0.9900]])
        """
        return [task_shares(p) for p in self._which(which)]

    def _which(self, which: str) -> list[Tensor]:
        if which == "phi":
            return self.phi
        if which == "target":
            return self.target
        raise ValueError(f"which must be 'phi' or 'target', got {which!r}")

    def _set_target(self, scheduled: float) -> None:
        if self.adaptive_target:
            source = self.phi
        else:
            source = [
                exclusive_phi(p.shape[0], self.num_tasks, self.eps, p.dtype, p.device)
                for p in self.phi
            ]
        new = update_target(source, scheduled, self.eps, self.target_update)
        for i, pi in enumerate(new):
            self._target(i).copy_(pi)

    def end_epoch(self) -> float:
        """Advance the scheduler by one epoch; at a course boundary rebuild the target (Algorithm 1).

        Call it once at the end of every epoch.  The new target has EC equal to the schedule's
        value for the epoch that starts now (see :func:`~torch_mtlgrad.mpps.target.update_target`
        for when clipping to ``[eps, 1 - eps]`` makes it differ).  Returns that value.

        Example:
            >>> from torch import nn
            >>> mpps = MPPS(nn.Linear(2, 6), 3, scheduler=Linear(5))
            >>> mpps.end_epoch(), round(mpps.ec("target").item(), 4)
            (0.75, 0.75)
        """
        prev = self.epoch
        self.epoch += 1
        value = self.scheduler.value(self.epoch)
        if self.scheduler.course(self.epoch) != self.scheduler.course(prev):
            self._set_target(value)
            logger.info(
                "MPPS epoch %d: target EC %.4f (scheduled %.4f), Phi EC %.4f",
                self.epoch,
                float(self.ec("target")),
                value,
                float(self.ec("phi")),
            )
        return value

    # ------------------------------------------------------------------ state
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
