"""Retraining a derived architecture from scratch (CoNAL section 2.2, eq. 3; section 3.5).

Eq. 3 trains the derived network on ``sum_t w_t^i L_t`` with ``w^i`` drawn uniformly from
``[0, 1]^T`` and normalised to sum to 1 at every iteration (random loss weighting, RLW, Lin et
al. 2022).  Section 3.5 swaps in gradient manipulation methods (PCGrad, CAGrad).  Here both are
one thing: a :class:`~torch_mtlgrad.MultiTaskOptimizer` over the derived network with the
aggregator of your choice (``"rlw"`` by default, any registered name or an ``Aggregator``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..aggregators import Aggregator, available, get
from ..optimizer import MultiTaskOptimizer
from .derive import BranchedNetwork
from .space import reinitialize

__all__ = ["reinitialize", "retrain_optimizer"]


def retrain_optimizer(
    network: BranchedNetwork,
    optimizer: torch.optim.Optimizer,
    aggregator: str | Aggregator = "rlw",
    *,
    shared: str = "multi_task",
    plugins: Sequence[Any] = (),
    **aggregator_kwargs: Any,
) -> MultiTaskOptimizer:
    """Wrap ``optimizer`` (over ``network.parameters()``) for retraining the derived network.

    Args:
        network: the derived network (re-initialise it first with :func:`reinitialize` for
            training "from scratch", as the paper does).
        optimizer: a ``torch.optim`` optimizer holding all of ``network``'s parameters.
        aggregator: ``"rlw"`` (eq. 3; needs the ``rlw`` aggregator to be registered), any other
            registered name (``torch_mtlgrad.aggregators.available()``) or an ``Aggregator``.
        shared: which parameters are combined by the aggregator.

            * ``"multi_task"`` (default): the modules used by two tasks or more
              (:meth:`BranchedNetwork.shared_parameters`); the others (single-task chains, heads)
              get their task's gradient, as ``sum(losses).backward()`` gives them.  With RLW this
              is eq. 3 on the shared parameters; the task-specific ones are not scaled by
              ``w_t`` (their scale is then independent of the random draw).
            * ``"all"``: every parameter goes through the aggregator, which is eq. 3 literally for
              RLW (each task-specific block scaled by its ``w_t``), at the memory cost of a
              ``[T, all parameters]`` Jacobian.
        plugins: gradient plugins for the optimizer (e.g. a ``ConflictNoticing(...,
            zero=False)`` on the shared modules to measure their conflict ratio).
        aggregator_kwargs: passed to ``aggregators.get`` when ``aggregator`` is a name.

    Example:
        >>> from torch_mtlgrad.conal import Architecture, build_network
        >>> net = build_network(Architecture.from_branch_points([3, 3, 2], 2),
        ...                     [torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])
        >>> opt = retrain_optimizer(net, torch.optim.SGD(net.parameters(), lr=0.1), "mean")
        >>> opt.layout.numel  # the two trunk modules, shared by tasks 0, 1 (and 2 for the first)
        24
    """
    if not isinstance(network, BranchedNetwork):
        raise TypeError(f"network must be a BranchedNetwork (from derive/build_network), got {type(network).__name__}")
    if shared not in ("multi_task", "all"):
        raise ValueError(f"shared must be 'multi_task' or 'all', got {shared!r}")
    if isinstance(aggregator, str):
        name = aggregator.strip().lower()
        base = name.split("+", 1)[0]
        if base not in available() and base == "rlw":
            raise ValueError(
                "the 'rlw' aggregator is not registered in torch_mtlgrad.aggregators; pass another "
                f"name ({', '.join(a for a in available() if '+' not in a)}) or an Aggregator"
            )
        aggregator = get(name, **aggregator_kwargs)
    elif aggregator_kwargs:
        raise ValueError("aggregator_kwargs are only for an aggregator given by name")
    params: list[nn.Parameter] = (
        network.shared_parameters() if shared == "multi_task" else list(network.parameters())
    )
    if not params:
        raise ValueError(
            "the architecture shares no module between two tasks (separate networks): there is "
            "nothing to aggregate; train it with a plain optimizer on sum(losses), or use shared='all'"
        )
    return MultiTaskOptimizer(optimizer, shared=params, aggregator=aggregator, num_tasks=network.num_tasks,
                              plugins=plugins)
