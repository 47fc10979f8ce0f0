"""A small version of examples/conal_grouped_tasks.py, with its claims asserted.

The example's data and settings at its --quick scale, seed 0: planted groups (4 + 2 tasks)
that need different features from a one-unit bottleneck: CoNAL's
derived architecture separates the groups, CoNAL-Pro's groups never mix planted groups and
find the minority group whole (exact recovery of both depends on the seed), the derived network has
almost no conflicting pairs at the bottleneck where HPS has many, and the retrained networks beat
HPS on held-out data.  Everything is seeded and runs on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_mtlgrad.conal import (
    Architecture,
    BilevelSearch,
    BranchedNetwork,
    ConflictNoticing,
    ProgressiveSearch,
    SearchSpace,
    build_network,
    derive,
    reinitialize,
    retrain_optimizer,
)
from torch_mtlgrad.conal.synthetic import GroupedTasks, grouped_regression

K, DIM, WIDTH, T = 3, 16, 32, 6


def _chain() -> list[nn.Module]:
    return [nn.Sequential(nn.Linear(DIM, WIDTH), nn.Tanh()), nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()),
            nn.Sequential(nn.Linear(WIDTH, 1), nn.Tanh())]


def _losses(outs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    return [nn.functional.mse_loss(o, y) for o, y in zip(outs, ys)]


def _retrain(net: BranchedNetwork, data: GroupedTasks, steps: int = 200) -> tuple[float, list[float]]:
    """Train from scratch with mean aggregation; test MSE at the best validation loss, and the
    conflict ratio of every trunk module shared by two tasks (0 for a level without one)."""
    torch.manual_seed(1)
    reinitialize(net)
    shared_trunk = [f for f, tasks in net.module_tasks()[: len(net.trunk)] if len(tasks) >= 2]
    cn = ConflictNoticing(shared_trunk, zero=False, window=steps) if shared_trunk else None
    opt = retrain_optimizer(net, torch.optim.Adam(net.parameters(), lr=1e-2), "mean", plugins=[cn] if cn else ())
    best = (float("inf"), float("inf"))
    for s in range(steps):
        opt.zero_grad()
        opt.backward(_losses(net(data.x_train), data.y_train))
        opt.step()
        if s % 10 == 9:
            with torch.no_grad():
                val = float(sum(_losses(net(data.x_val), data.y_val)))
                test = float(sum(_losses(net(data.x_test), data.y_test))) / data.num_tasks
            best = min(best, (val, test))
    ratios = cn.conflict_ratio("total").tolist() if cn else []
    return best[1], ratios + [0.0] * (K - len(ratios))


@pytest.fixture(scope="module")
def hps(setup: tuple[GroupedTasks, BranchedNetwork]) -> tuple[float, list[float]]:
    """Hard parameter sharing retrained the same way (test MSE, conflict ratios)."""
    return _retrain(build_network(Architecture.hard_sharing(T, K), _chain(), [nn.Linear(1, 1)] * T), setup[0])


@pytest.fixture(scope="module")
def setup() -> tuple[GroupedTasks, BranchedNetwork]:
    data = grouped_regression((4, 2), dim=DIM, features=1, n_train=256, n_val=256, n_test=1024, noise=0.2,
                              within=0.0, seed=0)
    torch.manual_seed(0)
    pre = build_network(Architecture.hard_sharing(T, K), _chain(), [nn.Linear(1, 1) for _ in range(T)], reinit=True)
    opt = torch.optim.Adam(pre.parameters(), lr=1e-2)
    for _ in range(600):  # Algorithm 1 starts from pre-trained weights
        opt.zero_grad()
        sum(_losses(pre(data.x_train), data.y_train)).backward()
        opt.step()
    return data, pre


@pytest.mark.filterwarnings("ignore:.*does not depend on the shared parameters")
def test_conal_branches_the_groups_and_beats_hps(setup: tuple[GroupedTasks, BranchedNetwork],
                                                 hps: tuple[float, list[float]]) -> None:
    data, pre = setup
    space = SearchSpace(copy.deepcopy(list(pre.trunk)), T, copy.deepcopy(list(pre.heads)))
    search = BilevelSearch(space, torch.optim.Adam(list(space.weight_parameters()), lr=1e-2),
                           torch.optim.SGD(space.arch_parameters(), lr=1.0))
    for s in range(250):
        train = _losses(space(data.x_train), data.y_train)
        if s < 100:
            search.weight_step(train)
        else:
            search.step(lambda: _losses(space(data.x_val), data.y_val), lambda: _losses(space(data.x_train), data.y_train))
    arch = derive(space).architecture
    # no module of the last level is shared by tasks of different planted groups
    planted = {t: g for g, ts in enumerate(data.groups) for t in ts}
    for block in arch.levels()[-1]:
        assert len({planted[t] for t in block}) == 1, arch.levels()
    assert arch != Architecture.hard_sharing(T, K)
    hps_test, hps_conf = hps
    conal_test, conal_conf = _retrain(derive(space).network, data)
    assert conal_test < 0.5 * hps_test, (conal_test, hps_test)
    # at the bottleneck, where the planted conflict lives, HPS's task pairs conflict often and the
    # derived network's shared modules (if any) hardly ever.  (On the modules before it the ratio
    # is dominated by tasks of one group fitting their own noise, and is not lower; see RESULTS.)
    assert hps_conf[-1] > 0.3 and conal_conf[-1] < 0.1, (conal_conf, hps_conf)


@pytest.mark.filterwarnings("ignore:.*does not depend on the shared parameters")
def test_conal_pro_recovers_the_planted_groups(setup: tuple[GroupedTasks, BranchedNetwork],
                                              hps: tuple[float, list[float]]) -> None:
    data, pre = setup
    pro = ProgressiveSearch(copy.deepcopy(list(pre.trunk)), T, copy.deepcopy(list(pre.heads)),
                            weight_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2),
                            alpha_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), margin=0.1)

    def losses(x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        return [nn.functional.mse_loss(o, ys[t]) for t, o in zip(pro.tasks, pro.space(x))]

    while not pro.done:
        for s in range(200):
            if s >= 100:
                pro.alpha_step(losses(data.x_val, data.y_val))
            pro.weight_step(losses(data.x_train, data.y_train))
        pro.end_stage()
    res = pro.result()
    # Exact recovery depends on the seed (the example recovers (0,1,2,3),(4,5) at seeds 0 and 1 and
    # not at 2; see benchmarks/RESULTS.md, CoNAL section).  What holds here: no group found mixes tasks of
    # different planted groups, the minority group is found whole, and sharing is found at all.
    planted = {t: g for g, ts in enumerate(data.groups) for t in ts}
    for grp in res.groups:
        assert len({planted[t] for t in grp}) == 1, res.groups
    assert data.groups[1] in res.groups, res.groups
    assert len(res.groups) < T, res.groups
    hps_test = hps[0]
    pro_test, _ = _retrain(res.network, data)
    assert pro_test < 0.5 * hps_test, (pro_test, hps_test)
