"""The gradient of a task position, NORMAL eq. (7), as a custom autograd function.

The read-out ``z(p)`` of the time-aware ODE block is a function of the position ``p`` through
``dz/dt = -q``.  NORMAL (Ye et al., IJCAI 2023, section 3.3) does not differentiate the solver in
``p``; it uses the chain rule in continuous time:

    d_p = dL/dp = (dL/dz(p)) . (dz/dt)(p) = -(dL/dz(p)) . q(p)                      (eq. 7)

with ``q(p)`` the momentum kept from the forward pass.  :class:`PositionGrad` returns ``z(p)``
unchanged in the forward and, in the backward, passes the incoming gradient through to ``z(p)``
(so every other parameter gets its gradient by ordinary autograd) and gives ``p`` exactly
eq. (7): the dot product summed over the batch and all feature dimensions.  It is *not* the
derivative of the Euler scheme in ``p``; the two agree as the step size goes to zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["PositionGrad", "position_readout", "eq7_gradient"]


def eq7_gradient(grad_z: Tensor, q: Tensor) -> Tensor:
    """``-(dL/dz(p)) . q(p)`` (NORMAL eq. 7), summed over every element, as a 0-dim tensor.

    Args:
        grad_z: ``dL/dz(p)``, any shape.
        q: the momentum ``q(p)``, the same shape as ``grad_z``.

    Example:
        >>> eq7_gradient(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]))
        tensor(-1.)
    """
    if grad_z.shape != q.shape:
        raise ValueError(
            f"dL/dz(p) has shape {tuple(grad_z.shape)} but q(p) has shape {tuple(q.shape)}"
        )
    return -(grad_z * q).sum()


class PositionGrad(torch.autograd.Function):
    """``forward(z_p, q_p, p) = z_p``; backward gives ``z_p`` the incoming gradient and ``p`` eq. (7).

    ``q_p`` receives no gradient (it enters the loss only through ``z_p``, whose own graph
    already carries the dependence on the ODE's parameters).  ``p`` must be a 0-dim tensor (one
    task's position); its gradient is cast to ``p``'s dtype.

    Example:
        >>> p = torch.tensor(0.5, requires_grad=True)
        >>> z, q = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25])
        >>> PositionGrad.apply(z, q, p).sum().backward()
        >>> p.grad  # -(1*0.5 + 1*0.25)
        tensor(-0.7500)
    """

    @staticmethod
    def forward(ctx: Any, z_p: Tensor, q_p: Tensor, p: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(q_p.detach())
        ctx.p_dtype = p.dtype
        ctx.p_shape = p.shape
        return z_p.view_as(z_p)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: Tensor) -> tuple[Tensor, None, Tensor | None]:  # type: ignore[override]
        (q_p,) = ctx.saved_tensors
        grad_p = None
        if ctx.needs_input_grad[2]:
            grad_p = eq7_gradient(grad_z, q_p).to(ctx.p_dtype).reshape(ctx.p_shape)
        return grad_z, None, grad_p


def position_readout(z_p: Tensor, q_p: Tensor, p: Tensor) -> Tensor:
    """``z(p)`` whose backward gives ``p`` the gradient of eq. (7) (see :class:`PositionGrad`).

    Args:
        z_p: the state at ``p``, computed with ``p`` *detached* (so the solver adds no
            derivative of its own in ``p``).
        q_p: the momentum at ``p`` from the same forward.
        p: the position, a 0-dim tensor (e.g. ``positions[t]``).

    Example:
        >>> p = torch.tensor(1.0, requires_grad=True)
        >>> out = position_readout(torch.ones(2, 3), torch.full((2, 3), 2.0), p)
        >>> out.mean().backward(); p.grad
        tensor(-2.)
    """
    if p.dim() != 0:
        raise ValueError(f"a position must be a 0-dim tensor, got shape {tuple(p.shape)}")
    if z_p.shape != q_p.shape:
        raise ValueError(f"z(p) has shape {tuple(z_p.shape)} but q(p) has shape {tuple(q_p.shape)}")
    return PositionGrad.apply(z_p, q_p, p)
