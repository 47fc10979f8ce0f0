"""CoNAL-Pro: the progressive, stage-by-stage search of CoNAL section 2.4.

With ``K`` modules (``P = K + 1`` branch points), stage ``s = 1, 2, ..`` searches over the tasks
still unassigned (``R``, all tasks at first) and two branch points, ``b = K + 2 - s`` and ``b - 1``:

* branch ``b``: the trunk ``f_S^1 .. f_S^{b-1}`` and then a *group chain* of modules ``b .. K``
  shared by all the tasks of the stage (empty at stage 1: fully shared);
* branch ``b - 1``: the trunk up to ``f_S^{b-2}`` and then the task's own modules ``b-1 .. K``.

Each task of the stage has a 2-entry ``alpha`` and its encoder output is the softmax-weighted
sum of the two branches (the CoNAL relaxation restricted to the stage).  Both the group chain and
the own chains of a stage start as copies of the trunk modules at their levels, so neither branch
starts ahead of the other.  The weight step runs conflict noticing (eq. 5) on the modules the
stage's tasks share (by default the whole path: trunk ``1 .. b-1`` and the group chain; see
``notice``).  At the end of the stage the tasks whose ``argmax alpha`` is branch ``b`` form a
subgroup that branches at ``b`` and leaves the search; the others go on to the next stage with a
group chain one module longer.  After the stage with ``b = 2``, tasks still left get separate
networks (branch point 1).  A stage holds own copies of levels ``b-1 .. K`` only, for the tasks
still searching, instead of CoNAL's ``T`` full chains.

Reading choices (the paper leaves them open): every new module is a
copy of the trunk module at its level as trained so far (own modules do not carry over from one
stage to the next: a carried-over own chain would start ahead of the fresh group chain); ties in
``alpha`` go to the shared branch, and ``margin`` widens that tie band.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..aggregators import Aggregator
from ..optimizer import MultiTaskOptimizer
from .conflict import ConflictNoticing
from .derive import Architecture, Branch, BranchedNetwork
from .search import first_order_alpha_step

__all__ = ["ProResult", "ProStage", "ProgressiveSearch"]

OptFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def default_weight_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``Adam(params, lr=1e-3)``."""
    return torch.optim.Adam(params, lr=1e-3)


def default_alpha_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``Adam(params, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)`` (DARTS)."""
    return torch.optim.Adam(params, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)


class ProStage(nn.Module):
    """The search space of one CoNAL-Pro stage (see the module docstring).

    ``forward(x)`` returns the predictions of ``tasks`` in that order.  ``alpha[i] = (shared,
    own)`` for ``tasks[i]``.  The trunk and heads are the search's own modules (not copies).
    """

    def __init__(
        self,
        trunk: nn.ModuleList,
        branch_point: int,
        tasks: Sequence[int],
        group_chain: Sequence[nn.Module],
        own_chains: Sequence[Sequence[nn.Module]],
        heads: Sequence[nn.Module] | None,
    ) -> None:
        super().__init__()
        K = len(trunk)
        b = branch_point
        if not 2 <= b <= K + 1:
            raise ValueError(f"a stage's shared branch point must be in 2..{K + 1}, got {b}")
        if len(group_chain) != K - b + 1:
            raise ValueError(f"group chain for branch point {b} needs {K - b + 1} modules, got {len(group_chain)}")
        for t, ch in zip(tasks, own_chains):
            if len(ch) != K - b + 2:
                raise ValueError(f"own chain of task {t} needs {K - b + 2} modules, got {len(ch)}")
        self.branch_point = b
        self.tasks = list(tasks)
        self.trunk = trunk
        self.group_chain = nn.ModuleList(group_chain)
        self.own = nn.ModuleList(nn.ModuleList(ch) for ch in own_chains)
        self.heads = nn.ModuleList(heads) if heads is not None else None
        p0 = next(trunk.parameters())
        self.alpha = nn.Parameter(torch.zeros(len(self.tasks), 2, device=p0.device, dtype=p0.dtype))

    @property
    def decision_module(self) -> nn.Module:
        """``f_S^{b-1}``: the trunk module whose sharing this stage decides."""
        return self.trunk[self.branch_point - 2]

    def shared_modules(self) -> list[nn.Module]:
        """Modules every task of the stage uses: trunk ``1 .. b-1`` and the group chain."""
        return [*self.trunk[: self.branch_point - 1], *self.group_chain]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Parameters of the weight step: shared modules, own chains, heads of the stage's tasks."""
        mods: list[nn.Module] = [*self.shared_modules(), *self.own]
        if self.heads is not None:
            mods.append(self.heads)
        return [p for m in mods for p in m.parameters()]

    def forward(self, x: Tensor) -> list[Tensor]:
        b = self.branch_point
        z = x
        for f in self.trunk[: b - 2]:
            z = f(z)
        u = self.decision_module(z)
        for h in self.group_chain:
            u = h(u)
        w = torch.softmax(self.alpha, dim=-1)
        outs = []
        for i, chain in enumerate(self.own):
            v = z
            for h in chain:
                v = h(v)
            o = w[i, 0] * u + w[i, 1] * v
            outs.append(self.heads[i](o) if self.heads is not None else o)
        return outs


