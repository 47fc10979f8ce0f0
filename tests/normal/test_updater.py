"""PositionUpdater: Algorithm 1's position step as a MultiTaskOptimizer plugin."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_mtlgrad import GradientPlugin, MultiTaskOptimizer
from torch_mtlgrad.normal import (
    PositionUpdater,
    TimeAwareODE,
    check_positions_not_in,
    parameters_except_positions,
    position_parameters,
)


class Net(nn.Module):
    """Encoder -> NORMAL block -> one linear head per task."""

    def __init__(self, T: int = 3, n: int = 6, positions=(0.3, 0.9, -0.4), seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(4, n)
        self.ode = TimeAwareODE(n, T, positions_init=list(positions)[:T], step_size=0.1)
        self.heads = nn.ModuleList(nn.Linear(n, 1) for _ in range(T))

    def forward(self, x):
        return [h(f) for h, f in zip(self.heads, self.ode(self.enc(x)))]


def _data(T=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    return x, [torch.randn(16, 1, generator=g) for _ in range(T)]


def _losses(net, x, ys):
    return [nn.functional.mse_loss(o, y) for o, y in zip(net(x), ys)]


def _make(net, aggregator="mean", lr=0.05, eta=0.2, every=1):
    upd = PositionUpdater(net.ode, lr=eta, every=every)
    base = torch.optim.SGD(parameters_except_positions(net), lr=lr)
    shared = [*net.enc.parameters(), *net.ode.shared_parameters()]
    opt = MultiTaskOptimizer(base, shared=shared, aggregator=aggregator, plugins=[upd])
    return opt, upd


def _eq7_reference(net, x, ys):
    """d_p for every task from z(p), q(p) of the integrator and dL_t/dz(p) by autograd on a leaf."""
    out = []
    states = net.ode.integrate(net.enc(x))
    for t, (z, q) in enumerate(states):
        leaf = z.detach().clone().requires_grad_(True)
        loss = nn.functional.mse_loss(net.heads[t](leaf), ys[t])
        (gz,) = torch.autograd.grad(loss, leaf)
        out.append(-(gz * q.detach()).sum())
    return torch.stack(out)


def test_is_a_gradient_plugin():
    assert isinstance(PositionUpdater(TimeAwareODE(2, 2), lr=0.1), GradientPlugin)


@pytest.mark.parametrize("aggregator", ["mean", "central+tension"])
def test_one_step_in_multitask_optimizer(aggregator):
    net = Net()
    x, ys = _data()
    opt, upd = _make(net, aggregator, eta=0.3)
    p0 = net.ode.positions.detach().clone()
    expected_dp = _eq7_reference(net, x, ys)
    shared_before = [p.detach().clone() for p in opt.layout.params]
    head_before = [p.detach().clone() for p in net.heads.parameters()]
    opt.zero_grad()
    losses = _losses(net, x, ys)
    opt.backward(losses)
    assert torch.allclose(net.ode.positions.grad, expected_dp, atol=1e-6, rtol=1e-5)
    J = opt.jacobian.clone()
    opt.step()
    # Algorithm 1, line 7: p <- p - eta d_p; gradient cleared; recorded
    assert torch.allclose(net.ode.positions.detach(), p0 - 0.3 * expected_dp, atol=1e-6)
    assert net.ode.positions.grad is None
    assert len(upd.history) == 2 and torch.equal(upd.history.as_tensor()[-1], net.ode.positions.detach())
    # The plugin left J alone: the shared parameters moved along the aggregator's direction of J.
    if aggregator == "mean":
        d = J.mean(0)
        flat_before = torch.cat([p.reshape(-1) for p in shared_before])
        flat_after = torch.cat([p.detach().reshape(-1) for p in opt.layout.params])
        assert torch.allclose(flat_after, flat_before - 0.05 * d, atol=1e-6)
    else:
        assert any(not torch.equal(a, b) for a, b in zip(shared_before, opt.layout.params))
    assert any(not torch.equal(a, b) for a, b in zip(head_before, net.heads.parameters()))


def test_legacy_loop_gives_the_same_position_step():
    net, net2 = Net(), Net()
    x, ys = _data()
    opt, _ = _make(net, eta=0.3)
    opt2, _ = _make(net2, eta=0.3)
    opt.zero_grad()
    opt.backward(_losses(net, x, ys))
    opt.step()
    opt2.zero_grad()
    losses = _losses(net2, x, ys)
    for t, loss in enumerate(losses):
        with opt2.task(t):
            loss.backward(retain_graph=t < len(losses) - 1)
    opt2.step()
    assert torch.allclose(net.ode.positions, net2.ode.positions, atol=1e-7)


@pytest.mark.parametrize("aggregator", ["mean", "central+tension"])
def test_positions_move_to_the_depths_tasks_need(aggregator):
    """Targets are the block's own flow read at 0.4 and 2.0; both positions start at 1.0."""
    torch.manual_seed(0)
    teacher = TimeAwareODE(4, 2, positions_init=[0.4, 2.0], step_size=0.05)
    x = torch.randn(64, 4)
    with torch.no_grad():
        ys = teacher(x)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.positions.fill_(1.0)
    upd = PositionUpdater(student, lr=0.5)
    base = torch.optim.SGD(list(student.shared_parameters()), lr=0.01)
    opt = MultiTaskOptimizer(base, shared=list(student.shared_parameters()), aggregator=aggregator,
                             plugins=[upd])
    for _ in range(60):
        opt.zero_grad()
        opt.backward([nn.functional.mse_loss(f, y) for f, y in zip(student(x), ys)])
        opt.step()
    p = student.positions.detach()
    assert p[0] < 0.7 and p[1] > 1.7, p  # moved most of the way from 1.0 towards 0.4 and 2.0
    hist = upd.history.as_tensor()
    assert hist.shape == (61, 2)
    assert (hist[1:, 0] <= hist[:-1, 0] + 1e-6).all() and (hist[1:, 1] >= hist[:-1, 1] - 1e-6).all()


