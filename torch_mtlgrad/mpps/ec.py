"""Exclusive capacity (EC) of MPPS mask distributions, and per-layer task shares.

Shi et al., ICCV 2023, section 3.3: the EC of a neuron with sharing vector ``phi in [0, 1]^T`` is

    EC(phi) = 1 - (sum_t phi[t] - max_t phi[t]) / (T - 1),

i.e. one minus the mean usage of the neuron by its ``T - 1`` guests (the owner always uses it).
The EC of a layer or of the whole distribution is the mean over its neurons.  It lies in
``[0, 1]``: a neuron used by its owner only has EC 1 (fully exclusive), a neuron every task uses
has EC 0 (fully shared, hard parameter sharing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["distribution_ec", "layer_ec", "neuron_ec", "task_shares"]


def _check_phi(phi: Tensor, name: str = "phi") -> None:
    if not isinstance(phi, Tensor) or not phi.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape [..., T]")
    if phi.dim() < 1 or phi.shape[-1] < 2:
        raise ValueError(
            f"{name} must have shape [..., T] with T >= 2 tasks, got {tuple(phi.shape)}"
        )


def neuron_ec(phi: Tensor) -> Tensor:
    """EC of every neuron: ``1 - (sum_t phi[t] - max_t phi[t]) / (T - 1)`` over the last dim.

    Args:
        phi: ``[..., T]`` probabilities, ``T >= 2``.

    Returns:
        ``[...]`` tensor, in ``[0, 1]`` when ``phi`` is.

    Example:
        >>> neuron_ec(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.9, 0.5, 0.1]]))
        tensor([1.0000, 0.0000, 0.7000])
    """
    _check_phi(phi)
    t = phi.shape[-1]
    return 1.0 - (phi.sum(-1) - phi.amax(-1)) / (t - 1)


def layer_ec(phi: Tensor) -> Tensor:
    """EC of a layer: the mean of :func:`neuron_ec` over its neurons (``phi`` is ``[N, T]``).

    Example:
        >>> layer_ec(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
        tensor(0.7500)
    """
    _check_phi(phi)
    return neuron_ec(phi).mean()


def distribution_ec(phis: Sequence[Tensor] | Tensor) -> Tensor:
    """EC of the whole distribution: the mean of :func:`neuron_ec` over all neurons of all layers.

    Every neuron counts once, so a wide layer weighs more than a narrow one.

    Example:
        >>> distribution_ec([torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])])
        tensor(0.3333)
    """
    if isinstance(phis, Tensor):
        return layer_ec(phis)
    if len(phis) == 0:
        raise ValueError("distribution_ec needs at least one layer")
    for i, p in enumerate(phis):
        _check_phi(p, f"phis[{i}]")
    return torch.cat([neuron_ec(p).reshape(-1) for p in phis]).mean()


def task_shares(phi: Tensor) -> Tensor:
    """Share matrix of one layer: ``S[o, t]`` = mean of ``phi[n, t]`` over the neurons owned by ``o``.

    Row ``o`` tells how much each task uses the neurons task ``o`` owns; the diagonal is the
    owners' own probability.  The paper's Figure 6 plots ``S[0, 1] / (S[0, 1] + S[0, 2])`` per
    layer.  Rows of tasks that own no neuron of the layer are NaN.

    Example:
        >>> task_shares(torch.tensor([[0.9, 0.3], [0.8, 0.1], [0.2, 0.7]]))
        tensor([[0.8500, 0.2000],
                [0.2000, 0.7000]])
    """
    _check_phi(phi)
    if phi.dim() != 2:
        raise ValueError(f"phi must have shape [N, T], got {tuple(phi.shape)}")
    t = phi.shape[1]
    onehot = torch.nn.functional.one_hot(phi.argmax(-1), t).to(phi.dtype)  # [N, T]
    counts = onehot.sum(0)  # [T]
    sums = onehot.T @ phi  # [T, T]
    return sums / counts.unsqueeze(1)
