"""derive(), the Architecture document and the rebuilt network."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_mtlgrad.conal import (
    Architecture,
    Branch,
    BranchedNetwork,
    SearchSpace,
    build_network,
    count_parameters,
    derive,
    reinitialize,
)


def _space(T: int = 4, K: int = 3, width: int = 3, seed: int = 0) -> SearchSpace:
    torch.manual_seed(seed)
    chain = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(K)]
    return SearchSpace(chain, T, [nn.Linear(width, 1) for _ in range(T)], reset_copies=True)


def _set_points(space: SearchSpace, points: list[int]) -> None:
    with torch.no_grad():
        space.alpha.zero_()
        for t, p in enumerate(points):
            space.alpha[t, p - 1] = 1e4  # softmax is exactly one-hot in float32


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.data())
def test_derived_network_reproduces_chosen_branches(T: int, K: int, data: st.DataObject) -> None:
    points = data.draw(st.lists(st.integers(1, K + 1), min_size=T, max_size=T))
    space = _space(T, K, 3, seed=T * 10 + K)
    _set_points(space, points)
    d = derive(space)
    assert d.architecture.branch_points == points
    x = torch.randn(5, 3)
    with torch.no_grad():
        # the search space with one-hot branch weights, and its own reference branch_output
        for t, (a, b) in enumerate(zip(space(x), d.network(x))):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(b, space.heads[t](space.branch_output(x, t, points[t])))
    # parameter counts: search space without alpha; pruned network counted module by module
    per = count_parameters(space.shared[0])
    assert d.params_before == per * K * (T + 1) + T * 4
    depth = max(points) - 1
    own = sum(K - p + 1 for p in points if p != K + 1)
    assert d.params_after == per * (depth + own) + T * 4
    assert count_parameters(d.network) == d.params_after


def test_derived_network_is_a_copy() -> None:
    space = _space()
    d = derive(space)
    with torch.no_grad():
        for p in d.network.parameters():
            p.add_(1.0)
    assert not any(
        torch.equal(p, q) for p, q in zip(space.shared.parameters(), d.network.trunk.parameters())
    )


def test_argmax_ties_go_to_more_sharing() -> None:
    space = _space(T=2, K=2)
    with torch.no_grad():
        space.alpha.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert derive(space).architecture.branch_points == [2, 3]


def test_json_export_and_rebuild_roundtrip() -> None:
    space = _space(T=4, K=3)
    _set_points(space, [4, 2, 1, 4])
    d = derive(space)
    text = d.architecture.to_json()
    doc = json.loads(text)
    assert doc["num_tasks"] == 4 and doc["num_modules"] == 3
    arch = Architecture.from_json(text)
    assert arch == d.architecture
    templates = [nn.Sequential(nn.Linear(3, 3), nn.Tanh()) for _ in range(3)]
    rebuilt = build_network(arch, templates, [nn.Linear(3, 1) for _ in range(4)])
    rebuilt.load_state_dict(d.network.state_dict())
    x = torch.randn(6, 3)
    with torch.no_grad():
        for a, b in zip(d.network(x), rebuilt(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    fresh = build_network(arch, templates, [nn.Linear(3, 1) for _ in range(4)], reinit=True)
    assert not torch.equal(fresh.trunk[0][0].weight, templates[0][0].weight)


def test_architecture_canonical_and_levels() -> None:
    a = Architecture(3, 2, (Branch((2,), 2), Branch((1, 0), 3)))
    b = Architecture(3, 2, (Branch((0, 1), 3), Branch((2,), 2)))
    assert a == b and a.to_json() == b.to_json()
    assert a.groups == [(0, 1), (2,)]
    assert a.levels() == [[(0, 1, 2)], [(0, 1), (2,)]]
    assert Architecture.hard_sharing(3, 2).levels() == [[(0, 1, 2)], [(0, 1, 2)]]
    assert Architecture.single_task(3, 2).branch_points == [1, 1, 1]
    assert Architecture.single_task(3, 2).trunk_depth == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.data())
def test_levels_partition_and_refine(T: int, K: int, data: st.DataObject) -> None:
    labels = data.draw(st.lists(st.integers(0, T - 1), min_size=T, max_size=T))
    groups: dict[int, list[int]] = {}
    for t, g in enumerate(labels):
        groups.setdefault(g, []).append(t)
    branches = tuple(Branch(tuple(ts), data.draw(st.integers(1, K + 1))) for ts in groups.values())
    arch = Architecture(T, K, branches)
    assert Architecture.from_dict(arch.to_dict()) == arch
    prev = None
    for part in arch.levels():
        flat = sorted(t for block in part for t in block)
        assert flat == list(range(T))
        if prev is not None:  # every block of a level lies inside one block of the level before
            for block in part:
                assert any(set(block) <= set(p) for p in prev)
        prev = part
    net = build_network(arch, [nn.Linear(2, 2) for _ in range(K)])
    outs = net(torch.randn(3, 2))
    assert len(outs) == T
    for m, tasks in net.module_tasks():
        assert len(tasks) >= 1
    shared = {id(p) for p in net.shared_parameters()}
    for m, tasks in net.module_tasks():
        assert all((id(p) in shared) == (len(tasks) >= 2) for p in m.parameters())


def test_bad_architectures() -> None:
    with pytest.raises(ValueError, match="partition"):
        Architecture(3, 2, (Branch((0, 1), 3),))
    with pytest.raises(ValueError, match="partition"):
        Architecture(2, 2, (Branch((0, 1), 3), Branch((1,), 2)))
    with pytest.raises(ValueError, match="outside"):
        Architecture(2, 2, (Branch((0, 1), 4),))
    with pytest.raises(ValueError, match="no tasks"):
        Architecture(1, 2, (Branch((0,), 3), Branch((), 2)))
    with pytest.raises(ValueError, match="format"):
        Architecture.from_json('{"num_tasks": 1}')
    with pytest.raises(ValueError, match="malformed"):
        Architecture.from_dict({"format": "torch_mtlgrad.conal.architecture/1", "num_tasks": 1})
    arch = Architecture.hard_sharing(2, 2)
    with pytest.raises(ValueError, match="templates"):
        build_network(arch, [nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="trunk"):
        BranchedNetwork(arch, [nn.Linear(2, 2)], [[]])
    with pytest.raises(TypeError, match="SearchSpace"):
        derive(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_reinitialize_changes_every_parameter() -> None:
    torch.manual_seed(0)
    net = build_network(Architecture.single_task(2, 2), [nn.Linear(3, 3), nn.Linear(3, 3)], [nn.Linear(3, 1)] * 2)
    before = [p.clone() for p in net.parameters()]
    reinitialize(net)
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
