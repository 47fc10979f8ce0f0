"""The CoNAL search space: forward = explicit per-branch computation, prefixes computed once."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_mtlgrad.conal import SearchSpace


def _space(T: int, K: int, width: int, seed: int, heads: bool, stack: bool = False) -> SearchSpace:
    torch.manual_seed(seed)
    chain = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(K)]
    hs = [nn.Linear(width, 2) for _ in range(T)] if heads else None
    space = SearchSpace(chain, T, hs, reset_copies=True, stack_branches=stack)
    with torch.no_grad():
        space.alpha.normal_()
    return space


def explicit(space: SearchSpace, x: torch.Tensor) -> list[torch.Tensor]:
    """o_t = sum_p softmax(alpha_t)_p h_t(f_S(x, p), p), every branch computed from scratch."""
    T, K = space.num_tasks, space.num_modules
    outs = []
    for t in range(T):
        a = space.alpha[t]
        w = torch.exp(a) / torch.exp(a).sum()
        o = torch.zeros(())
        for p in range(1, K + 2):
            z = x
            for k in range(p - 1):  # shared modules 1 .. p-1
                z = space.shared[k](z)
            for k in range(p - 1, K):  # task t's own modules p .. K
                z = space.specific[t][k](z)
            o = o + w[p - 1] * z
        outs.append(space.heads[t](o) if space.heads is not None else o)
    return outs


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.integers(0, 100), st.booleans(), st.booleans())
def test_forward_equals_explicit_branches(T: int, K: int, width: int, seed: int, heads: bool, stack: bool) -> None:
    space = _space(T, K, width, seed, heads, stack)
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(seed))
    got = space(x)
    want = explicit(space, x)
    assert len(got) == T
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for t in range(T):
        for p in range(1, K + 2):
            z = space.branch_output(x, t, p)
            assert z.shape == (3, width)


def test_stacked_equals_loop_with_gradients() -> None:
    a = _space(3, 3, 4, 0, True, stack=False)
    b = _space(3, 3, 4, 0, True, stack=True)
    x = torch.randn(5, 4)
    la = sum(o.square().sum() for o in a(x))
    lb = sum(o.square().sum() for o in b(x))
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stack", [False, True])
def test_each_shared_prefix_computed_once(stack: bool) -> None:
    T, K = 3, 4
    space = _space(T, K, 3, 1, False, stack)
    calls: dict[str, int] = {}

    def counter(name: str):
        def hook(module: nn.Module, inp: object, out: object) -> None:
            calls[name] = calls.get(name, 0) + 1
        return hook

    for k, f in enumerate(space.shared):
        f.register_forward_hook(counter(f"f{k}"))
    for t in range(T):
        for k, h in enumerate(space.specific[t]):
            h.register_forward_hook(counter(f"h{t}_{k}"))
    space(torch.randn(2, 3))
    assert all(calls[f"f{k}"] == 1 for k in range(K))
    for t in range(T):
        for k in range(K):  # specific module k+1 serves the branch points 1 .. k+1
            assert calls[f"h{t}_{k}"] == (1 if stack else k + 1)


def test_gradients_reach_alpha_and_only_own_copies() -> None:
    space = _space(3, 2, 3, 2, True)
    x = torch.randn(4, 3)
    outs = space(x)
    outs[1].sum().backward()
    assert space.alpha.grad is not None
    assert torch.all(space.alpha.grad[[0, 2]] == 0) and torch.any(space.alpha.grad[1] != 0)
    for t in (0, 2):
        assert all(p.grad is None for p in space.specific[t].parameters())
        assert all(p.grad is None for p in space.heads[t].parameters())
    assert all(p.grad is not None for p in space.specific[1].parameters())
    assert all(p.grad is not None for p in space.shared.parameters())


def test_copies_and_parameter_groups() -> None:
    chain = [nn.Linear(3, 3), nn.Linear(3, 3)]
    space = SearchSpace(chain, 2)
    assert space.shared[0] is chain[0]
    assert space.specific[0][0] is not chain[0]
    torch.testing.assert_close(space.specific[1][1].weight, chain[1].weight)
    weights = list(space.weight_parameters())
    assert all(p is not space.alpha for p in weights)
    assert len(weights) + 1 == len(list(space.parameters()))
    assert space.arch_parameters() == [space.alpha]
    torch.testing.assert_close(space.branch_weights(), torch.full((2, 3), 1 / 3))
    fresh = SearchSpace([nn.Linear(3, 3)], 2, reset_copies=True)
    assert not torch.equal(fresh.specific[0][0].weight, fresh.shared[0].weight)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SearchSpace([], 2)
    with pytest.raises(ValueError, match="num_tasks"):
        SearchSpace([nn.Linear(2, 2)], 0)
    with pytest.raises(ValueError, match="heads"):
        SearchSpace([nn.Linear(2, 2)], 2, [nn.Linear(2, 1)])
    with pytest.raises(TypeError, match="nn.Module"):
        SearchSpace([torch.zeros(2)], 2)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="branch point"):
        SearchSpace([nn.Linear(2, 2)], 1).branch_output(torch.zeros(1, 2), 0, 3)
