"""Retraining a derived network: RLW (eq. 3) or any aggregator through MultiTaskOptimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_mtlgrad.aggregators import available, get
from torch_mtlgrad.conal import Architecture, build_network, reinitialize, retrain_optimizer


def _net(points: list[int], seed: int = 0):
    torch.manual_seed(seed)
    templates = [nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Sequential(nn.Linear(4, 4), nn.Tanh())]
    return build_network(Architecture.from_branch_points(points, 2), templates,
                         [nn.Linear(4, 1) for _ in points], reinit=True)


def _losses(net: nn.Module, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 3, generator=g)
    ys = [x[:, :1], -x[:, :1], x[:, 1:2] * x[:, 2:3]]
    return [nn.functional.mse_loss(o, y) for o, y in zip(net(x), ys)]


def test_multi_task_shared_parameters_and_mean() -> None:
    net = _net([3, 3, 2])
    opt = retrain_optimizer(net, torch.optim.SGD(net.parameters(), lr=0.1), "mean")
    shared_ids = {id(p) for p in opt.layout.params}
    assert shared_ids == {id(p) for p in net.trunk.parameters()}  # both trunk modules: >= 2 tasks
    grads_each = [torch.autograd.grad(l, list(net.parameters()), allow_unused=True, retain_graph=True)
                  for l in _losses(net)]
    opt.zero_grad()
    opt.backward(_losses(net))
    for i, p in enumerate(net.parameters()):
        gs = [g[i] if g[i] is not None else torch.zeros_like(p) for g in grads_each]
        want = sum(gs) / 3 if id(p) in shared_ids else sum(gs)  # specific: plain sum
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)


def test_rlw_is_eq3_with_shared_all() -> None:
    if "rlw" not in available():
        pytest.skip("the 'rlw' aggregator is not registered in this build")
    net = _net([3, 2, 1], seed=3)
    opt = retrain_optimizer(net, torch.optim.SGD(net.parameters(), lr=0.1), "rlw", shared="all", seed=7)
    ref = get("rlw", seed=7)
    grads_each = [torch.autograd.grad(l, list(net.parameters()), allow_unused=True, retain_graph=True)
                  for l in _losses(net)]
    opt.zero_grad()
    opt.backward(_losses(net))
    ref(torch.eye(3))  # same generator, same draw: w ~ U[0,1]^3 normalised
    w = ref.weights
    assert w is not None and torch.all(w > 0) and float(w.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(opt.aggregator.weights, w)
    for i, p in enumerate(net.parameters()):
        want = sum(wt * (g[i] if g[i] is not None else torch.zeros_like(p)) for wt, g in zip(w, grads_each))
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agg", ["mean", "mgda", "rlw"])
def test_retraining_reduces_the_loss(agg: str) -> None:
    if agg not in available():
        pytest.skip(f"the {agg!r} aggregator is not registered in this build")
    net = reinitialize(_net([3, 2, 2], seed=5))
    opt = retrain_optimizer(net, torch.optim.Adam(net.parameters(), lr=0.02), agg)
    first = float(sum(_losses(net)).detach())
    for _ in range(60):
        opt.zero_grad()
        opt.backward(_losses(net))
        opt.step()
    assert float(sum(_losses(net)).detach()) < 0.7 * first


def test_bad_input() -> None:
    net = _net([1, 1, 1])
    with pytest.raises(ValueError, match="shares no module"):
        retrain_optimizer(net, torch.optim.SGD(net.parameters(), lr=0.1), "mean")
    net2 = _net([3, 3, 3])
    with pytest.raises(ValueError, match="shared must be"):
        retrain_optimizer(net2, torch.optim.SGD(net2.parameters(), lr=0.1), "mean", shared="some")
    with pytest.raises(TypeError, match="BranchedNetwork"):
        retrain_optimizer(nn.Linear(2, 2), torch.optim.SGD(net2.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown aggregator"):
        retrain_optimizer(net2, torch.optim.SGD(net2.parameters(), lr=0.1), "nope")
