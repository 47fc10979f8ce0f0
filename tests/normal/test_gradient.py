"""The positions' gradient: exactly eq. (7), and converging to the loss's derivative in p."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.normal import PositionGrad, TimeAwareODE, eq7_gradient, position_readout

from ._reference import heavy_ball_euler


def _problem(T: int, n: int = 5, B: int = 4, seed: int = 0, positions=None, h: float = 0.1, xi=0.0):
    torch.manual_seed(seed)
    block = TimeAwareODE(n, T, step_size=h, xi=xi, omega_init=0.3,
                         positions_init=positions if positions is not None else 1.0).double()
    heads = [torch.nn.Linear(n, 2).double() for _ in range(T)]
    z0 = torch.randn(B, n, dtype=torch.float64)
    ys = [torch.randn(B, 2, dtype=torch.float64) for _ in range(T)]
    return block, heads, z0, ys


def _loss_t(head, z, y):
    return torch.nn.functional.mse_loss(head(z), y)


@settings(max_examples=12, deadline=None)
@given(
    pos=st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=1, max_size=4),
    xi=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 10_000),
)
def test_grad_equals_eq7_from_independent_integration(pos, xi, seed):
    T = len(pos)
    block, heads, z0, ys = _problem(T, seed=seed, positions=pos, xi=xi)
    feats = block(z0)
    sum(_loss_t(hd, f, y) for hd, f, y in zip(heads, feats, ys)).backward()
    for t in range(T):
        p = block.positions[t].item()  # the stored value (float32 at construction)
        zr, qr = heavy_ball_euler(block, z0, p, block.step_size)
        zr = zr.clone().requires_grad_(True)
        (gz,) = torch.autograd.grad(_loss_t(heads[t], zr, ys[t]), zr)
        expected = -(gz * qr).sum()
        assert torch.allclose(feats[t].detach(), zr.detach(), atol=1e-10, rtol=0)
        assert block.positions.grad[t].item() == pytest.approx(expected.item(), abs=1e-10, rel=1e-9)


def test_grad_is_not_the_euler_derivative():
    """p.grad uses q(p) (eq. 7), not the Euler scheme's slope q(k h) on the last interval."""
    block, heads, z0, ys = _problem(1, positions=[0.55])
    (f,) = block(z0)
    _loss_t(heads[0], f, ys[0]).backward()
    zr, q_grid = heavy_ball_euler(block, z0, 0.5, 0.1)  # state at the grid point k h = 0.5
    z_p, q_p = heavy_ball_euler(block, z0, block.positions[0].item(), 0.1)
    z_leaf = z_p.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(_loss_t(heads[0], z_leaf, ys[0]), z_leaf)
    euler_slope = -(gz * q_grid).sum().item()
    eq7 = -(gz * q_p).sum().item()
    assert abs(eq7 - euler_slope) > 1e-6
    assert block.positions.grad[0].item() == pytest.approx(eq7, abs=1e-12)


def _grad_and_fd(p: float, h: float, eps: float = 1e-6) -> tuple[float, float]:
    block, heads, z0, ys = _problem(1, positions=[p], h=h, seed=3)

    def loss(pp: float) -> float:
        with torch.no_grad():
            block.positions.fill_(pp)
            return _loss_t(heads[0], block(z0)[0], ys[0]).item()

    fd = (loss(p + eps) - loss(p - eps)) / (2 * eps)
    with torch.no_grad():
        block.positions.fill_(p)
    _loss_t(heads[0], block(z0)[0], ys[0]).backward()
    return block.positions.grad[0].item(), fd


