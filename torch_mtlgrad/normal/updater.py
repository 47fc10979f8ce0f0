"""Updating NORMAL's task positions with their own step size (Algorithm 1, line 7).

:class:`PositionUpdater` is a :class:`~torch_mtlgrad.GradientPlugin`: ``MultiTaskOptimizer``
calls its ``post_step()`` after the wrapped optimizer stepped the other parameters, and it does

    p_t <- p_t - eta * p_t.grad          (p_t.grad is eq. 7, from TimeAwareODE's backward)

then sets ``p_t.grad`` to ``None``.  It leaves ``J`` alone, so it composes with every
aggregator of the shared parameters.  The positions must therefore **not** be in the wrapped
optimizer's param groups (they would be stepped twice); build that optimizer from
:func:`parameters_except_positions` and pass it as ``optimizer=`` to have this checked.

Schedules (``every``):

* ``every=1`` (default): *joint* updates, Algorithm 1 as written: each optimizer step updates the
  other parameters (line 6) and then the positions (line 7) from the same backward pass.
* ``every=k > 1``: *alternating every k steps*: the positions are updated only in the
  ``k``-th, ``2k``-th, ... call of ``post_step()`` (counting from 1), from that step's gradient;
  on the other steps their gradient is discarded (set to ``None``).  The other parameters are
  stepped every time by the wrapped optimizer.
* Strict alternation (the other parameters frozen while the positions move): do not register
  the updater as a plugin; on parameter steps call ``opt.step()`` and ``updater.zero_grad()``,
  on position steps call ``loss.backward()`` and ``updater.step()`` without ``opt.step()``.

After every ``post_step()`` and ``step()`` (and once at construction) the positions are appended
to ``history`` (the curves of the paper's Fig. 2); ``state_dict()`` holds the positions, the step count, the
schedule and the history.

On a GPU, ``post_step()`` compares the positions with their last value (``check_untouched``), one
host synchronisation of ``T`` numbers per step; the block's forward already reads the positions
on the host to size the Euler integration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .block import TimeAwareODE
from .diagnostics import PositionHistory, distance_matrix

__all__ = [
    "PositionUpdater",
    "position_parameters",
    "parameters_except_positions",
    "check_positions_not_in",
]

log = logging.getLogger(__name__)


def position_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The ``positions`` of every :class:`TimeAwareODE` inside ``module`` (itself included).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), TimeAwareODE(4, num_tasks=2))
        >>> [tuple(p.shape) for p in position_parameters(net)]
        [(2,)]
    """
    return [m.positions for m in module.modules() if isinstance(m, TimeAwareODE)]


def parameters_except_positions(module: nn.Module) -> list[nn.Parameter]:
    """``module.parameters()`` without the task positions: what the wrapped optimizer should hold.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), TimeAwareODE(4, num_tasks=2))
        >>> len(list(net.parameters())) - len(parameters_except_positions(net))
        1
    """
    skip = {id(p) for p in position_parameters(module)}
    return [p for p in module.parameters() if id(p) not in skip]


def check_positions_not_in(optimizer: Any, positions: Iterable[Tensor]) -> None:
    """Raise ``ValueError`` if any position is in ``optimizer.param_groups`` (double stepping).

    Example:
        >>> block = TimeAwareODE(4, num_tasks=2)
        >>> check_positions_not_in(torch.optim.SGD(block.shared_parameters(), lr=0.1), [block.positions])
        >>> check_positions_not_in(torch.optim.SGD(block.parameters(), lr=0.1), [block.positions])
        Traceback (most recent call last):
        ...
        ValueError: the task positions are in the wrapped optimizer's param groups (group 0), ...
    """
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise TypeError(f"{type(optimizer).__name__} has no param_groups to check")
    ids = {id(p) for p in positions}
    for g, group in enumerate(groups):
        if any(id(p) in ids for p in group["params"]):
            raise ValueError(
                f"the task positions are in the wrapped optimizer's param groups (group {g}), "
                "so they would be stepped twice; build the optimizer from "
                "parameters_except_positions(model) (or block.shared_parameters())"
            )


