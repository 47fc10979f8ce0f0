"""Deriving, exporting and rebuilding a branched architecture (CoNAL section 2.2, CoNAL-Pro 2.4).

An architecture over a chain of ``K`` modules and ``T`` tasks is a partition of the tasks into
*branches*.  A branch ``(tasks, b)`` uses the trunk (the all-shared modules ``1 .. b-1``, shared
by every task whose branch point is larger than the module's level) and then its own chain of
copies of modules ``b .. K``, shared by the tasks of the branch only.  ``b = K + 1`` (``= P``) is
the fully shared branch (an empty chain).

* CoNAL derives one branch per task (``alpha_t* = argmax_p alpha_t^(p)``), except that the tasks
  with ``p = P`` together form the fully shared branch.
* CoNAL-Pro's subgroups are branches of several tasks.
* Hard parameter sharing is one branch ``(all tasks, P)``; single-task learning is ``T``
  branches at ``b = 1``.

Modules that no task uses (trunk modules past the deepest branch point, specific copies before a
task's branch point, and every specific copy of a fully shared task) are not built.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .space import SearchSpace, count_parameters, reinitialize

__all__ = ["Architecture", "Branch", "BranchedNetwork", "Derived", "build_network", "derive"]

FORMAT = "torch_mtlgrad.conal.architecture/1"


@dataclass(frozen=True)
class Branch:
    """A set of tasks that leave the trunk at branch point ``branch_point`` (1-based) together."""

    tasks: tuple[int, ...]
    branch_point: int


@dataclass(frozen=True)
class Architecture:
    """A tree architecture: ``branches`` partition ``range(num_tasks)``.

    Branches are stored in a canonical order (deepest branch point first, then by first task),
    and the tasks of a branch sorted, so equal architectures compare and serialise equal.

    Example:
        >>> arch = Architecture.from_branch_points([3, 2, 3], num_modules=2)
        >>> arch.branch_points, arch.trunk_depth
        ([3, 2, 3], 2)
        >>> Architecture.from_json(arch.to_json()) == arch
        True
        >>> arch.levels()
        [[(0, 1, 2)], [(0, 2), (1,)]]
    """

    num_tasks: int
    num_modules: int
    branches: tuple[Branch, ...]

    def __post_init__(self) -> None:
        T, K = self.num_tasks, self.num_modules
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"num_tasks must be a positive int, got {T!r}")
        if not isinstance(K, int) or K < 1:
            raise ValueError(f"num_modules must be a positive int, got {K!r}")
        seen: list[int] = []
        canon = []
        for br in self.branches:
            tasks = tuple(sorted(int(t) for t in br.tasks))
            if not tasks:
                raise ValueError("a branch has no tasks")
            if not 1 <= int(br.branch_point) <= K + 1:
                raise ValueError(f"branch point {br.branch_point} is outside 1..{K + 1}")
            seen.extend(tasks)
            canon.append(Branch(tasks, int(br.branch_point)))
        if sorted(seen) != list(range(T)):
            raise ValueError(f"branches must partition the tasks 0..{T - 1} exactly once, got {sorted(seen)}")
        canon.sort(key=lambda b: (-b.branch_point, b.tasks[0]))
        object.__setattr__(self, "branches", tuple(canon))

    # Constructors ------------------------------------------------------------------------------
    @classmethod
    def from_branch_points(cls, branch_points: Sequence[int], num_modules: int) -> Architecture:
        """CoNAL's derived architecture: one branch per task, the ``p = P`` tasks fully shared."""
        P = num_modules + 1
        full = tuple(t for t, p in enumerate(branch_points) if int(p) == P)
        branches = [Branch((t,), int(p)) for t, p in enumerate(branch_points) if int(p) != P]
        if full:
            branches.append(Branch(full, P))
        return cls(len(branch_points), num_modules, tuple(branches))

    @classmethod
    def hard_sharing(cls, num_tasks: int, num_modules: int) -> Architecture:
        """Every module shared by every task (HPS)."""
        return cls(num_tasks, num_modules, (Branch(tuple(range(num_tasks)), num_modules + 1),))

    @classmethod
    def single_task(cls, num_tasks: int, num_modules: int) -> Architecture:
        """A separate network per task."""
        return cls(num_tasks, num_modules, tuple(Branch((t,), 1) for t in range(num_tasks)))

    # Views -------------------------------------------------------------------------------------
    @property
    def branch_points(self) -> list[int]:
        """The branch point of every task (1-based)."""
        out = [0] * self.num_tasks
        for br in self.branches:
            for t in br.tasks:
                out[t] = br.branch_point
        return out

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """The task groups (the branches' task sets), in canonical order."""
        return [br.tasks for br in self.branches]

    @property
    def trunk_depth(self) -> int:
        """Number of trunk modules any task uses: ``max_b (b - 1)``."""
        return max(br.branch_point for br in self.branches) - 1

    def levels(self) -> list[list[tuple[int, ...]]]:
        """For each module level ``1 .. K`` the partition of the tasks into module copies."""
        out = []
        for k in range(1, self.num_modules + 1):
            trunk = tuple(t for br in self.branches if br.branch_point > k for t in br.tasks)
            part = [tuple(sorted(trunk))] if trunk else []
            part += [br.tasks for br in self.branches if br.branch_point <= k]
            out.append(part)
        return out

    # JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``format``, ``num_tasks``, ``num_modules``, ``branches``)."""
        return {
            "format": FORMAT,
            "num_tasks": self.num_tasks,
            "num_modules": self.num_modules,
            "branches": [{"tasks": list(b.tasks), "branch_point": b.branch_point} for b in self.branches],
        }

    def to_json(self, **kwargs: Any) -> str:
        """The architecture as a small JSON document."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        """Inverse of :meth:`to_dict`.  The document is checked strictly before anything is built:
        an object with exactly the keys ``format``, ``num_tasks``, ``num_modules``, ``branches``;
        integers that are JSON integers (no strings, floats or booleans) within bounds
        (``num_tasks <= MAX_TASKS``, ``num_modules <= MAX_MODULES``); each branch an object with
        exactly ``tasks`` (a list of integers) and ``branch_point`` (an integer).  Anything else
        is a ``ValueError`` naming the field."""
        if not isinstance(data, dict):
            raise ValueError(f"an architecture document must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"not a CoNAL architecture document (format {data.get('format')!r}, expected {FORMAT!r})")
        try:
            return cls._from_checked_dict(data)
        except ValueError as err:
            raise ValueError(f"malformed architecture document: {err}") from None

    @classmethod
    def _from_checked_dict(cls, data: dict[str, Any]) -> Architecture:
        keys = {"format", "num_tasks", "num_modules", "branches"}
        if set(data) != keys:
            raise ValueError(f"architecture document keys must be {sorted(keys)}, got {sorted(map(str, data))}")
        T = _strict_int(data["num_tasks"], "num_tasks", 1, MAX_TASKS)
        K = _strict_int(data["num_modules"], "num_modules", 1, MAX_MODULES)
        raw = data["branches"]
        if not isinstance(raw, list) or len(raw) > T:
            raise ValueError(f"branches must be a list of at most num_tasks={T} objects")
        branches = []
        for i, b in enumerate(raw):
            if not isinstance(b, dict) or set(b) != {"tasks", "branch_point"}:
                raise ValueError(f"branch {i} must be an object with exactly 'tasks' and 'branch_point'")
            tasks = b["tasks"]
            if not isinstance(tasks, list):
                raise ValueError(f"branch {i}: tasks must be a list of integers")
            ids = tuple(_strict_int(t, f"branch {i} task", 0, T - 1) for t in tasks)
            point = _strict_int(b["branch_point"], f"branch {i} branch_point", 1, K + 1)
            branches.append(Branch(ids, point))
        return cls(T, K, tuple(branches))

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        """Inverse of :meth:`to_json`; malformed or hostile text is a ``ValueError``."""
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("architecture document is nested too deeply") from None
        return cls.from_dict(data)


MAX_TASKS = 100_000
MAX_MODULES = 100_000


def _strict_int(value: Any, name: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise ValueError(f"{name} must be a JSON integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


class BranchedNetwork(nn.Module):
    """The plain ``nn.Module`` of an :class:`Architecture`.

    ``trunk[k]`` is the shared module of level ``k + 1`` (only the ``trunk_depth`` used ones),
    ``chains[i]`` the module copies of ``architecture.branches[i]`` (levels ``b .. K``), and
    ``heads[t]`` the decoder of task ``t`` (optional).  Each trunk prefix is computed once; each
    branch chain once for all of its tasks.

    Build it with :func:`build_network` or :func:`derive`.
    """

    def __init__(
        self,
        architecture: Architecture,
        trunk: Sequence[nn.Module],
        chains: Sequence[Sequence[nn.Module]],
        heads: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        arch = architecture
        if len(trunk) != arch.trunk_depth:
            raise ValueError(f"the architecture uses {arch.trunk_depth} trunk modules, got {len(trunk)}")
        if len(chains) != len(arch.branches):
            raise ValueError(f"the architecture has {len(arch.branches)} branches, got {len(chains)} chains")
        for br, ch in zip(arch.branches, chains):
            need = arch.num_modules - br.branch_point + 1
            if len(ch) != need:
                raise ValueError(f"branch {br.tasks} at point {br.branch_point} needs {need} modules, got {len(ch)}")
        if heads is not None and len(heads) != arch.num_tasks:
            raise ValueError(f"got {len(heads)} heads for {arch.num_tasks} tasks")
        self.architecture = arch
        self.trunk = nn.ModuleList(trunk)
        self.chains = nn.ModuleList(nn.ModuleList(ch) for ch in chains)
        self.heads = nn.ModuleList(heads) if heads is not None else None

    @property
    def num_tasks(self) -> int:
        return self.architecture.num_tasks

    def encode(self, x: Tensor) -> list[Tensor]:
        """The encoder output of every task."""
        zs = [x]
        for f in self.trunk:
            zs.append(f(zs[-1]))
        outs: list[Tensor | None] = [None] * self.num_tasks
        for br, chain in zip(self.architecture.branches, self.chains):
            u = zs[br.branch_point - 1]
            for h in chain:
                u = h(u)
            for t in br.tasks:
                outs[t] = u
        return outs  # type: ignore[return-value]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Per-task predictions ``g_t(encoder_t(x))`` (encoder outputs without heads)."""
        outs = self.encode(x)
        if self.heads is None:
            return outs
        return [g(o) for g, o in zip(self.heads, outs)]

    def module_tasks(self) -> list[tuple[nn.Module, tuple[int, ...]]]:
        """Every trunk and chain module with the tasks that use it."""
        out: list[tuple[nn.Module, tuple[int, ...]]] = []
        for k, f in enumerate(self.trunk, start=1):
            out.append((f, tuple(t for br in self.architecture.branches if br.branch_point > k for t in br.tasks)))
        for br, chain in zip(self.architecture.branches, self.chains):
            out.extend((h, br.tasks) for h in chain)
        return out

    def shared_modules(self) -> list[nn.Module]:
        """Trunk and chain modules used by two tasks or more, input to output within a path."""
        return [m for m, tasks in self.module_tasks() if len(tasks) >= 2]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the modules used by two tasks or more (what an aggregator combines)."""
        return [p for m in self.shared_modules() for p in m.parameters()]


def _copy_chain(modules: Sequence[nn.Module], reinit: bool) -> list[nn.Module]:
    out = [copy.deepcopy(m) for m in modules]
    if reinit:
        for m in out:
            reinitialize(m)
    return out


def build_network(
    architecture: Architecture,
    modules: Sequence[nn.Module],
    heads: Sequence[nn.Module] | None = None,
    *,
    reinit: bool = False,
) -> BranchedNetwork:
    """Build the network of ``architecture`` from template modules (deep copies).

    Every trunk module and every branch chain is a copy of ``modules`` (the ``K`` templates of
    the chain, e.g. the search space's shared modules), heads are copies of ``heads``.  With
    ``reinit=True`` every copy is re-initialised (retraining from scratch); otherwise the copies
    carry the templates' values, so ``load_state_dict`` of a network with the same architecture
    reproduces it exactly.

    Example:
        >>> arch = Architecture.from_json(
        ...     '{"format": "torch_mtlgrad.conal.architecture/1", "num_tasks": 2, "num_modules": 2,'
        ...     ' "branches": [{"tasks": [0], "branch_point": 3}, {"tasks": [1], "branch_point": 2}]}')
        >>> net = build_network(arch, [torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])
        >>> len(net.trunk), [len(c) for c in net.chains]
        (2, [0, 1])
        >>> [tuple(o.shape) for o in net(torch.randn(4, 3))]
        [(4, 3), (4, 3)]
    """
    modules = list(modules)
    if len(modules) != architecture.num_modules:
        raise ValueError(f"the architecture has {architecture.num_modules} modules, got {len(modules)} templates")
    trunk = _copy_chain(modules[: architecture.trunk_depth], reinit)
    chains = [_copy_chain(modules[br.branch_point - 1 :], reinit) for br in architecture.branches]
    hs = _copy_chain(list(heads), reinit) if heads is not None else None
    return BranchedNetwork(architecture, trunk, chains, hs)


@dataclass
class Derived:
    """What :func:`derive` returns: the architecture, its network and the parameter counts.

    ``params_before`` counts the weights of the search space (shared chain, all specific copies
    and heads; ``alpha`` excluded), ``params_after`` those of ``network``.
    """

    architecture: Architecture
    network: BranchedNetwork
    params_before: int
    params_after: int


def derive(space: SearchSpace) -> Derived:
    """Derive the final architecture from a trained :class:`SearchSpace` (CoNAL section 2.2).

    ``alpha_t* = argmax_p alpha_t^(p)`` per task (ties go to the deeper branch point, i.e. more
    sharing), the modules no task uses are removed, and the network is built from copies of the
    trained modules: the trunk from ``space.shared``, task ``t``'s chain from ``space.specific[t]``,
    the heads from ``space.heads``.  Retrain it from scratch with :func:`reinitialize` (or
    :func:`build_network` with ``reinit=True`` from the architecture).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> space = SearchSpace([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)], num_tasks=2)
        >>> with torch.no_grad():
        ...     _ = space.alpha.copy_(torch.tensor([[0., 0., 5.], [0., 5., 0.]]))
        >>> d = derive(space)
        >>> d.architecture.branch_points, d.params_before, d.params_after
        ([3, 2], 72, 36)
    """
    if not isinstance(space, SearchSpace):
        raise TypeError(f"derive() takes a SearchSpace, got {type(space).__name__}")
    with torch.no_grad():
        a = space.alpha.detach()
        P = a.shape[1]
        # argmax with ties to the largest index: flip, take the first maximum, map back
        points = (P - torch.argmax(a.flip(-1), dim=-1)).tolist()
    arch = Architecture.from_branch_points([int(p) for p in points], space.num_modules)
    trunk = _copy_chain(list(space.shared[: arch.trunk_depth]), False)
    chains = []
    for br in arch.branches:
        (t,) = br.tasks[:1]
        chains.append(_copy_chain(list(space.specific[t][br.branch_point - 1 :]), False))
    heads = _copy_chain(list(space.heads), False) if space.heads is not None else None
    net = BranchedNetwork(arch, trunk, chains, heads)
    before = count_parameters(space) - space.alpha.numel()
    return Derived(arch, net, before, count_parameters(net))
