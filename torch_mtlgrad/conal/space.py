"""The CoNAL search space (paper section 2.1-2.2, the equation for ``o_t(x, alpha_t)``).

A chain of ``K = P - 1`` all-shared modules ``f_S^1 .. f_S^K``, for each task ``t`` a
purely-specific copy ``h_t^1 .. h_t^K`` of the same chain, and architecture parameters
``alpha`` of shape ``[T, P]``.  Branch point ``p`` (1-based, ``1 <= p <= P``) means: shared
modules ``1 .. p-1`` then task ``t``'s own modules ``p .. K``; ``p = P`` is fully shared, ``p = 1``
is a separate network.  Task ``t``'s encoder output is

    o_t(x) = sum_p softmax(alpha_t)_p h_t(f_S(x, p), p)

where ``f_S(x, p)`` is the output of shared module ``p - 1`` (``x`` for ``p = 1``).  One copy
per task serves all of its branch points, and each shared prefix ``f_S(x, p)`` is computed once
per forward.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["SearchSpace", "count_parameters", "reinitialize"]

log = logging.getLogger(__name__)


def reinitialize(module: nn.Module) -> nn.Module:
    """Call ``reset_parameters()`` on every submodule that has one (in place); returns ``module``.

    This is the "from scratch" of the paper's retraining step.  It uses the global RNG, so
    ``torch.manual_seed`` makes it reproducible.  Submodules without ``reset_parameters`` keep
    their values (a warning is logged for any that hold parameters directly).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(2, 2)
        >>> before = lin.weight.clone()
        >>> _ = reinitialize(lin)
        >>> bool((lin.weight != before).any())
        True
    """
    for m in module.modules():
        fn = getattr(m, "reset_parameters", None)
        if callable(fn):
            fn()
        elif any(True for _ in m.parameters(recurse=False)):
            log.warning(
                "%s holds parameters but has no reset_parameters(); kept as is", type(m).__name__
            )
    return module


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module``.

    Example:
        >>> count_parameters(torch.nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters())


class SearchSpace(nn.Module):
    """CoNAL search space over a chain of shared modules for ``num_tasks`` tasks.

    Args:
        modules: the shared chain ``f_S^1 .. f_S^K`` in input-to-output order.  These module
            objects become ``self.shared`` (not copies), so a
            :class:`~torch_mtlgrad.conal.ConflictNoticing` built on them sees their gradients.
        num_tasks: ``T``.
        heads: optional task decoders ``g_1 .. g_T``; when given, :meth:`forward` returns
            ``g_t(o_t)``, otherwise ``o_t``.
        reset_copies: ``False`` (default) makes the purely-specific copies exact copies of the
            shared modules (the paper starts every module from the same pre-trained weights);
            ``True`` re-initialises the copies.
        stack_branches: evaluate each specific module once per level on the inputs of all
            branch points stacked along dim 0, instead of once per branch point.  Faster for
            deep chains, and the same result for modules that treat samples independently (not
            for BatchNorm in training mode, whose batch statistics would mix branches).

    Attributes:
        shared: ``nn.ModuleList`` of the ``K`` shared modules.
        specific: ``nn.ModuleList`` of ``T`` ``nn.ModuleList`` s, ``specific[t][k]`` = ``h_t^{k+1}``.
        heads: ``nn.ModuleList`` of decoders or ``None``.
        alpha: ``[T, P]`` architecture parameters, zero (uniform branch weights) at start.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> chain = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]
        >>> space = SearchSpace(chain, num_tasks=3)
        >>> tuple(space.alpha.shape), space.num_branch_points
        ((3, 3), 3)
        >>> [tuple(o.shape) for o in space(torch.randn(5, 4))]
        [(5, 4), (5, 4), (5, 4)]
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        num_tasks: int,
        heads: Sequence[nn.Module] | None = None,
        *,
        reset_copies: bool = False,
        stack_branches: bool = False,
    ) -> None:
        super().__init__()
        modules = list(modules)
        if not modules:
            raise ValueError("the search space needs at least one shared module")
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"modules[{i}] is a {type(m).__name__}, not an nn.Module")
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if heads is not None:
            heads = list(heads)
            if len(heads) != num_tasks:
                raise ValueError(f"got {len(heads)} heads for {num_tasks} tasks")
        self.num_tasks = num_tasks
        self.num_modules = len(modules)
        self.num_branch_points = len(modules) + 1
        self.stack_branches = bool(stack_branches)
        self.shared = nn.ModuleList(modules)
        copies = []
        for _ in range(num_tasks):
            chain = nn.ModuleList(copy.deepcopy(m) for m in modules)
            if reset_copies:
                reinitialize(chain)
            copies.append(chain)
        self.specific = nn.ModuleList(copies)
        self.heads = nn.ModuleList(heads) if heads is not None else None
        p0 = next(self.shared.parameters(), None)
        self.alpha = nn.Parameter(
            torch.zeros(
                num_tasks,
                self.num_branch_points,
                device=p0.device if p0 is not None else None,
                dtype=p0.dtype if p0 is not None and p0.is_floating_point() else None,
            )
        )

    # Parameters ------------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters (``[alpha]``), for the upper-level optimizer."""
        return [self.alpha]

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter except ``alpha`` (shared, specific and heads), for the lower level."""
        for p in self.parameters():
            if p is not self.alpha:
                yield p

    def branch_weights(self) -> Tensor:
        """``softmax(alpha_t)`` for every task, ``[T, P]``."""
        return torch.softmax(self.alpha, dim=-1)

    # Forward ---------------------------------------------------------------------------------
    def shared_prefixes(self, x: Tensor) -> list[Tensor]:
        """``[f_S(x, 1), .., f_S(x, P)]``: the input and the output of every shared module."""
        zs = [x]
        for f in self.shared:
            zs.append(f(zs[-1]))
        return zs

    def branch_output(self, x: Tensor, task: int, p: int) -> Tensor:
        """``h_t(f_S(x, p), p)`` computed on its own (reference and inspection; 1-based ``p``)."""
        if not 1 <= p <= self.num_branch_points:
            raise ValueError(f"branch point must be in 1..{self.num_branch_points}, got {p}")
        z = x
        for f in self.shared[: p - 1]:
            z = f(z)
        for h in self.specific[task][p - 1 :]:
            z = h(z)
        return z

    def encode(self, x: Tensor) -> list[Tensor]:
        """``[o_1(x), .., o_T(x)]``, the softmax(alpha)-weighted sums over branch points."""
        zs = self.shared_prefixes(x)
        w = self.branch_weights()
        K = self.num_modules
        outs = []
        for t in range(self.num_tasks):
            if self.stack_branches:
                branch = self._stacked_branches(zs, t)
            else:
                branch = []
                for p in range(1, K + 1):
                    u = zs[p - 1]
                    for h in self.specific[t][p - 1 :]:
                        u = h(u)
                    branch.append(u)
            branch.append(zs[K])  # p = P: fully shared
            o = w[t, 0] * branch[0]
            for p in range(1, K + 1):
                o = o + w[t, p] * branch[p]
            outs.append(o)
        return outs

    def _stacked_branches(self, zs: list[Tensor], t: int) -> list[Tensor]:
        """Branch outputs ``p = 1 .. K`` of task ``t`` with one call per specific module."""
        K = self.num_modules
        running: list[Tensor] = []  # outputs so far of branches 1..j-1 after level j-1
        for j in range(1, K + 1):
            inputs = running + [zs[j - 1]]  # branch j enters the specific chain at level j
            sizes = [u.shape[0] for u in inputs]
            out = self.specific[t][j - 1](torch.cat(inputs, dim=0))
            running = list(torch.split(out, sizes, dim=0))
        return running

    def forward(self, x: Tensor) -> list[Tensor]:
        """Per-task predictions ``g_t(o_t(x))`` (or ``o_t(x)`` without heads)."""
        outs = self.encode(x)
        if self.heads is None:
            return outs
        return [g(o) for g, o in zip(self.heads, outs)]

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, num_modules={self.num_modules}"
