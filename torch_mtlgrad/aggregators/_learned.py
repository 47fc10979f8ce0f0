"""A learned ``[T]`` vector with its own ``torch.optim`` optimizer (shared by UW, GradNorm, FAMO).

The loss weightings learn a few scalars per task.  They are not model parameters (the
aggregator interface only sees ``J`` and the losses), so each weighting owns them and steps them
with its own optimizer, whose update equations are PyTorch's: ``"sgd"`` is
``x <- x - lr (g + weight_decay x)`` and ``"adam"`` is ``torch.optim.Adam`` (Kingma and Ba, with
``betas=(0.9, 0.999)``, ``eps=1e-8`` and L2 ``weight_decay`` added to the gradient).

Absent tasks: :meth:`LearnedVector.restrict` gives the present tasks' slice (value, Adam moments
and per-task step counts) as a vector of its own, :meth:`LearnedVector.scatter` writes it back;
an absent task's value and moments never move (Adam with a zero gradient would move them).  Adam
counts steps per task: a task's bias correction uses the number of steps *it* took, so a task
first present at step 100 starts like a fresh Adam.  While every task has taken the same number
of steps this is PyTorch's Adam on the whole vector, bit for bit; otherwise each group of tasks
with the same count takes its step with PyTorch's Adam on its own slice.
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
        # Adam's step count per task ([T] float64, CPU) while the tasks' counts differ; None:
        # every task is at the step count of the optimizer's own state.
        self.steps: Tensor | None = None

    def _new_optimizer(self, param: Tensor) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam([param], lr=self.lr, weight_decay=self.weight_decay,
                                    foreach=False)
        return torch.optim.SGD([param], lr=self.lr, weight_decay=self.weight_decay, foreach=False)

    def empty_like(self) -> LearnedVector:
        """A vector with the same optimizer settings and no value yet."""
        return LearnedVector(self.optimizer_name, self.lr, self.weight_decay)

    def _adam_state(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per-task step counts, first and second moments (zeros before the first step)."""
        assert self.value is not None and self._opt is not None
        T = self.value.shape[0]
        st = self._opt.state.get(self.value, {})
        if "exp_avg" not in st:
            z = torch.zeros_like(self.value.detach())
            return torch.zeros(T, dtype=torch.float64), z, z.clone()
        steps = (self.steps.clone() if self.steps is not None
                 else torch.full((T,), float(st["step"]), dtype=torch.float64))
        return steps, st["exp_avg"], st["exp_avg_sq"]

    def _set_adam_state(self, steps: Tensor, m: Tensor, v: Tensor) -> None:
        assert self.value is not None and self._opt is not None
        self._opt.state.pop(self.value, None)
        if bool((steps == steps[0]).all()):
            self.steps = None
            if float(steps[0]) == 0.0:
                return  # a fresh Adam: its state is made on the first step
        else:
            self.steps = steps
        self._opt.state[self.value] = {"step": torch.tensor(float(steps.max())),
                                       "exp_avg": m, "exp_avg_sq": v}

    def restrict(self, idx: Tensor, fill: float = 0.0) -> LearnedVector:
        """The entries ``idx`` as a vector of their own (value, optimizer state, step counts)."""
        sub = self.empty_like()
        if self.value is None:
            return sub
        sub.init(self.value.detach()[idx.to(self.value.device)])
        if self.optimizer_name == "adam":
            steps, m, v = self._adam_state()
            i = idx.to(m.device)
            sub._set_adam_state(steps[idx.cpu()], m[i].clone(), v[i].clone())
        return sub

    def scatter(self, sub: LearnedVector, idx: Tensor, num_tasks: int, fill: float = 0.0) -> None:
        """Write ``sub`` (from :meth:`restrict`) back at ``idx``; a vector with no value yet
        starts at ``fill`` (with a fresh optimizer state) for the other entries."""
        if sub.value is None:
            return
        if self.value is None:
            self.init(torch.full((num_tasks,), fill, dtype=sub.value.dtype,
                                 device=sub.value.device))
        assert self.value is not None
        i = idx.to(self.value.device)
        if self.optimizer_name == "adam":
            steps, m, v = self._adam_state()
            s_steps, s_m, s_v = sub._adam_state()
            steps, m, v = steps.clone(), m.clone(), v.clone()
            steps[idx.cpu()] = s_steps
            m[i] = s_m.to(m)
            v[i] = s_v.to(v)
        with torch.no_grad():
            self.value[i] = sub.value.detach().to(self.value)
        if self.optimizer_name == "adam":
            self._set_adam_state(steps, m, v)

    def init(self, value: Tensor) -> None:
        """Start from ``value`` with a fresh optimizer state."""
        self.value = value.detach().clone().requires_grad_(True)
        self._opt = self._new_optimizer(self.value)
        self.steps = None

    def clear(self) -> None:
        """Forget the value and the optimizer state (the next ``init`` starts over)."""
        self.value, self._opt, self.steps = None, None, None

    def step(self, grad: Tensor) -> None:
        """One optimizer step with the given gradient."""
        assert self.value is not None and self._opt is not None
        if self.steps is not None:
            self._step_groups(grad)
            return
        self.value.grad = grad.detach().to(dtype=self.value.dtype, device=self.value.device).clone()
        self._opt.step()
        self.value.grad = None

    def _step_groups(self, grad: Tensor) -> None:
        """Adam where the tasks' step counts differ: one PyTorch Adam step per group of tasks
        with the same count, each on its own slice."""
        assert self.value is not None
        steps, m, v = self._adam_state()
        m, v = m.clone(), v.clone()
        grad = grad.detach().to(dtype=self.value.dtype, device=self.value.device)
        counts = steps.clone()  # the groups are fixed before any of them steps
        for s in torch.unique(counts).tolist():
            g = (counts == s).nonzero().flatten()
            gi = g.to(self.value.device)
            p = self.value.detach()[gi].clone().requires_grad_(True)
            opt = self._new_optimizer(p)
            if s > 0:
                opt.state[p] = {"step": torch.tensor(float(s)), "exp_avg": m[gi].clone(),
                                "exp_avg_sq": v[gi].clone()}
            p.grad = grad[gi].clone()
            opt.step()
            with torch.no_grad():
                self.value[gi] = p.detach()
            m[gi] = opt.state[p]["exp_avg"]
            v[gi] = opt.state[p]["exp_avg_sq"]
            steps[g] = s + 1
        self._set_adam_state(steps, m, v)

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
        out = {"value": self.value.detach().clone(),
               "optimizer": copy.deepcopy(self._opt.state_dict())}
        if self.steps is not None:
            out["steps"] = self.steps.clone()
        return out

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
        steps = state.get("steps")
        if steps is not None:
            if not isinstance(steps, Tensor) or tuple(steps.shape) != tuple(value.shape):
                raise ValueError(f"{name}: the saved per-task step counts must be a tensor of "
                                 f"shape {tuple(value.shape)}")
            self.steps = steps.detach().to("cpu", torch.float64).clone()
