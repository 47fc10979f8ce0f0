"""First-order bilevel search: what each step changes, eq. 5 in the weight step, resumption."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from torch_mtlgrad.conal import BilevelSearch, SearchSpace

from .test_conflict import ref_conflict_noticing


def _space(seed: int = 0, T: int = 3) -> SearchSpace:
    torch.manual_seed(seed)
    chain = [nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Sequential(nn.Linear(4, 4), nn.Tanh())]
    return SearchSpace(chain, T, [nn.Linear(4, 1) for _ in range(T)])


def _batch(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 3, generator=g)
    return x, [x[:, :1] * 2, -x[:, :1] * 2 + 0.1 * torch.randn(12, 1, generator=g), x[:, 1:2].tanh()]


def _losses(space: SearchSpace, batch: tuple[torch.Tensor, list[torch.Tensor]]) -> list[torch.Tensor]:
    x, ys = batch
    return [nn.functional.mse_loss(o, y) for o, y in zip(space(x), ys)]


def test_alpha_step_changes_only_alpha() -> None:
    space = _space()
    search = BilevelSearch(space, alpha_optimizer=torch.optim.SGD(space.arch_parameters(), lr=0.5))
    before = {n: p.detach().clone() for n, p in space.named_parameters()}
    losses = _losses(space, _batch(1))
    grad = torch.autograd.grad(torch.stack(losses).mean(), [space.alpha], retain_graph=True)[0]
    search.alpha_step(losses)
    for n, p in space.named_parameters():
        if n == "alpha":
            torch.testing.assert_close(p, before[n] - 0.5 * grad)
        else:
            assert torch.equal(p, before[n]) and p.grad is None


def test_weight_step_is_eq5_and_leaves_alpha() -> None:
    space = _space(2)
    lr = 0.1
    search = BilevelSearch(space, torch.optim.SGD(list(space.weight_parameters()), lr=lr))
    batch = _batch(3)
    shared = list(space.shared.parameters())
    losses = _losses(space, batch)
    J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(l, shared, retain_graph=True)]) for l in losses])
    seg = search.weight_optimizer.layout.segment_ids(list(space.shared)).numpy()
    Jz, pstar, _ = ref_conflict_noticing(J.double().numpy(), seg, space.num_modules)
    want_shared = torch.from_numpy(Jz.sum(0)).float()
    own = [list(space.specific[t].parameters()) + list(space.heads[t].parameters()) for t in range(3)]
    want_own = [torch.autograd.grad(l, ps, retain_graph=True, allow_unused=True) for l, ps in zip(losses, own)]
    old_shared = torch.cat([p.detach().flatten() for p in shared])
    old_own = [[p.detach().clone() for p in ps] for ps in own]
    alpha = space.alpha.detach().clone()
    search.weight_step(_losses(space, batch))
    new_shared = torch.cat([p.detach().flatten() for p in shared])
    torch.testing.assert_close(new_shared, old_shared - lr * want_shared, rtol=1e-5, atol=1e-6)
    assert int(search.noticing.diagnostics["conflict_pstar"]) == pstar
    for ps, olds, gs in zip(own, old_own, want_own):
        for p, o, g in zip(ps, olds, gs):
            torch.testing.assert_close(p.detach(), o - lr * (g if g is not None else 0), rtol=1e-5, atol=1e-6)
    assert torch.equal(space.alpha, alpha)


def test_step_and_resume_bit_for_bit() -> None:
    space = _space(4)
    search = BilevelSearch(space, alpha_optimizer=torch.optim.Adam(space.arch_parameters(), lr=0.05), window=8)
    for i in range(3):
        info = search.step(lambda i=i: _losses(space, _batch(100 + i)), lambda i=i: _losses(space, _batch(200 + i)))
    assert set(info) == {"val_loss", "train_losses", "pstar"}
    space2 = copy.deepcopy(space)
    search2 = BilevelSearch(space2, alpha_optimizer=torch.optim.Adam(space2.arch_parameters(), lr=0.05), window=8)
    search2.load_state_dict(copy.deepcopy(search.state_dict()))
    for i in range(3, 6):
        search.step(lambda i=i: _losses(space, _batch(100 + i)), lambda i=i: _losses(space, _batch(200 + i)))
        search2.step(lambda i=i: _losses(space2, _batch(100 + i)), lambda i=i: _losses(space2, _batch(200 + i)))
    for a, b in zip(space.parameters(), space2.parameters()):
        assert torch.equal(a, b)
    assert search.noticing.to_dict() == search2.noticing.to_dict()
    assert search.steps == search2.steps == 6


def test_without_conflict_noticing_shared_gets_the_sum() -> None:
    space = _space(5)
    search = BilevelSearch(space, torch.optim.SGD(list(space.weight_parameters()), lr=1.0), conflict_noticing=False)
    batch = _batch(6)
    shared = list(space.shared.parameters())
    want = torch.autograd.grad(sum(_losses(space, batch)), shared)
    old = [p.detach().clone() for p in shared]
    search.weight_step(_losses(space, batch))
    for p, o, g in zip(shared, old, want):
        torch.testing.assert_close(p.detach(), o - g, rtol=1e-5, atol=1e-6)
    assert search.noticing.to_dict()["steps"] == 1


def test_bad_input() -> None:
    space = _space()
    with pytest.raises(ValueError, match="holds alpha"):
        BilevelSearch(space, torch.optim.SGD(space.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="does not hold"):
        BilevelSearch(space, alpha_optimizer=torch.optim.SGD(list(space.heads.parameters()), lr=0.1))
    with pytest.raises(ValueError, match="besides alpha"):
        BilevelSearch(space, alpha_optimizer=torch.optim.SGD([space.alpha, *space.heads.parameters()], lr=0.1))
    with pytest.raises(TypeError, match="SearchSpace"):
        BilevelSearch(nn.Linear(2, 2))  # type: ignore[arg-type]
    search = BilevelSearch(space)
    with pytest.raises(ValueError, match="expected 3"):
        search.alpha_step(_losses(space, _batch(0))[:2])
    bad = [l * float("nan") for l in _losses(space, _batch(0))]
    with pytest.raises(FloatingPointError):
        search.alpha_step(bad)
    assert np.isfinite(space.alpha.detach().numpy()).all()
