"""The contract every aggregator keeps with the rest of the library, checked method by method
for PCGrad, GradDrop, GradVac, IMTL-G, CAGrad, Aligned-MTL, RLW and Constant: seeded
reproducibility of the random ones, checkpoint resume and reset, composition with the tensioner,
the registry paths and names, the ``gramian_only`` flags, input validation, and training through
``MultiTaskOptimizer``.  (Each method's mathematical properties are in its own test file.)
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import Aggregator, Central, Mean, MinNorm, Tensioned, available, get
from torch_mtlgrad.aggregators.alignedmtl import AlignedMTL
from torch_mtlgrad.aggregators.cagrad import CAGrad
from torch_mtlgrad.aggregators.constant import Constant
from torch_mtlgrad.aggregators.graddrop import GradDrop
from torch_mtlgrad.aggregators.gradvac import GradVac
from torch_mtlgrad.aggregators.imtlg import IMTLG
from torch_mtlgrad.aggregators.pcgrad import PCGrad
from torch_mtlgrad.aggregators.rlw import RLW

from .._properties import assert_non_conflicting
from ..strategies import jacobians

# name -> builder(T, seed).  Constant needs T weights; the random ones take the seed.
BUILDERS: dict[str, Callable[[int, int], Aggregator]] = {
    "pcgrad": lambda T, s: PCGrad(seed=s),
    "graddrop": lambda T, s: GradDrop(seed=s),
    "gradvac": lambda T, s: GradVac(beta=0.3, seed=s),
    "imtlg": lambda T, s: IMTLG(),
    "cagrad": lambda T, s: CAGrad(),
    "alignedmtl": lambda T, s: AlignedMTL(),
    "rlw": lambda T, s: RLW(seed=s),
    "constant": lambda T, s: Constant([0.5 + t for t in range(T)]),
}
NAMES = sorted(BUILDERS)
RANDOM = {"pcgrad", "graddrop", "gradvac", "rlw"}
# Registry entries: name -> (file, class).
REGISTRY = {
    "pcgrad": ("pcgrad", "PCGrad"), "graddrop": ("graddrop", "GradDrop"),
    "gradvac": ("gradvac", "GradVac"), "imtlg": ("imtlg", "IMTLG"), "cagrad": ("cagrad", "CAGrad"),
    "alignedmtl": ("alignedmtl", "AlignedMTL"), "rlw": ("rlw", "RLW"),
    "constant": ("constant", "Constant"),
}


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_seeded_reproducibility(name: str) -> None:
    torch.manual_seed(0)
    Js = [torch.randn(4, 6, dtype=torch.float64) for _ in range(5)]
    a, b, c = BUILDERS[name](4, 7), BUILDERS[name](4, 7), BUILDERS[name](4, 8)
    out_a = [a(J) for J in Js]
    out_b = [b(J) for J in Js]
    out_c = [c(J) for J in Js]
    assert all(torch.equal(x, y) for x, y in zip(out_a, out_b))
    assert not all(torch.equal(x, y) for x, y in zip(out_a, out_c))  # the seed matters
    # A user generator is used as given; the same generator state gives the same draws.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    cls = type(a)
    kw = {"beta": 0.3} if name == "gradvac" else {}
    x, y = cls(generator=g1, **kw), cls(generator=g2, **kw)
    assert all(torch.equal(x(J), y(J)) for J in Js)
    # Without seed or generator, torch.manual_seed makes the draws reproducible.
    torch.manual_seed(11)
    p = cls(**kw)
    torch.manual_seed(11)
    q = cls(**kw)
    assert all(torch.equal(p(J), q(J)) for J in Js)
    with pytest.raises(ValueError, match="either generator or seed"):
        cls(generator=torch.Generator(), seed=1, **kw)
    with pytest.raises(TypeError, match="seed must be an int"):
        cls(seed=1.5, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_gives_identical_next_steps(name: str) -> None:
    torch.manual_seed(1)
    Js = [torch.randn(3, 7, dtype=torch.float64) for _ in range(6)]
    agg = BUILDERS[name](3, 5)
    for J in Js[:3]:
        agg(J)
    state = copy.deepcopy(agg.state_dict())
    expected = [agg(J) for J in Js[3:]]
    fresh = BUILDERS[name](3, 99)  # a different seed: the state must carry everything
    fresh.load_state_dict(state)
    got = [fresh(J) for J in Js[3:]]
    assert all(torch.equal(x, y) for x, y in zip(expected, got)), name
    # reset() starts over: the same outputs as a fresh instance with the same seed.
    agg.reset()
    again = BUILDERS[name](3, 5)
    assert all(torch.equal(agg(J), again(J)) for J in Js)
    assert type(agg).stateful == (name in RANDOM)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       feasibility=st.sampled_from(["project", "segment"]))
def test_composes_with_tension(name: str, J: torch.Tensor, feasibility: str) -> None:
    T = J.shape[0]
    agg = Tensioned(BUILDERS[name](T, 0), alpha=1.0, window=1, feasibility=feasibility)
    losses = torch.linspace(0.1, 10.0, T, dtype=torch.float64)
    agg(J * 0.5, losses)
    d = agg(J, losses)
    assert agg.diagnostics["tensioned"].item() == 1.0
    assert_non_conflicting(d, J, rtol=1e-7)  # the tensioner's feasibility step
    # The tensioner's checkpoint carries the base method's state too.
    state = copy.deepcopy(agg.state_dict())
    nxt = agg(J * 1.5, losses)
    other = Tensioned(BUILDERS[name](T, 1), alpha=1.0, window=1, feasibility=feasibility)
    other.load_state_dict(state)
    assert torch.equal(other(J * 1.5, losses), nxt)


@pytest.mark.parametrize("name", NAMES)
def test_registry_paths_resolve(name: str) -> None:
    """The registry maps ``name -> torch_mtlgrad.aggregators.<file>:<Class>``: both exist, and
    the class documents an example."""
    file, cls = REGISTRY[name]
    mod = importlib.import_module(f"torch_mtlgrad.aggregators.{file}")
    klass = getattr(mod, cls)
    assert issubclass(klass, Aggregator)
    assert klass.__doc__ and "Example" in klass.__doc__


def test_gramian_only_flags() -> None:
    """Methods that need only G say so; GradDrop needs the elements of J."""
    for cls in (PCGrad, GradVac, IMTLG, CAGrad, AlignedMTL):
        assert cls.gramian_only, cls
    assert not GradDrop.gramian_only
    # RLW and Constant read neither J nor G: nothing to compute from G.
    assert not RLW.gramian_only and not Constant.gramian_only
    for cls in (PCGrad, GradVac, IMTLG, CAGrad, AlignedMTL):
        # Gramian-only methods give the same direction for any J with the same Gramian: J Q
        # for an orthogonal Q.
        torch.manual_seed(3)
        J = torch.randn(4, 6, dtype=torch.float64)
        Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
        kw = {"seed": 0} if cls in (PCGrad, GradVac) else {}
        a, b = cls(**kw), cls(**kw)
        da, db = a(J), b(J @ Q)
        assert torch.allclose(da @ Q, db, atol=1e-6 * float(J.norm()))


def _train(agg: Aggregator, dtype: torch.dtype, steps: int, state: dict | None = None,
           params: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], dict]:
    """A few SGD steps of a 3-task model through MultiTaskOptimizer; returns params and state."""
    from torch_mtlgrad.optimizer import MultiTaskOptimizer

    torch.manual_seed(0)
    enc = torch.nn.Linear(3, 4).to(dtype)
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(3)]).to(dtype)
    model = torch.nn.ModuleList([enc, heads])
    if params is not None:
        with torch.no_grad():
            for p, v in zip(model.parameters(), params):
                p.copy_(v)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                             shared=enc, aggregator=agg)
    if state is not None:
        opt.load_state_dict(state)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=gen, dtype=dtype)
    ys = [torch.randn(16, 1, generator=gen, dtype=dtype) for _ in range(3)]
    for _ in range(steps):
        opt.zero_grad()
        z = torch.tanh(enc(x))
        losses = [torch.nn.functional.mse_loss(h(z), y) for h, y in zip(heads, ys)]
        opt.backward(losses)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tension", [False, True])
def test_through_the_optimizer_and_resume(name: str, tension: bool) -> None:
    """Each method drives MultiTaskOptimizer (float32 and float64); a checkpoint taken after two
    steps resumes to the same third step, bit for bit."""
    def build() -> Aggregator:
        base = BUILDERS[name](3, 4)
        return Tensioned(base, window=1) if tension else base

    for dtype in (torch.float32, torch.float64):
        full, _ = _train(build(), dtype, 3)
        assert all(bool(torch.isfinite(p).all()) for p in full)
        two, state = _train(build(), dtype, 2)
        resumed, _ = _train(build(), dtype, 1, state=state, params=two)
        assert all(torch.equal(a, b) for a, b in zip(full, resumed)), (name, tension, dtype)


def test_registry() -> None:
    names = available()
    for n in ["mean", "sum", "mgda", "central", "mean+tension", "central+tension"]:
        assert n in names
    assert isinstance(get("MGDA"), MinNorm)
    t = get("mgda+tension", alpha=0.5, window=3, normalization="l2")
    assert isinstance(t, Tensioned) and t.alpha == 0.5 and t.base.normalization == "l2"
    with pytest.raises(ValueError, match="unknown aggregator"):
        get("nope")
    with pytest.raises(TypeError):
        get(3)  # type: ignore[arg-type]


def test_aggregator_input_checks() -> None:
    with pytest.raises(ValueError, match="shape \\[T, D\\]"):
        Mean()(torch.ones(3))
    with pytest.raises(ValueError, match="no rows"):
        Mean()(torch.ones(0, 3))
    with pytest.raises(TypeError, match="floating-point"):
        Mean()(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="losses must have shape \\[2\\]"):
        Mean()(torch.ones(2, 3), torch.ones(3))
    # Half-precision input is aggregated in float32 and cast back.
    J = torch.randn(3, 6).to(torch.bfloat16)
    d = Central()(J)
    assert d.dtype == torch.bfloat16
    assert torch.allclose(d.float(), Central()(J.float()).to(torch.bfloat16).float())
