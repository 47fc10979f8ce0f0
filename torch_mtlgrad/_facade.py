"""A ``torch.optim.Optimizer`` that is a view of another one: its param groups, state and
defaults, so LR schedulers, GradScaler, ``clip_grad_norm_`` and step hooks treat the wrapper as
the optimizer it wraps."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["WrappedOptimizer"]


class WrappedOptimizer(Optimizer):
    """Base of optimizer wrappers: ``param_groups``, ``state`` and ``defaults`` are the wrapped
    optimizer's; the step hooks (``register_step_pre_hook`` ...) are the wrapper's own.

    Example:
        >>> sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> wrapped = WrappedOptimizer(sgd)
        >>> wrapped.param_groups is sgd.param_groups, isinstance(wrapped, Optimizer)
        (True, True)
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        # What Optimizer.__init__ sets besides the param groups, state and defaults (hook dicts,
        # flags), taken from a throwaway instance so that it follows the installed PyTorch.
        probe = Optimizer([torch.empty(0, requires_grad=True)], {})
        for key, value in vars(probe).items():
            if key not in ("defaults", "state", "param_groups"):
                setattr(self, key, value)
        self._patch_step_function()

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

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)