class PositionUpdater:
    """Gradient plugin that steps the task positions with their own step size ``eta`` (Algorithm 1).

    Args:
        positions: a :class:`TimeAwareODE` (its ``positions`` are used) or a ``[T]`` parameter.
        lr: the positions' step size ``eta > 0``.
        every: update the positions on every ``every``-th step (1: joint; see the module doc).
        optimizer: when given, checked not to hold the positions (``ValueError`` otherwise).
        max_move: ``None`` (default) applies Algorithm 1 exactly; a positive number clamps each
            position's move per update to ``[-max_move, max_move]`` (a safeguard against a
            gradient spike throwing a position far out; not in the paper).
        check_untouched: raise ``RuntimeError`` in ``post_step()`` when the positions changed
            since the updater last touched them (the sign that another optimizer steps them);
            after editing positions by hand, call :meth:`sync`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> block = TimeAwareODE(4, num_tasks=2, positions_init=1.0)
        >>> upd = PositionUpdater(block, lr=0.5)
        >>> block.positions.grad = torch.tensor([1.0, -2.0])
        >>> upd.post_step()
        >>> block.positions.data, block.positions.grad
        (tensor([0.5000, 2.0000]), None)
        >>> upd.history.as_tensor()
        tensor([[1.0000, 1.0000],
                [0.5000, 2.0000]])
        >>> upd.distance_matrix()
        tensor([[0.0000, 1.5000],
                [1.5000, 0.0000]])
    """

    def __init__(
        self,
        positions: TimeAwareODE | nn.Parameter,
        lr: float,
        *,
        every: int = 1,
        optimizer: Any = None,
        max_move: float | None = None,
        check_untouched: bool = True,
    ) -> None:
        if isinstance(positions, TimeAwareODE):
            positions = positions.positions
        if not isinstance(positions, Tensor) or positions.dim() != 1 or not positions.is_leaf:
            raise TypeError("positions must be a TimeAwareODE or its [T] positions parameter")
        if not positions.requires_grad:
            raise ValueError("the positions do not require grad: they would never move")
        self._check_schedule(lr, every)
        if max_move is not None and not (isinstance(max_move, (int, float)) and max_move > 0):
            raise ValueError(f"max_move must be None or a positive number, got {max_move!r}")
        self.max_move = None if max_move is None else float(max_move)
        self.positions: Tensor = positions
        self.lr = float(lr)
        self.every = int(every)
        self.check_untouched = bool(check_untouched)
        self.num_steps = 0
        self.history = PositionHistory()
        self.history.record(positions)
        self._last = positions.detach().clone()
        if optimizer is not None:
            check_positions_not_in(optimizer, [positions])

    @staticmethod
    def _check_schedule(lr: float, every: int) -> None:
        if not isinstance(lr, (int, float)) or not 0.0 < lr < float("inf"):
            raise ValueError(f"the positions' step size lr must be a positive finite number, got {lr!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")

    # GradientPlugin ----------------------------------------------------------------------------
    def bind(self, layout: Any) -> None:
        """Check that the positions are not among the shared parameters."""
        if layout.contains(self.positions):
            raise ValueError(
                "the task positions are listed among the shared parameters; they are task-specific "
                "(shared=...: pass block.shared_parameters() and the feature extractor instead)"
            )

    def parameters(self) -> list[Tensor]:
        """``[positions]``: ``MultiTaskOptimizer.backward`` gives them their summed task gradient
        (eq. 7 per task, since each position feeds only its own task)."""
        return [self.positions]

    def post_step(self) -> None:
        """Count the step, update the positions on scheduled steps, clear their gradient, record."""
        if self.check_untouched and not torch.equal(self.positions.detach(), self._last):
            raise RuntimeError(
                "the task positions changed outside PositionUpdater since its last step: they are "
                "probably in the wrapped optimizer's param groups (build it from "
                "parameters_except_positions(model)); after editing them by hand call updater.sync()"
            )
        self.num_steps += 1
        if self.num_steps % self.every == 0:
            self._update()
        else:
            self.positions.grad = None
        self.history.record(self.positions)
        self._last = self.positions.detach().clone()

    # Manual use ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _update(self) -> None:
        g = self.positions.grad
        if g is None:
            log.debug("PositionUpdater: the positions have no gradient this step; not moved")
            return
        if self.max_move is None:
            self.positions.add_(g, alpha=-self.lr)
        else:
            self.positions.add_((-self.lr * g).clamp_(-self.max_move, self.max_move))
        self.positions.grad = None

    def step(self) -> None:
        """``p <- p - lr * p.grad`` now, whatever the schedule (for strict alternation), and record."""
        self._update()
        self.history.record(self.positions)
        self._last = self.positions.detach().clone()

    def zero_grad(self) -> None:
        """Drop the positions' gradient."""
        self.positions.grad = None

    def sync(self) -> None:
        """Accept the current positions as the updater's own (after editing them by hand)."""
        self._last = self.positions.detach().clone()

    # Diagnostics -------------------------------------------------------------------------------
    def distance_matrix(self) -> Tensor:
        """``|p_i - p_j|`` of the current positions (task relatedness, NORMAL section 5.4)."""
        return distance_matrix(self.positions)

    @property
    def diagnostics(self) -> dict[str, Tensor]:
        """``positions`` ``[T]`` and ``distances`` ``[T, T]`` now."""
        p = self.positions.detach().clone()
        return {"positions": p, "distances": distance_matrix(p)}

    # State -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Positions, schedule, step count and history (positions are restored on load)."""
        return {
            "positions": self.positions.detach().cpu().clone(),
            "lr": self.lr,
            "every": self.every,
            "max_move": self.max_move,
            "num_steps": self.num_steps,
            "history": self.history.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, copying the positions into the parameter."""
        pos = state["positions"]
        if not isinstance(pos, Tensor) or pos.shape != self.positions.shape:
            raise ValueError(
                f"saved positions have shape {tuple(getattr(pos, 'shape', ()))}, "
                f"this updater's have {tuple(self.positions.shape)}"
            )
        self._check_schedule(state["lr"], state["every"])
        with torch.no_grad():
            self.positions.copy_(pos)
        self.lr = float(state["lr"])
        self.every = int(state["every"])
        self.max_move = state.get("max_move")
        self.num_steps = int(state["num_steps"])
        self.history.load_state_dict(state["history"])
        self._last = self.positions.detach().clone()

    def __repr__(self) -> str:
        return (f"PositionUpdater(T={self.positions.shape[0]}, lr={self.lr}, every={self.every}, "
                f"max_move={self.max_move})")