@settings(max_examples=25, deadline=None)
@given(
    grads=st.lists(st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=2),
                   min_size=1, max_size=7),
    lr=st.floats(1e-3, 2.0),
    every=st.integers(1, 3),
)
def test_post_step_schedule(grads, lr, every):
    block = TimeAwareODE(2, 2, positions_init=[0.5, -0.5])
    upd = PositionUpdater(block, lr=lr, every=every)
    expected = torch.tensor([0.5, -0.5])
    for i, g in enumerate(grads, start=1):
        block.positions.grad = torch.tensor(g)
        upd.post_step()
        if i % every == 0:
            expected = expected - lr * torch.tensor(g)
        assert block.positions.grad is None  # discarded on the other steps
        assert torch.allclose(block.positions.detach(), expected, atol=1e-6)
    assert upd.num_steps == len(grads) and len(upd.history) == len(grads) + 1


def test_max_move_clamps_each_update():
    block = TimeAwareODE(2, 3, positions_init=[0.0, 0.0, 0.0])
    upd = PositionUpdater(block, lr=1.0, max_move=0.25)
    block.positions.grad = torch.tensor([10.0, -0.1, -7.0])
    upd.post_step()
    assert torch.allclose(block.positions.detach(), torch.tensor([-0.25, 0.1, 0.25]))
    assert upd.state_dict()["max_move"] == 0.25
    with pytest.raises(ValueError, match="max_move"):
        PositionUpdater(block, lr=1.0, max_move=0.0)


