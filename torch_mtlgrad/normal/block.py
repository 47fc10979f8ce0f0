"""The time-aware second-order neural ODE block of NORMAL (Ye et al., IJCAI 2023, section 3.2).

On top of shared features ``z(0) = f(x)`` the block integrates the heavy-ball system (eq. 5)

    dz/dt = -q,     dq/dt = -gamma q + g(z) + xi z,     q(0) = u(z(0)),   gamma = sigmoid(omega)

and task ``t``'s head reads ``z(p_t)``, the state at its learned position ``p_t`` (eq. 6).  ``u``
and ``g`` are ``FC -> LeakyReLU -> FC`` for vectors and ``1x1 Conv -> LeakyReLU -> 1x1 Conv`` for
feature maps.  ``g`` does not read ``t`` (the paper's architecture for ``g`` is the plain MLP).

Solver: explicit Euler on a fixed grid of spacing ``step_size``; reaching ``p`` takes
``ceil(|p| / step_size)`` steps, every position is read off one pass per sign, and a negative
position integrates the same ODE backwards in time from 0 (see :mod:`.integrate`).  Gradients of
``u``, ``g``, ``omega`` and of everything before the block go through ordinary autograd over
the Euler steps; the positions get exactly eq. (7) through :class:`.PositionGrad`.

Reading the positions to pick the number of steps copies ``T`` floats to the host each forward
(one synchronisation on a GPU); this cannot be avoided with an explicit solver whose step count
depends on the positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .integrate import integrate_positions
from .position_grad import position_readout

__all__ = ["TimeAwareODE"]


def _mlp(kind: str, features: int, hidden: int, negative_slope: float) -> nn.Sequential:
    if kind == "fc":
        return nn.Sequential(
            nn.Linear(features, hidden), nn.LeakyReLU(negative_slope), nn.Linear(hidden, features)
        )
    return nn.Sequential(
        nn.Conv2d(features, hidden, kernel_size=1),
        nn.LeakyReLU(negative_slope),
        nn.Conv2d(hidden, features, kernel_size=1),
    )


class TimeAwareODE(nn.Module):
    """Heavy-ball neural ODE block with one learned position per task (NORMAL eq. 5-7).

    Args:
        features: the size ``n`` of the feature vectors (``kind="fc"``, input ``[..., n]``) or the
            channel count of the feature maps (``kind="conv"``, input ``[B, n, H, W]``).
        num_tasks: ``T``, the number of positions.
        kind: ``"fc"`` (vectors) or ``"conv"`` (feature maps, 1x1 convolutions).
        hidden: width of the hidden layer of ``u`` and ``g`` (default ``features``, as in the
            paper).
        step_size: the Euler grid spacing ``h``; a smaller ``h`` means more steps.
        xi: the skip coefficient ``xi`` of eq. (5) (a hyperparameter; default 0).
        omega_init: initial ``omega``; ``gamma = sigmoid(omega)`` is always in ``(0, 1)``.
        positions_init: one float for all tasks or ``T`` floats; any real numbers.
        negative_slope: the LeakyReLU slope in ``u`` and ``g``.
        max_steps: the most grid steps a position may need (guards against runaway positions).

    Attributes:
        positions: ``nn.Parameter`` of shape ``[T]``, task-specific: give it to
            :class:`~torch_mtlgrad.normal.PositionUpdater`, not to the wrapped optimizer.
        omega: ``nn.Parameter``, shared.
        u, g: the initial-velocity map and the ODE function, shared.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> block = TimeAwareODE(8, num_tasks=3, positions_init=[0.5, 1.0, -0.3])
        >>> feats = block(torch.randn(4, 8))           # one pass, one read-out per task
        >>> [tuple(f.shape) for f in feats]
        [(4, 8), (4, 8), (4, 8)]
        >>> sum(f.sum() for f in feats).backward()
        >>> block.positions.grad.shape, 0.0 < block.gamma.item() < 1.0
        (torch.Size([3]), True)
    """

    def __init__(
        self,
        features: int,
        num_tasks: int,
        *,
        kind: Literal["fc", "conv"] = "fc",
        hidden: int | None = None,
        step_size: float = 0.1,
        xi: float = 0.0,
        omega_init: float = 0.0,
        positions_init: float | Sequence[float] | Tensor = 1.0,
        negative_slope: float = 0.01,
        max_steps: int = 10_000,
    ) -> None:
        super().__init__()
        if kind not in ("fc", "conv"):
            raise ValueError(f"kind must be 'fc' or 'conv', got {kind!r}")
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        hidden = features if hidden is None else hidden
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        self._check_hyper(step_size, xi, max_steps)
        self.kind = kind
        self.features = features
        self.num_tasks = num_tasks
        self.step_size = float(step_size)
        self.xi = float(xi)
        self.max_steps = int(max_steps)
        self.u = _mlp(kind, features, hidden, negative_slope)
        self.g = _mlp(kind, features, hidden, negative_slope)
        self.omega = nn.Parameter(torch.tensor(float(omega_init)))
        exact = torch.as_tensor(positions_init, dtype=torch.float64).detach().clone()
        init = exact.to(torch.get_default_dtype())
        if init.dim() == 0:
            init = init.expand(num_tasks).clone()
        if init.shape != (num_tasks,):
            raise ValueError(
                f"positions_init must be one float or {num_tasks} floats, got shape {tuple(init.shape)}"
            )
        if not torch.isfinite(init).all():
            raise ValueError(f"positions_init must be finite, got {init.tolist()}")
        self.positions = nn.Parameter(init)
        # The initial values as given, so that a cast to float64 before training keeps them exact
        # (a float32 parameter would otherwise carry 0.7 as 0.699999988).
        self._exact_init = {"positions": exact.expand(num_tasks).clone(),
                            "omega": torch.tensor(float(omega_init), dtype=torch.float64)}

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        before = {name: getattr(self, name).detach().clone() for name in self._exact_init}
        out = super()._apply(fn, recurse)
        for name, exact in self._exact_init.items():
            p, old = getattr(self, name), before[name]
            untouched = old.device.type != "meta" and torch.equal(
                old.cpu(), exact.to(old.dtype))  # still the initial value, rounded
            if untouched and p.dtype == torch.float64 and p.device.type != "meta":
                with torch.no_grad():
                    p.copy_(exact.to(p.device))
        return out

    @staticmethod
    def _check_hyper(step_size: float, xi: float, max_steps: int) -> None:
        if not (isinstance(step_size, (int, float)) and step_size > 0 and step_size < float("inf")):
            raise ValueError(f"step_size must be a positive finite number, got {step_size!r}")
        if not (isinstance(xi, (int, float)) and abs(xi) < float("inf")):
            raise ValueError(f"xi must be a finite number, got {xi!r}")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")

    # Parameters ------------------------------------------------------------------------------
    @property
    def gamma(self) -> Tensor:
        """The damping ``gamma = sigmoid(omega)``, strictly inside ``(0, 1)``.

        Where ``sigmoid`` would round to exactly 0 or 1 in the parameter's dtype (``|omega|``
        beyond about 17 in float32), the value is clamped to the nearest representable number
        inside the interval; the gradient there is zero, as sigmoid's nearly is.
        """
        fi = torch.finfo(self.omega.dtype)
        return torch.sigmoid(self.omega).clamp(fi.tiny, 1.0 - fi.eps)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter except the positions: ``u``, ``g`` and ``omega`` (task-shared)."""
        for name, p in self.named_parameters():
            if name != "positions":
                yield p

    # Forward ---------------------------------------------------------------------------------
    def _check_input(self, z0: Tensor) -> None:
        if not isinstance(z0, Tensor) or not z0.is_floating_point():
            raise TypeError("the block's input must be a floating-point tensor")
        if self.kind == "fc":
            if z0.dim() < 1 or z0.shape[-1] != self.features:
                raise ValueError(
                    f"kind='fc' expects features in the last dimension of size {self.features}, "
                    f"got shape {tuple(z0.shape)}"
                )
        elif z0.dim() != 4 or z0.shape[1] != self.features:
            raise ValueError(
                f"kind='conv' expects feature maps [B, {self.features}, H, W], got shape {tuple(z0.shape)}"
            )

    def _tasks(self, tasks: Sequence[int] | None) -> list[int]:
        if tasks is None:
            return list(range(self.num_tasks))
        out = [int(t) for t in tasks]
        for t in out:
            if not 0 <= t < self.num_tasks:
                raise IndexError(f"task index {t} out of range for {self.num_tasks} tasks")
        return out

    def integrate(
        self, z0: Tensor, tasks: Sequence[int] | None = None, *, shared_pass: bool = True
    ) -> list[tuple[Tensor, Tensor]]:
        """``(z(p_t), q(p_t))`` for the given tasks, *without* the position gradient.

        The returned states depend on the positions only as constants; :meth:`forward` wraps
        them with eq. (7).  ``shared_pass=False`` integrates each task from 0 on its own (same
        numbers, ``T`` times the work for close positions; kept for comparison).

        Example:
            >>> block = TimeAwareODE(2, num_tasks=2, positions_init=[0.0, 0.0])
            >>> (z, q), _ = block.integrate(torch.ones(1, 2))
            >>> torch.equal(z, torch.ones(1, 2))
            True
        """
        self._check_input(z0)
        tasks = self._tasks(tasks)
        pos = self.positions.detach()[tasks].tolist() if tasks else []
        q0 = self.u(z0)
        return integrate_positions(
            z0, q0, pos, self.step_size, self.g, self.gamma, self.xi,
            shared_pass=shared_pass, max_steps=self.max_steps,
        )

    def forward(
        self, z0: Tensor, tasks: Sequence[int] | None = None, *, shared_pass: bool = True
    ) -> list[Tensor]:
        """``[z(p_t) for t in tasks]`` (all tasks by default), with ``p_t.grad`` from eq. (7).

        Args:
            z0: the shared features ``f(x)`` (``[..., features]`` or ``[B, features, H, W]``).
            tasks: the task indices to read out, in the order wanted; when tasks have their
                own inputs, call the block once per task with ``tasks=[t]``.
            shared_pass: one integration pass for all tasks (default) or one per task.
        """
        tasks = self._tasks(tasks)
        states = self.integrate(z0, tasks, shared_pass=shared_pass)
        return [position_readout(z, q, self.positions[t]) for t, (z, q) in zip(tasks, states)]

    # State -----------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "xi": self.xi, "max_steps": self.max_steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._check_hyper(state["step_size"], state["xi"], state["max_steps"])
        self.step_size = float(state["step_size"])
        self.xi = float(state["xi"])
        self.max_steps = int(state["max_steps"])

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, features={self.features}, num_tasks={self.num_tasks}, "
            f"step_size={self.step_size}, xi={self.xi}"
        )
