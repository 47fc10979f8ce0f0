"""Conflict noticing (CoNAL eq. 5) against a per-module float64 brute force."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_mtlgrad import FlatLayout, MultiTaskOptimizer
from torch_mtlgrad.aggregators import get
from torch_mtlgrad.conal import ConflictNoticing, SegmentGramian, first_conflict, segment_gramians

# ---------------------------------------------------------------------------------------------
# Reference: eq. 5 written out with numpy loops, one module and one pair at a time.


def ref_conflict_noticing(J: np.ndarray, seg: np.ndarray, K: int) -> tuple[np.ndarray, int, list[int]]:
    """(J with the modules >= p* zeroed, p*, conflicting pairs per module)."""
    T = J.shape[0]
    pairs = []
    for k in range(K):
        cols = np.nonzero(seg == k)[0]
        n = 0
        for i in range(T):
            for j in range(i + 1, T):
                gi, gj = J[i, cols].astype(np.float64), J[j, cols].astype(np.float64)
                ni, nj = np.linalg.norm(gi), np.linalg.norm(gj)
                if ni == 0.0 or nj == 0.0:
                    continue  # a zero gradient is not a conflict
                if float(gi @ gj) / (ni * nj) < 0.0:
                    n += 1
        pairs.append(n)
    pstar = next((k for k in range(K) if pairs[k] > 0), K)
    out = J.copy()
    out[:, (seg >= pstar) & (seg >= 0)] = 0.0
    return out, pstar, pairs


class Holder(nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in sizes])


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[Holder], list[nn.Parameter], np.ndarray]:
    """Random modules (random parameter sizes, shuffled into the layout), extra unlisted
    shared parameters, and a J with zero-gradient blocks and exactly orthogonal pairs."""
    T = draw(st.integers(1, 5))
    K = draw(st.integers(1, 5))
    modules = [Holder(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))) for _ in range(K)]
    extra = [nn.Parameter(torch.zeros(draw(st.integers(1, 3)), dtype=torch.float64)) for _ in range(draw(st.integers(0, 2)))]
    params = [p for m in modules for p in m.parameters()] + extra
    order = draw(st.permutations(list(range(len(params)))))
    params = [params[i] for i in order]
    D = sum(p.numel() for p in params)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        J = rng.integers(-2, 3, size=(T, D)).astype(np.float64)  # many exact zeros / orthogonal pairs
    else:
        J = rng.standard_normal((T, D))
    # zero the gradient of some task on some module (and sometimes a whole row)
    layout = FlatLayout(params)
    seg = layout.segment_ids(modules).numpy()
    for _ in range(draw(st.integers(0, 3))):
        t, k = draw(st.integers(0, T - 1)), draw(st.integers(0, K - 1))
        J[t, seg == k] = 0.0
    if draw(st.booleans()) and T >= 2:
        # an exactly orthogonal pair on a random module: g_1 = (a, b), g_0 = (b, -a) on two columns
        k = draw(st.integers(0, K - 1))
        cols = np.nonzero(seg == k)[0]
        if cols.size >= 2:
            J[:2, cols] = 0.0
            a, b = float(draw(st.integers(1, 3))), float(draw(st.integers(1, 3)))
            J[0, cols[0]], J[0, cols[1]] = a, b
            J[1, cols[0]], J[1, cols[1]] = b, -a
    return modules, params, J


@settings(max_examples=40, deadline=None)
@given(problems())
def test_transform_matches_brute_force(problem: tuple[list[Holder], list[nn.Parameter], np.ndarray]) -> None:
    modules, params, J = problem
    layout = FlatLayout(params)
    K = len(modules)
    seg = layout.segment_ids(modules).numpy()
    want, pstar, pairs = ref_conflict_noticing(J, seg, K)
    cn = ConflictNoticing(modules, window=4)
    cn.bind(layout)
    Jt = torch.from_numpy(J.copy())
    out = cn.transform(Jt, torch.zeros(J.shape[0], dtype=torch.float64))
    assert out is Jt  # edited in place
    np.testing.assert_array_equal(out.numpy(), want)
    assert int(cn.diagnostics["conflict_pstar"]) == pstar
    assert cn.diagnostics["conflict_pairs"].tolist() == pairs
    # the cosine matrices agree with the brute force on every pair with non-zero gradients
    cos = cn.diagnostics["conflict_cosines"].numpy()
    for k in range(K):
        cols = seg == k
        for i in range(J.shape[0]):
            for j in range(J.shape[0]):
                ni, nj = np.linalg.norm(J[i, cols]), np.linalg.norm(J[j, cols])
                ref = 0.0 if ni == 0 or nj == 0 else J[i, cols] @ J[j, cols] / (ni * nj)
                assert cos[k, i, j] == pytest.approx(ref, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.integers(-1, 3), min_size=1, max_size=30),
    st.one_of(st.none(), st.integers(1, 7)),
    st.integers(0, 1000),
)
def test_segment_gramian_matches_loops(T: int, seg: list[int], block: int | None, seed: int) -> None:
    K = 4
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, len(seg), generator=g, dtype=torch.float64)
    s = torch.tensor(seg)
    G = SegmentGramian(s, K, block)(J)
    for k in range(K):
        Jk = J[:, s == k]
        torch.testing.assert_close(G[k], Jk @ Jk.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(segment_gramians(J, s, K, block), G)


def test_segment_gramian_padding_is_bounded() -> None:
    # one large segment next to tiny ones: auto block size keeps the copy within about 2 D
    seg = torch.cat([torch.zeros(1000, dtype=torch.long), torch.tensor([1, 2, 3])])
    sg = SegmentGramian(seg, 4)
    assert sg.num_blocks * sg.block_size <= 2 * seg.numel() + sg.block_size
    assert sg.num_blocks <= 2 * 4


def test_first_conflict_and_tol() -> None:
    G = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, -0.05], [-0.05, 1.0]], [[1.0, -0.5], [-0.5, 1.0]]])
    assert int(first_conflict(G)) == 1
    assert int(first_conflict(G, tol=0.1)) == 2
    assert int(first_conflict(G, tol=0.9)) == 3


def test_tol_matches_cosine_threshold() -> None:
    lin = nn.Linear(2, 1, bias=False)
    cn = ConflictNoticing([lin], tol=0.5)
    cn.bind(FlatLayout(list(lin.parameters())))
    J = torch.tensor([[1.0, 0.0], [-0.4, 1.0]])  # cos = -0.37 > -0.5: not a conflict at tol 0.5
    assert torch.equal(cn.transform(J.clone()), J)
    J2 = torch.tensor([[1.0, 0.0], [-1.0, 0.5]])  # cos = -0.89
    assert cn.transform(J2.clone()).abs().sum() == 0


def _chain(seed: int = 0) -> tuple[nn.ModuleList, nn.ModuleList]:
    torch.manual_seed(seed)
    trunk = nn.ModuleList([nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 4)])
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(3)])
    return trunk, heads


def _losses(trunk: nn.Module, heads: nn.Module, x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    z = x
    for f in trunk:
        z = f(z)
    return [nn.functional.mse_loss(h(z), y) for h, y in zip(heads, ys)]


def _data(seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g)
    return x, [torch.randn(16, 1, generator=g), -3 * x[:, :1], x[:, 1:2] ** 2]


@pytest.mark.parametrize("agg", ["sum", "mgda"])
def test_optimizer_composition_matches_eq5(agg: str) -> None:
    trunk, heads = _chain()
    x, ys = _data()
    # reference: per-task gradients by autograd, eq. 5 by hand, aggregator on the kept columns
    shared = list(trunk.parameters())
    per_task = []
    for loss in _losses(trunk, heads, x, ys):
        per_task.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]))
    J = torch.stack(per_task).double()
    seg = FlatLayout(shared).segment_ids(list(trunk)).numpy()
    Jz, pstar, _ = ref_conflict_noticing(J.numpy(), seg, 3)
    want = get(agg)(torch.from_numpy(Jz)).float()
    head_grads = [torch.autograd.grad(l, list(h.parameters()), retain_graph=True) for l, h in zip(_losses(trunk, heads, x, ys), heads)]

    opt = MultiTaskOptimizer(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1), shared=trunk,
                             aggregator=agg, plugins=[ConflictNoticing(list(trunk))])
    opt.zero_grad()
    opt.backward(_losses(trunk, heads, x, ys))
    got = torch.cat([p.grad.flatten() for p in shared])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert int(opt.plugins[0].diagnostics["conflict_pstar"]) == pstar
    dropped = torch.from_numpy((seg >= pstar) & (seg >= 0))
    assert torch.all(got[dropped] == 0)
    # task-specific heads get their own task's gradient (the sum over tasks), untouched
    for h, gs in zip(heads, head_grads):
        for p, g in zip(h.parameters(), gs):
            torch.testing.assert_close(p.grad, g)


def test_sum_gives_sum_on_kept_modules_and_constructor_sugar() -> None:
    trunk, heads = _chain(3)
    x, ys = _data(5)
    shared = list(trunk.parameters())
    J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                     for loss in _losses(trunk, heads, x, ys)])
    opt = MultiTaskOptimizer(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1), shared=trunk,
                             aggregator="sum", conflict_noticing=list(trunk))
    assert isinstance(opt.plugins[0], ConflictNoticing)
    opt.zero_grad()
    opt.backward(_losses(trunk, heads, x, ys))
    pstar = int(opt.plugins[0].diagnostics["conflict_pstar"])
    seg = opt.layout.segment_ids(list(trunk))
    got = torch.cat([p.grad.flatten() for p in shared])
    keep = (seg < pstar) & (seg >= 0)
    torch.testing.assert_close(got[keep], J.sum(0)[keep])
    assert torch.all(got[~keep] == 0)


def test_zero_false_only_records() -> None:
    lin1, lin2 = nn.Linear(2, 2), nn.Linear(2, 1)
    cn = ConflictNoticing([lin1, lin2], zero=False)
    cn.bind(FlatLayout([*lin1.parameters(), *lin2.parameters()]))
    J = torch.randn(3, 9)
    J[1] = -J[0]
    out = cn.transform(J.clone())
    assert torch.equal(out, J)
    assert int(cn.diagnostics["conflict_pstar"]) == 0


def _run_steps(cn: ConflictNoticing, Js: list[torch.Tensor]) -> None:
    for J in Js:
        cn.transform(J.clone())


def test_window_ratio_history_and_reset() -> None:
    a, b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    cn = ConflictNoticing([a, b], window=3)
    cn.bind(FlatLayout([*a.parameters(), *b.parameters()]))
    steps = [
        torch.tensor([[1.0, 1.0], [1.0, -1.0]]),  # module b conflicts -> p* = 1
        torch.tensor([[1.0, 1.0], [-1.0, 1.0]]),  # module a conflicts -> p* = 0
        torch.tensor([[1.0, 1.0], [1.0, 1.0]]),  # none -> p* = 2
        torch.tensor([[1.0, 0.0], [-1.0, 0.0]]),  # a conflicts, b zero gradient -> p* = 0
    ]
    _run_steps(cn, steps)
    assert cn.pstar_history().tolist() == [0, 2, 0]
    torch.testing.assert_close(cn.conflict_ratio("window"), torch.tensor([2 / 3, 0.0]))
    torch.testing.assert_close(cn.conflict_ratio("total"), torch.tensor([2 / 4, 1 / 4]))
    d = cn.to_dict()
    assert d["pstar"] == [0, 2, 0] and d["steps"] == 4 and d["modules"] == ["module0", "module1"]
    assert d["conflict_ratio_total"] == pytest.approx([0.5, 0.25])
    cn.reset_counts()
    assert cn.conflict_ratio("total").tolist() == [0.0, 0.0]
    torch.testing.assert_close(cn.conflict_ratio("window"), torch.tensor([2 / 3, 0.0]))


def test_state_dict_roundtrip_gives_same_diagnostics() -> None:
    mods = [nn.Linear(2, 2), nn.Linear(2, 2)]
    layout = FlatLayout([p for m in mods for p in m.parameters()])
    g = torch.Generator().manual_seed(0)
    Js = [torch.randn(4, layout.numel, generator=g) for _ in range(9)]
    a = ConflictNoticing(mods, window=5)
    a.bind(layout)
    _run_steps(a, Js[:6])
    b = ConflictNoticing(mods, window=5)
    b.bind(layout)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    _run_steps(a, Js[6:])
    _run_steps(b, Js[6:])
    assert a.to_dict() == b.to_dict()
    with pytest.raises(ValueError, match="window"):
        ConflictNoticing(mods, window=4).load_state_dict(a.state_dict())


def test_state_inside_optimizer_state_dict() -> None:
    trunk, heads = _chain()
    x, ys = _data()

    def make() -> MultiTaskOptimizer:
        return MultiTaskOptimizer(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.0), shared=trunk,
                                  aggregator="sum", conflict_noticing=list(trunk))

    opt = make()
    for _ in range(3):
        opt.zero_grad()
        opt.backward(_losses(trunk, heads, x, ys))
        opt.step()
    opt2 = make()
    opt2.load_state_dict(opt.state_dict())
    assert opt2.plugins[0].to_dict() == opt.plugins[0].to_dict()


def test_bad_input() -> None:
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="at least one"):
        ConflictNoticing([])
    with pytest.raises(ValueError, match="no parameters"):
        ConflictNoticing([nn.Tanh()])
    with pytest.raises(ValueError, match="window"):
        ConflictNoticing([lin], window=0)
    with pytest.raises(ValueError, match="tol"):
        ConflictNoticing([lin], tol=-1.0)
    cn = ConflictNoticing([lin])
    with pytest.raises(RuntimeError, match="bind"):
        cn.transform(torch.zeros(2, 6))
    cn.bind(FlatLayout(list(lin.parameters())))
    with pytest.raises(ValueError, match="shape"):
        cn.transform(torch.zeros(2, 5))
    cn.transform(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="rows"):
        cn.transform(torch.zeros(3, 6))
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not shared"):
        ConflictNoticing([other]).bind(FlatLayout(list(lin.parameters())))
    with pytest.raises(ValueError, match="over"):
        cn.conflict_ratio("epoch")


def test_plugin_diagnostics_reach_the_optimizer() -> None:
    import torch
    from torch import nn

    from torch_mtlgrad import MultiTaskOptimizer

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])
    opt = MultiTaskOptimizer(torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1),
                             shared=enc, aggregator="sum", conflict_noticing=[enc[0], enc[2]])
    x = torch.randn(8, 3)
    z = enc(x)
    opt.backward([h(z).pow(2).mean() for h in heads])
    key = "ConflictNoticing.conflict_pstar"
    assert key in opt.diagnostics
    assert torch.equal(opt.diagnostics[key], opt.plugins[0].diagnostics["conflict_pstar"])