@dataclass
class ProResult:
    """What CoNAL-Pro found: the groups, the tree architecture and its network.

    ``stages`` holds, per stage, the branch point, the tasks, the final branch weights and the
    conflict diagnostics (``ConflictNoticing.to_dict()``).
    """

    groups: list[tuple[int, ...]]
    architecture: Architecture
    network: BranchedNetwork
    stages: list[dict[str, Any]] = field(default_factory=list)


class ProgressiveSearch:
    """Drive CoNAL-Pro stage by stage, from your own loop or with :meth:`run`.

    Args:
        modules: the chain ``f_S^1 .. f_S^K`` (pre-trained, as Algorithm 1 assumes); they are
            trained in place as the trunk.
        num_tasks: ``T``.
        heads: task decoders ``g_1 .. g_T`` (optional), trained in place.
        weight_optimizer: factory ``params -> Optimizer`` for each stage's weight step
            (default ``Adam(lr=1e-3)``).
        alpha_optimizer: factory for each stage's ``alpha`` (default DARTS' ``Adam(lr=3e-4,
            betas=(0.5, 0.999), weight_decay=1e-3)``).
        aggregator: how the kept shared columns are combined (``"sum"``: eq. 5).
        notice: which modules conflict noticing (eq. 5) covers in a stage.  ``"path"`` (default):
            every module the stage's tasks share, input to output (trunk ``1 .. b-1`` then the
            group chain), i.e. eq. 5 on the stage's shared path; ``"chain"``: the decision module
            and the group chain; ``"decision"``: the decision module only (the paper's "only the
            gradient conflict of the last all-shared module needs to be calculated"; cheapest).
            With ``"decision"``/``"chain"`` the trunk below the decision module keeps training on
            the sum of the stage's losses while the decision module is frozen by conflicts, so
            the shared branch degrades under the tasks that want it; ``"path"`` avoids that.
        margin: a task leaves the shared branch only if its own branch's weight exceeds the
            shared one's by more than ``margin`` (``0``: the paper's argmax, ties to sharing).
            The two branches start as equal copies, so a task served equally well by both sits
            near a tie that noise decides; a small margin (e.g. 0.1) keeps it shared.
        window: conflict-diagnostics window.

    Loop (``tasks`` and the outputs of ``space`` are in the same order)::

        while not pro.done:
            for _ in range(steps):
                pro.step(lambda: losses(pro.space(x_val), pro.tasks),
                         lambda: losses(pro.space(x_tr), pro.tasks))
            pro.end_stage()
        result = pro.result()

    Example:
        >>> _ = torch.manual_seed(0)
        >>> pro = ProgressiveSearch([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], num_tasks=3)
        >>> pro.stage, pro.space.branch_point, pro.tasks
        (1, 3, [0, 1, 2])
        >>> with torch.no_grad():
        ...     _ = pro.space.alpha.copy_(torch.tensor([[1., 0.], [0., 1.], [1., 0.]]))
        >>> pro.end_stage()
        (0, 2)
        >>> pro.stage, pro.space.branch_point, pro.tasks
        (2, 2, [1])
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        num_tasks: int,
        heads: Sequence[nn.Module] | None = None,
        *,
        weight_optimizer: OptFactory = default_weight_optimizer,
        alpha_optimizer: OptFactory = default_alpha_optimizer,
        aggregator: str | Aggregator = "sum",
        notice: str = "path",
        margin: float = 0.0,
        window: int = 100,
    ) -> None:
        modules = list(modules)
        if not modules:
            raise ValueError("CoNAL-Pro needs at least one shared module")
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if heads is not None and len(heads) != num_tasks:
            raise ValueError(f"got {len(heads)} heads for {num_tasks} tasks")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin!r}")
        if notice not in ("path", "chain", "decision"):
            raise ValueError(f"notice must be 'path', 'chain' or 'decision', got {notice!r}")
        self.num_tasks = num_tasks
        self.num_modules = len(modules)
        self.trunk = nn.ModuleList(modules)
        self.heads = nn.ModuleList(heads) if heads is not None else None
        self.weight_factory = weight_optimizer
        self.alpha_factory = alpha_optimizer
        self.aggregator = aggregator
        self.notice = notice
        self.margin = float(margin)
        self.window = window
        self.branches: list[Branch] = []
        self.group_chains: list[list[nn.Module]] = []  # parallel to self.branches
        self.stages: list[dict[str, Any]] = []
        self.stage = 1
        self._remaining = list(range(num_tasks))
        self._own: dict[int, list[nn.Module]] = {t: [] for t in self._remaining}
        self._build_stage()

    # Stage construction --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once every task is assigned to a branch."""
        return not self._remaining

    @property
    def tasks(self) -> list[int]:
        """Tasks of the current stage, in the order of ``space``'s outputs and ``alpha`` rows."""
        return list(self._remaining)

    def _build_stage(self) -> None:
        K = self.num_modules
        b = K + 2 - self.stage
        copy_of = lambda k: copy.deepcopy(self.trunk[k - 1])
        group = [copy_of(k) for k in range(b, K + 1)]
        for t in self._remaining:
            self._own[t] = [copy_of(k) for k in range(b - 1, K + 1)]
        heads = [self.heads[t] for t in self._remaining] if self.heads is not None else None
        self.space = ProStage(self.trunk, b, self._remaining, group, [self._own[t] for t in self._remaining], heads)
        if self.notice == "path":
            notice_mods = self.space.shared_modules()
        else:
            notice_mods = [self.space.decision_module] + (list(self.space.group_chain) if self.notice == "chain" else [])
        self.noticing = ConflictNoticing(notice_mods, window=self.window)
        shared = [p for m in self.space.shared_modules() for p in m.parameters()]
        self.weight_optimizer = MultiTaskOptimizer(
            self.weight_factory(self.space.weight_parameters()), shared=shared,
            aggregator=self.aggregator, plugins=[self.noticing], num_tasks=len(self._remaining),
        )
        self.alpha_optimizer = self.alpha_factory([self.space.alpha])

    # Steps ---------------------------------------------------------------------------------------
    def _need_running(self) -> None:
        if self.done:
            raise RuntimeError("CoNAL-Pro is done: every task is assigned (call result())")

    def alpha_step(self, val_losses: Sequence[Tensor]) -> Tensor:
        """Upper-level step on the stage's ``alpha`` (mean of the stage tasks' losses)."""
        self._need_running()
        losses = list(val_losses)
        if len(losses) != len(self._remaining):
            raise ValueError(f"expected {len(self._remaining)} losses (tasks {self._remaining}), got {len(losses)}")
        return first_order_alpha_step(losses, self.space.alpha, self.alpha_optimizer)

    def weight_step(self, train_losses: Sequence[Tensor]) -> None:
        """Lower-level step with conflict noticing on the decision module (and group chain)."""
        self._need_running()
        self.weight_optimizer.zero_grad(set_to_none=True)
        self.weight_optimizer.backward(list(train_losses))
        self.weight_optimizer.step()

    def step(self, val_losses: Callable[[], Sequence[Tensor]], train_losses: Callable[[], Sequence[Tensor]]) -> Tensor:
        """``alpha_step(val_losses())`` then ``weight_step(train_losses())``; returns the val loss."""
        v = self.alpha_step(val_losses())
        self.weight_step(train_losses())
        return v

    def end_stage(self) -> tuple[int, ...]:
        """Close the stage: tasks whose ``argmax alpha`` is the shared branch form a subgroup
        (with ``margin``: whose own-branch weight is not above the shared one by more than it).

        Returns the subgroup (possibly empty).  Builds the next stage unless every task is placed.
        """
        self._need_running()
        b = self.space.branch_point
        w = torch.softmax(self.space.alpha.detach(), dim=-1)
        take = [t for t, row in zip(self._remaining, w) if bool(row[1] - row[0] <= self.margin)]
        self.stages.append({
            "stage": self.stage,
            "branch_point": b,
            "tasks": list(self._remaining),
            "weights": w.cpu().tolist(),
            "group": list(take),
            "conflicts": self.noticing.to_dict(),
        })
        if take:
            self.branches.append(Branch(tuple(take), b))
            self.group_chains.append(list(self.space.group_chain))
        self._remaining = [t for t in self._remaining if t not in take]
        for t in take:
            del self._own[t]
        if self._remaining and b == 2:  # last stage: the rest get separate networks
            for t in self._remaining:
                self.branches.append(Branch((t,), 1))
                self.group_chains.append(self._own.pop(t))
            self._remaining = []
        if self._remaining:
            self.stage += 1
            self._build_stage()
        return tuple(take)

    # State ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the stage, the tasks left, the branches found and their
        chains, the trunk and heads, and the current stage's modules, ``alpha`` and optimizers."""
        return {
            "stage": self.stage,
            "remaining": list(self._remaining),
            "branches": [(list(br.tasks), br.branch_point) for br in self.branches],
            "group_chains": [[m.state_dict() for m in ch] for ch in self.group_chains],
            "stages": copy.deepcopy(self.stages),
            "trunk": self.trunk.state_dict(),
            "heads": self.heads.state_dict() if self.heads is not None else None,
            "space": None if self.done else self.space.state_dict(),
            "weight_optimizer": None if self.done else self.weight_optimizer.state_dict(),
            "alpha_optimizer": None if self.done else self.alpha_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a search built with the same modules, ``T`` and options."""
        K = self.num_modules
        self.trunk.load_state_dict(state["trunk"])
        if self.heads is not None:
            self.heads.load_state_dict(state["heads"])
        self.branches = [Branch(tuple(ts), int(b)) for ts, b in state["branches"]]
        self.group_chains = []
        for br, sds in zip(self.branches, state["group_chains"]):
            chain = [copy.deepcopy(self.trunk[k - 1]) for k in range(br.branch_point, K + 1)]
            if len(chain) != len(sds):
                raise ValueError(f"state has {len(sds)} modules for branch {br.tasks}, expected {len(chain)}")
            for m, sd in zip(chain, sds):
                m.load_state_dict(sd)
            self.group_chains.append(chain)
        self.stages = copy.deepcopy(state["stages"])
        self.stage = int(state["stage"])
        self._remaining = list(state["remaining"])
        self._own = {t: [] for t in self._remaining}
        if self._remaining:
            self._build_stage()
            self.space.load_state_dict(state["space"])
            self.weight_optimizer.load_state_dict(state["weight_optimizer"])
            self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])

    # Result --------------------------------------------------------------------------------------
    def result(self) -> ProResult:
        """The groups (in the order they were found), the architecture and a network holding
        copies of the searched modules (re-initialise it to retrain from scratch)."""
        if not self.done:
            raise RuntimeError(f"stage {self.stage} still searching tasks {self._remaining}: call end_stage()")
        arch = Architecture(self.num_tasks, self.num_modules, tuple(self.branches))
        by_key = {(br.tasks, br.branch_point): ch for br, ch in zip(self.branches, self.group_chains)}
        chains = [[copy.deepcopy(m) for m in by_key[(br.tasks, br.branch_point)]] for br in arch.branches]
        trunk = [copy.deepcopy(m) for m in self.trunk[: arch.trunk_depth]]
        heads = [copy.deepcopy(h) for h in self.heads] if self.heads is not None else None
        net = BranchedNetwork(arch, trunk, chains, heads)
        return ProResult([br.tasks for br in self.branches], arch, net, list(self.stages))

    def run(
        self,
        loss_fn: Callable[[int, Tensor, Any], Tensor],
        train_batch: Callable[[], tuple[Tensor, Any]],
        val_batch: Callable[[], tuple[Tensor, Any]],
        steps_per_stage: int,
    ) -> ProResult:
        """Run every stage for ``steps_per_stage`` iterations and return :meth:`result`.

        ``train_batch()`` / ``val_batch()`` return ``(x, y)``; ``loss_fn(t, output_t, y)`` is task
        ``t``'s scalar loss.
        """
        if steps_per_stage < 1:
            raise ValueError(f"steps_per_stage must be >= 1, got {steps_per_stage}")

        def losses(batch: tuple[Tensor, Any]) -> list[Tensor]:
            x, y = batch
            return [loss_fn(t, o, y) for t, o in zip(self.tasks, self.space(x))]

        while not self.done:
            for _ in range(steps_per_stage):
                self.step(lambda: losses(val_batch()), lambda: losses(train_batch()))
            self.end_stage()
        return self.result()