def test_strict_alternation_with_manual_step():
    net = Net()
    x, ys = _data()
    upd = PositionUpdater(net.ode, lr=0.3)
    opt = torch.optim.SGD(parameters_except_positions(net), lr=0.05)
    p0 = net.ode.positions.detach().clone()
    # parameter step: positions frozen
    opt.zero_grad(); upd.zero_grad()
    sum(_losses(net, x, ys)).backward()
    opt.step(); upd.zero_grad()
    assert torch.equal(net.ode.positions.detach(), p0)
    # position step: others frozen
    others = [p.detach().clone() for p in parameters_except_positions(net)]
    expected = p0 - 0.3 * _eq7_reference(net, x, ys)
    opt.zero_grad(); upd.zero_grad()
    sum(_losses(net, x, ys)).backward()
    upd.step()
    assert torch.allclose(net.ode.positions.detach(), expected, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(others, parameters_except_positions(net)))


def test_positions_in_wrapped_optimizer_are_an_error():
    net = Net()
    x, ys = _data()
    bad = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="stepped twice"):
        check_positions_not_in(bad, position_parameters(net))
    with pytest.raises(ValueError, match="stepped twice"):
        PositionUpdater(net.ode, lr=0.1, optimizer=bad)
    # without optimizer=, the double step is caught at the first post_step
    upd = PositionUpdater(net.ode, lr=0.1)
    opt = MultiTaskOptimizer(bad, shared=net.enc, plugins=[upd])
    opt.zero_grad()
    opt.backward(_losses(net, x, ys))
    with pytest.raises(RuntimeError, match="changed outside PositionUpdater"):
        opt.step()
    # positions listed as shared
    with pytest.raises(ValueError, match="among the shared parameters"):
        MultiTaskOptimizer(bad, shared=net.ode, plugins=[PositionUpdater(net.ode, lr=0.1)])


def test_sync_after_manual_edit_and_bad_arguments():
    block = TimeAwareODE(2, 2)
    upd = PositionUpdater(block, lr=0.1)
    with torch.no_grad():
        block.positions.fill_(3.0)
    with pytest.raises(RuntimeError):
        upd.post_step()
    upd.sync()
    upd.post_step()
    with pytest.raises(ValueError, match="lr"):
        PositionUpdater(block, lr=0.0)
    with pytest.raises(ValueError, match="every"):
        PositionUpdater(block, lr=0.1, every=0)
    with pytest.raises(TypeError):
        PositionUpdater(torch.zeros(2, 2, requires_grad=True), lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="require grad"):
        PositionUpdater(nn.Parameter(torch.zeros(2), requires_grad=False), lr=0.1)


def test_state_dict_roundtrip_resumes_bit_for_bit():
    x, ys = _data()

    def run(net, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            opt.backward(_losses(net, x, ys))
            opt.step()

    net = Net()
    opt, upd = _make(net, "central+tension", eta=0.2, every=2)
    run(net, opt, 3)
    ck_model, ck_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    run(net, opt, 4)

    net2 = Net(seed=5, positions=(0.0, 0.0, 0.0))
    opt2, upd2 = _make(net2, "central+tension", eta=0.9, every=1)
    net2.load_state_dict(ck_model)
    opt2.load_state_dict(ck_opt)
    assert upd2.lr == 0.2 and upd2.every == 2 and upd2.num_steps == 3 and len(upd2.history) == 4
    run(net2, opt2, 4)
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert torch.equal(upd.history.as_tensor(), upd2.history.as_tensor())
    assert torch.equal(upd.distance_matrix(), upd2.distance_matrix())
    # the plugin alone restores the positions too
    st = upd.state_dict()
    with torch.no_grad():
        net2.ode.positions.zero_()
    upd2.load_state_dict(st)
    assert torch.equal(net2.ode.positions, net.ode.positions)
    with pytest.raises(ValueError, match="shape"):
        PositionUpdater(TimeAwareODE(2, 5), lr=0.1).load_state_dict(st)


def test_diagnostics():
    block = TimeAwareODE(2, 3, positions_init=[0.0, 1.0, -2.0])
    d = PositionUpdater(block, lr=0.1).diagnostics
    assert torch.equal(d["positions"], torch.tensor([0.0, 1.0, -2.0]))
    assert torch.equal(d["distances"], torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]]))
