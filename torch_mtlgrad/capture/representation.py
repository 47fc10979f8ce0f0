"""The representation-gradient mode (an approximation, as MGDA-UB in Sener and Koltun,
*Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018, section 3.3): the aggregator
combines the tasks' gradients with respect to the shared features ``z`` (``Z``, ``[T, F]``), and
the encoder is backpropagated once with the combined gradient (:func:`encoder_vjp`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .compiled import through_compiled
from .layout import FlatLayout

__all__ = ["encoder_vjp"]


@through_compiled
def encoder_vjp(features: Tensor, direction: Tensor, layout: FlatLayout, out: Tensor,
                retain_graph: bool = False) -> None:
    """``out`` ([D]) <- gradient of ``<features, direction>`` with respect to the shared parameters.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False); z = lin(torch.ones(1, 2))
        >>> out = torch.empty(2)
        >>> encoder_vjp(z, torch.tensor([3.0]), FlatLayout([lin.weight]), out)
        >>> out.tolist()
        [3.0, 3.0]
    """
    grads = torch.autograd.grad(features, layout.params,
                                grad_outputs=direction.view_as(features).to(features.dtype),
                                retain_graph=retain_graph, allow_unused=True)
    layout.fill_row(out, grads)
