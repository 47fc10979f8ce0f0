"""A learned ``[T]`` vector with its own ``torch.optim`` optimizer (shared by UW, GradNorm, FAMO).

The loss weightings learn a few scalars per task.  They are not model parameters (the
aggregator interface only sees ``J`` and the losses), so each weighting owns them and steps them
with its own optimizer, whose update equations are PyTorch's: ``"sgd"`` is
``x <- x - lr (g + weight_decay x)`` and ``"adam"`` is ``torch.optim.Adam`` (Kingma and Ba, with
``betas=(0.9, 0.999)``, ``eps=1e-8`` and L2 ``weight_decay`` added to the gradient).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["LearnedVector", "OptimizerName"]

OptimizerName = Literal["adam", "sgd"]


class LearnedVector:
    """A ``[T]`` tensor ``value`` stepped by ``step(grad)`` with Adam or SGD (made by ``init``)."""

    def __init__(self, optimizer: OptimizerName, lr: float, weight_decay: float = 0.0) -> None:
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"the learning rate must be a positive number, got {lr!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
        self.optimizer_name: OptimizerName = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.value: Tensor | None = None
        self._opt: torch.optim.Optimizer | None = None

    def init(self, value: Tensor) -> None:
        """Start from ``value`` with a fresh optimizer state."""
        self.value = value.detach().clone().requires_grad_(True)
        if self.optimizer_name == "adam":
            self._opt = torch.optim.Adam([self.value], lr=self.lr, weight_decay=self.weight_decay,
                                         foreach=False)
        else:
            self._opt = torch.optim.SGD([self.value], lr=self.lr, weight_decay=self.weight_decay,
                                        foreach=False)

    def clear(self) -> None:
        """Forget the value and the optimizer state (the next ``init`` starts over)."""
        self.value, self._opt = None, None

    def step(self, grad: Tensor) -> None:
        """One optimizer step with the given gradient."""
        assert self.value is not None and self._opt is not None
        self.value.grad = grad.detach().to(dtype=self.value.dtype, device=self.value.device).clone()
        self._opt.step()
        self.value.grad = None

    def assign(self, new: Tensor) -> None:
        """Overwrite the value in place (the optimizer state is kept)."""
        assert self.value is not None
        with torch.no_grad():
            self.value.copy_(new)

    def get(self) -> Tensor:
        assert self.value is not None
        return self.value.detach()

    def state_dict(self) -> dict[str, Any]:
        if self.value is None or self._opt is None:
            return {"value": None, "optimizer": None}
        return {"value": self.value.detach().clone(),
                "optimizer": copy.deepcopy(self._opt.state_dict())}

    def load_state_dict(self, state: dict[str, Any], name: str) -> None:
        value = state.get("value")
        if value is None:
            self.value, self._opt = None, None
            return
        if not isinstance(value, Tensor) or value.dim() != 1:
            raise ValueError(f"{name}: the saved value must be a 1-D tensor, got {value!r}")
        self.init(value)
        assert self._opt is not None
        if state.get("optimizer") is not None:
            self._opt.load_state_dict(copy.deepcopy(state["optimizer"]))