@pytest.mark.parametrize("p", [0.75, -0.625])
def test_grad_converges_to_finite_difference_as_steps_grow(p):
    """Central difference of the computed loss in p against eq. (7), halving the step size.

    p and the step sizes are exact in binary, so p sits on every grid and the error is the
    scheme's O(h) (off-grid, the error depends on where p falls in its interval, at most O(h)).
    """
    hs = [0.25, 0.125, 0.0625, 0.03125, 0.015625]
    errors = []
    for h in hs:
        g, fd = _grad_and_fd(p, h)
        errors.append(abs(g - fd))
    # Shrinks at every refinement, first order (Euler): each halving at least ~1.6x smaller.
    assert all(b < a / 1.6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 12 and errors[-1] < 0.03 * abs(fd), errors


def test_grad_converges_to_exact_derivative_linear_ode():
    """With LeakyReLU slope 1, u and g are affine and the ODE is solved by a matrix exponential:
    dL/dp is then known exactly and eq. (7)'s error must shrink with the step size."""
    n, p = 3, 0.9
    torch.manual_seed(1)
    errs = []
    for h in [0.1, 0.05, 0.025, 0.0125]:
        torch.manual_seed(1)
        block = TimeAwareODE(n, 1, step_size=h, xi=0.2, omega_init=-0.4, positions_init=p,
                             negative_slope=1.0).double()
        z0 = torch.randn(2, n, dtype=torch.float64)
        w = torch.randn(2, n, dtype=torch.float64)
        (f,) = block(z0)
        ((f * w).sum() ** 2).backward()
        # exact: x = [z; q; 1] per sample, dx/dt = M x
        A = block.g[2].weight.detach() @ block.g[0].weight.detach()
        b = block.g[2].weight.detach() @ block.g[0].bias.detach() + block.g[2].bias.detach()
        gamma = torch.sigmoid(block.omega.detach())
        I = torch.eye(n, dtype=torch.float64)
        M = torch.zeros(2 * n + 1, 2 * n + 1, dtype=torch.float64)
        M[:n, n : 2 * n] = -I
        M[n : 2 * n, :n] = A + block.xi * I
        M[n : 2 * n, n : 2 * n] = -gamma * I
        M[n : 2 * n, 2 * n] = b
        q0 = block.u(z0).detach()
        x0 = torch.cat([z0, q0, torch.ones(2, 1, dtype=torch.float64)], dim=1)
        x = x0 @ torch.linalg.matrix_exp(M * p).T
        z_exact, q_exact = x[:, :n], x[:, n : 2 * n]
        s = (z_exact * w).sum()
        exact = (2 * s * w * -q_exact).sum().item()  # dL/dz . dz/dp with dz/dp = -q
        errs.append(abs(block.positions.grad[0].item() - exact))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-2 * max(1.0, abs(exact)), errs


@settings(max_examples=20, deadline=None)
@given(shape=st.sampled_from([(3,), (2, 4), (2, 3, 2, 2)]), seed=st.integers(0, 1000))
def test_position_grad_function_matches_formula(shape, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    p = torch.tensor(0.3, requires_grad=True)  # float32 position, float64 features
    out = position_readout(z, q, p)
    assert torch.equal(out, z)
    (out * w).sum().backward()
    assert p.grad.dtype == torch.float32
    assert p.grad.item() == pytest.approx(-(w * q).sum().item(), rel=1e-6, abs=1e-6)
    assert torch.equal(z.grad, w)  # z(p) gets the incoming gradient unchanged
    assert eq7_gradient(w, q).item() == pytest.approx(-(w * q).sum().item(), rel=1e-12)


def test_position_grad_bad_input():
    with pytest.raises(ValueError, match="0-dim"):
        position_readout(torch.ones(2), torch.ones(2), torch.ones(1, requires_grad=True))
    with pytest.raises(ValueError, match="q\\(p\\)"):
        position_readout(torch.ones(2), torch.ones(3), torch.tensor(0.0, requires_grad=True))
    with pytest.raises(ValueError, match="shape"):
        eq7_gradient(torch.ones(2), torch.ones(3))
    assert PositionGrad.apply(torch.ones(2), torch.ones(2), torch.tensor(1.0)).shape == (2,)
