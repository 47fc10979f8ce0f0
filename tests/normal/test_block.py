"""The time-aware ODE block: read-outs, one pass vs per task, feature maps, gamma, state, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.normal import TimeAwareODE, integrate_positions
from torch_mtlgrad.normal.integrate import grid_split

from ._reference import heavy_ball_euler


def test_equal_positions_give_identical_features():
    torch.manual_seed(0)
    block = TimeAwareODE(6, 4, positions_init=0.83)
    z0 = torch.randn(5, 6)
    feats = block(z0)
    for f in feats[1:]:
        assert torch.equal(f, feats[0])
    # ... and the same as reading that position alone (the degenerate HPS case of the NORMAL paper's section 3.2)
    assert torch.equal(block(z0, tasks=[2])[0], feats[0])


def test_position_zero_is_the_input():
    torch.manual_seed(0)
    block = TimeAwareODE(3, 2, positions_init=[0.0, 0.4])
    z0 = torch.randn(2, 3)
    assert torch.equal(block(z0)[0], z0)
    assert not torch.equal(block(z0)[1], z0)


@settings(max_examples=15, deadline=None)
@given(
    pos=st.lists(st.floats(-1.5, 1.5, allow_nan=False), min_size=1, max_size=6),
    seed=st.integers(0, 1000),
)
def test_one_pass_equals_per_task_integration(pos, seed):
    torch.manual_seed(seed)
    block = TimeAwareODE(4, len(pos), positions_init=pos, step_size=0.2)
    z0 = torch.randn(3, 4)
    w = torch.randn(len(pos), 3, 4)
    outs, grads = [], []
    for shared_pass in (True, False):
        block.zero_grad()
        feats = block(z0, shared_pass=shared_pass)
        sum((f * w[t]).sum() for t, f in enumerate(feats)).backward()
        outs.append(torch.stack(feats).detach())
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in block.parameters()])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(p=st.floats(-2.0, 2.0, allow_nan=False), seed=st.integers(0, 1000))
def test_readout_matches_independent_euler_including_negative_times(p, seed):
    torch.manual_seed(seed)
    block = TimeAwareODE(4, 1, positions_init=p, step_size=0.15, xi=-0.2).double()
    z0 = torch.randn(3, 4, dtype=torch.float64)
    zr, _ = heavy_ball_euler(block, z0, block.positions[0].item(), 0.15)
    assert torch.allclose(block(z0)[0].detach(), zr, atol=1e-10, rtol=0)


def test_negative_time_runs_the_ode_backwards():
    """Going back by |p| then forward by |p| returns to z(0) up to the O(h) Euler error."""
    torch.manual_seed(0)
    errs = []
    for h in (0.05, 0.0125):
        block = TimeAwareODE(3, 1, positions_init=-0.5, step_size=h).double()
        torch.manual_seed(0)
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()
        z0 = torch.randn(2, 3, dtype=torch.float64)
        (z_back, q_back), = block.integrate(z0)
        # forward from (z(-0.5), q(-0.5)) by +0.5 with the same field
        (z_fwd, _), = integrate_positions(z_back, q_back, [0.5], h, block.g, block.gamma, block.xi)
        errs.append((z_fwd - z0).abs().max().item())
    assert errs[1] < errs[0] / 2.5 and errs[1] < 0.05, errs


def test_conv_block_is_the_fc_block_per_pixel():
    torch.manual_seed(0)
    fc = TimeAwareODE(5, 3, positions_init=[0.3, -0.45, 1.1], hidden=7)
    conv = TimeAwareODE(5, 3, kind="conv", positions_init=[0.3, -0.45, 1.1], hidden=7)
    with torch.no_grad():
        for mf, mc in zip([fc.u, fc.g], [conv.u, conv.g]):
            for i in (0, 2):
                mc[i].weight.copy_(mf[i].weight[:, :, None, None])
                mc[i].bias.copy_(mf[i].bias)
    x = torch.randn(2, 5, 3, 4)
    w = torch.randn(3, 2, 5, 3, 4)
    outc = conv(x)
    outf = fc(x.permute(0, 2, 3, 1))  # [B, H, W, C]
    for t in range(3):
        assert torch.allclose(outc[t], outf[t].permute(0, 3, 1, 2), atol=1e-5)
    sum((o * w[t]).sum() for t, o in enumerate(outc)).backward()
    sum((o.permute(0, 3, 1, 2) * w[t]).sum() for t, o in enumerate(outf)).backward()
    assert torch.allclose(conv.positions.grad, fc.positions.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(conv.omega.grad, fc.omega.grad, atol=1e-4, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(omega=st.floats(-300.0, 300.0, allow_nan=False), double=st.booleans())
def test_gamma_in_open_unit_interval(omega, double):
    block = TimeAwareODE(2, 1, omega_init=omega)
    if double:
        block = block.double()
    g = block.gamma.item()
    assert 0.0 < g < 1.0
    if abs(omega) <= 15.0:  # representable: exactly sigmoid(omega)
        ref = 1.0 / (1.0 + torch.exp(torch.tensor(-omega, dtype=torch.float64)).item())
        assert g == pytest.approx(ref, rel=1e-6)


def test_gamma_stays_in_unit_interval_under_training():
    """A loss that keeps asking for more (or less) damping drives omega far into saturation."""
    for sign in (1.0, -1.0):
        torch.manual_seed(0)
        block = TimeAwareODE(4, 2, positions_init=[0.5, 1.0])
        opt = torch.optim.SGD([block.omega], lr=30.0)
        z0 = torch.randn(8, 4)
        for _ in range(15):
            opt.zero_grad()
            feats = block(z0)
            (sum(f.pow(2).mean() for f in feats) - sign * 10.0 * block.gamma).backward()
            opt.step()
            assert 0.0 < block.gamma.item() < 1.0
        assert sign * block.omega.item() > 17.0  # saturated (for +: sigmoid alone rounds to 1)


@settings(max_examples=40, deadline=None)
@given(p=st.floats(-50, 50, allow_nan=False), h=st.sampled_from([0.1, 0.05, 0.3, 1.0 / 3]))
def test_grid_split(p, h):
    k, r = grid_split(p, h)
    assert k >= 0 and 0.0 <= r < h
    assert abs(k * h + r - abs(p)) <= 1e-12 * max(1.0, abs(p))


def test_state_dict_roundtrip_block():
    torch.manual_seed(0)
    a = TimeAwareODE(3, 2, positions_init=[0.2, -0.7], step_size=0.07, xi=0.4, omega_init=1.5)
    b = TimeAwareODE(3, 2)
    b.load_state_dict(a.state_dict())
    assert b.step_size == 0.07 and b.xi == 0.4
    assert torch.equal(b.positions, a.positions) and torch.equal(b.omega, a.omega)
    z0 = torch.randn(2, 3)
    assert all(torch.equal(x, y) for x, y in zip(a(z0), b(z0)))
    assert {"positions", "omega", "_extra_state"} <= set(a.state_dict())
    assert len(list(a.shared_parameters())) == len(list(a.parameters())) - 1


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        TimeAwareODE(3, 2, kind="rnn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positions_init"):
        TimeAwareODE(3, 2, positions_init=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        TimeAwareODE(3, 2, positions_init=[0.1, float("nan")])
    with pytest.raises(ValueError, match="step_size"):
        TimeAwareODE(3, 2, step_size=0.0)
    block = TimeAwareODE(3, 2)
    with pytest.raises(ValueError, match="last dimension of size 3"):
        block(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        TimeAwareODE(3, 2, kind="conv")(torch.randn(2, 3))
    with pytest.raises(IndexError, match="task index 5"):
        block(torch.randn(2, 3), tasks=[5])
    with torch.no_grad():
        block.positions[1] = 1e6
    with pytest.raises(ValueError, match="task 1.*max_steps"):
        block(torch.randn(2, 3))
    with torch.no_grad():
        block.positions[1] = float("inf")
    with pytest.raises(ValueError, match="task 1 is not finite"):
        block(torch.randn(2, 3))


def test_initial_values_stay_exact_through_a_cast_to_float64() -> None:
    block = TimeAwareODE(4, 2, positions_init=[0.7, 1.3], omega_init=0.1).double()
    assert block.positions.tolist() == [0.7, 1.3]
    assert block.omega.item() == 0.1
    trained = TimeAwareODE(4, 2, positions_init=[0.7, 1.3])
    with torch.no_grad():
        trained.positions.add_(0.25)  # changed since: the cast keeps its float32 values
    kept = trained.positions.detach().double()
    assert torch.equal(trained.double().positions.detach(), kept)
