"""Checks shared by the tests of the scalarisation-based loss weightings (GLS, PBI, STCH,
COSMOS, IMTL-L): the weights are the gradient of a scalarisation ``F`` of the losses, checked
against ``torch.autograd`` in float64 and against central finite differences; and the
optimizer's loss-only route (one backward of ``sum_t w_t L_t``) gives the step of the Jacobian
route (``capture="loop"``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import Aggregator

from .._helpers import Net, data


def autograd_gradient(F: Callable[[Tensor], Tensor], L: Tensor) -> Tensor:
    """``dF/dL`` at ``L`` by ``torch.autograd`` in float64."""
    x = L.detach().to(torch.float64).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F(x), x)
    return g


def finite_difference_gradient(F: Callable[[Tensor], Tensor], L: Tensor,
                               h: float = 1e-6) -> Tensor:
    """``dF/dL`` at ``L`` by central differences in float64 (step ``h`` relative to each
    ``|L_t|``, at least ``h``)."""
    L = L.detach().to(torch.float64)
    out = torch.empty_like(L)
    for t in range(L.shape[0]):
        e = torch.zeros_like(L)
        step = h * max(1.0, abs(float(L[t])))
        e[t] = step
        with torch.no_grad():
            out[t] = (F(L + e) - F(L - e)) / (2 * step)
    return out


def max_loss_route_difference(make: Callable[[], Aggregator], steps: int = 4,
                              sync: bool = False) -> float:
    """Train two copies of a small network ``steps`` steps, one through the loss-only route
    (the default), one through the Jacobian (``capture="loop"``); every step's gradients and
    weights must agree (in float64, to rounding).  ``sync``: copy the first method's state into the
    second before training (seeded random methods).  Returns the largest gradient difference."""
    torch.manual_seed(2)
    net_a = Net().double()
    net_b = copy.deepcopy(net_a)
    fast = MultiTaskOptimizer(torch.optim.SGD(net_a.parameters(), lr=0.05),
                              shared=net_a.encoder, aggregator=make())
    slow = MultiTaskOptimizer(torch.optim.SGD(net_b.parameters(), lr=0.05),
                              shared=net_b.encoder, aggregator=make(), capture="loop")
    if sync:
        slow.aggregator.load_state_dict(fast.aggregator.state_dict())
    worst = 0.0
    for step in range(steps):
        x, ys = data(step)
        x, ys = x.double(), [y.double() for y in ys]
        for opt, net in ((fast, net_a), (slow, net_b)):
            opt.zero_grad()
            opt.backward([nn.functional.mse_loss(o, y) + 0.1 for o, y in zip(net(x), ys)])
        assert fast.last_capture == "losses" and slow.last_capture == "loop"
        for p, q in zip(net_a.parameters(), net_b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
            worst = max(worst, float((p.grad - q.grad).abs().max()))
        torch.testing.assert_close(fast.diagnostics["weights"], slow.diagnostics["weights"],
                                   rtol=1e-10, atol=1e-12)
        fast.step()
        slow.step()
    return worst
