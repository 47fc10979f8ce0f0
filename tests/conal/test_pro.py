"""CoNAL-Pro (CoNAL paper, section 2.4): stage structure, stage forward, grouping logic, the weight step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_mtlgrad.conal import Architecture, ProgressiveSearch

from .test_conflict import ref_conflict_noticing


def _pro(T: int = 4, K: int = 3, seed: int = 0, **kw) -> ProgressiveSearch:
    torch.manual_seed(seed)
    chain = [nn.Sequential(nn.Linear(3, 3), nn.Tanh()) for _ in range(K)]
    return ProgressiveSearch(chain, T, [nn.Linear(3, 1) for _ in range(T)], **kw)


def _force(pro: ProgressiveSearch, shared: set[int]) -> tuple[int, ...]:
    with torch.no_grad():
        for i, t in enumerate(pro.tasks):
            pro.space.alpha[i] = torch.tensor([1.0, 0.0]) if t in shared else torch.tensor([0.0, 1.0])
    return pro.end_stage()


def test_stage_structure() -> None:
    pro = _pro(T=4, K=3)
    K = 3
    for stage in (1, 2, 3):
        b = K + 2 - stage
        sp = pro.space
        assert pro.stage == stage and sp.branch_point == b
        assert len(sp.group_chain) == K - b + 1
        assert all(len(ch) == K - b + 2 for ch in sp.own)
        assert sp.decision_module is pro.trunk[b - 2]
        shared_ids = {id(p) for p in pro.weight_optimizer.layout.params}
        want = {id(p) for m in [*pro.trunk[: b - 1], *sp.group_chain] for p in m.parameters()}
        assert shared_ids == want
        assert pro.noticing.modules == [*pro.trunk[: b - 1], *sp.group_chain]  # notice="path"
        _force(pro, set())  # nobody takes the shared branch: everyone goes on
    assert pro.done
    res = pro.result()
    assert res.architecture == Architecture.single_task(4, 3)
    assert res.groups == [(0,), (1,), (2,), (3,)]


def test_stage_forward_is_the_two_branch_mixture() -> None:
    pro = _pro(T=3, K=3, seed=1)
    _force(pro, {0})  # stage 2: tasks 1, 2 at branch points 3 / 2
    sp = pro.space
    with torch.no_grad():
        sp.alpha.copy_(torch.tensor([[0.3, -0.2], [1.0, 0.5]]))
    x = torch.randn(4, 3)
    got = sp(x)
    z = pro.trunk[0](x)  # trunk up to b - 2 = 1
    u = sp.group_chain[0](pro.trunk[1](z))
    for i, t in enumerate(pro.tasks):
        v = sp.own[i][1](sp.own[i][0](z))
        w = torch.softmax(sp.alpha[i], 0)
        torch.testing.assert_close(got[i], pro.heads[t](w[0] * u + w[1] * v))


def test_grouping_and_final_architecture() -> None:
    pro = _pro(T=5, K=3, seed=2)
    assert _force(pro, {0, 3}) == (0, 3)  # stage 1: fully shared group
    assert pro.tasks == [1, 2, 4]
    assert _force(pro, {2, 4}) == (2, 4)  # stage 2: branch point 3
    assert pro.tasks == [1]
    assert _force(pro, set()) == ()  # stage 3: nobody
    assert pro.done  # after the stage at branch point 2 the rest are separate
    res = pro.result()
    assert res.groups == [(0, 3), (2, 4), (1,)]
    assert res.architecture.branch_points == [4, 1, 3, 4, 3]
    assert [s["branch_point"] for s in res.stages] == [4, 3, 2]
    x = torch.randn(2, 3)
    assert [tuple(o.shape) for o in res.network(x)] == [(2, 1)] * 5
    # the group chain of (2, 4) is the stage-2 group chain, copied
    assert len(res.network.chains[res.architecture.groups.index((2, 4))]) == 1


def test_weight_step_notices_conflict_on_the_decision_module() -> None:
    pro = _pro(T=3, K=2, seed=3, weight_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), notice="decision")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g)
    ys = [x[:, :1], -x[:, :1], x[:, 1:2]]

    def losses() -> list[torch.Tensor]:
        return [nn.functional.mse_loss(o, y) for o, y in zip(pro.space(x), ys)]

    shared = list(pro.weight_optimizer.layout.params)
    J = torch.stack([torch.cat([gr.flatten() for gr in torch.autograd.grad(l, shared, retain_graph=True)])
                     for l in losses()])
    seg = pro.weight_optimizer.layout.segment_ids([pro.space.decision_module]).numpy()
    Jz, pstar, _ = ref_conflict_noticing(J.double().numpy(), seg, 1)
    old = torch.cat([p.detach().flatten() for p in shared])
    pro.weight_step(losses())
    new = torch.cat([p.detach().flatten() for p in shared])
    torch.testing.assert_close(new, old - torch.from_numpy(Jz.sum(0)).float(), rtol=1e-5, atol=1e-6)
    assert int(pro.noticing.diagnostics["conflict_pstar"]) == pstar


@pytest.mark.parametrize("notice", ["decision", "chain"])
def test_notice_scopes(notice: str) -> None:
    pro = _pro(T=3, K=3, notice=notice)
    _force(pro, {0})
    sp = pro.space
    want = [sp.decision_module] + (list(sp.group_chain) if notice == "chain" else [])
    assert pro.noticing.modules == want


def test_margin_keeps_near_ties_shared() -> None:
    pro = _pro(T=3, K=2, margin=0.1)
    with torch.no_grad():  # own-branch weights 0.52, 0.62, 0.5: only task 1 is past the margin
        pro.space.alpha.copy_(torch.log(torch.tensor([[0.48, 0.52], [0.38, 0.62], [0.5, 0.5]])))
    assert pro.end_stage() == (0, 2)
    with pytest.raises(ValueError, match="margin"):
        _pro(margin=1.0)


def test_state_dict_resumes_bit_for_bit() -> None:
    def make() -> ProgressiveSearch:
        return _pro(T=3, K=2, seed=6, alpha_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1))

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    ys = [x[:, :1], -x[:, :1], x[:, 1:2]]

    def losses(p: ProgressiveSearch) -> list[torch.Tensor]:
        return [nn.functional.mse_loss(o, ys[t]) for t, o in zip(p.tasks, p.space(x))]

    a = make()
    for _ in range(3):
        a.step(lambda: losses(a), lambda: losses(a))
    _force(a, {0})
    for _ in range(2):
        a.step(lambda: losses(a), lambda: losses(a))
    b = make()
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as torch.save/load would
    assert b.stage == a.stage == 2 and b.tasks == a.tasks == [1, 2]
    for _ in range(3):
        a.step(lambda: losses(a), lambda: losses(a))
        b.step(lambda: losses(b), lambda: losses(b))
    for p, q in zip(a.space.parameters(), b.space.parameters()):
        assert torch.equal(p, q)
    assert a.end_stage() == b.end_stage()
    ra, rb = a.result(), b.result()
    assert ra.architecture == rb.architecture
    for p, q in zip(ra.network.parameters(), rb.network.parameters()):
        assert torch.equal(p, q)
    c = make()
    c.load_state_dict(a.state_dict())  # a finished search
    assert c.done and c.result().architecture == ra.architecture


def test_run_and_errors() -> None:
    pro = _pro(T=2, K=1, seed=4)
    x = torch.randn(6, 3)
    ys = [x[:, :1], x[:, :1] * 0.9]
    res = pro.run(lambda t, o, y: nn.functional.mse_loss(o, y[t]), lambda: (x, ys), lambda: (x, ys), 3)
    assert pro.done and sorted(t for grp in res.groups for t in grp) == [0, 1]
    with pytest.raises(RuntimeError, match="done"):
        pro.end_stage()
    with pytest.raises(ValueError, match="notice"):
        _pro(notice="all")
    with pytest.raises(ValueError, match="heads"):
        ProgressiveSearch([nn.Linear(2, 2)], 2, [nn.Linear(2, 1)])
    fresh = _pro(T=2, K=2)
    with pytest.raises(RuntimeError, match="still searching"):
        fresh.result()
    with pytest.raises(ValueError, match="expected 2"):
        fresh.alpha_step([torch.zeros((), requires_grad=True)])
