"""The registry's names and the scale conventions: aliases, suggestions for misspelt names,
messages for missing and unknown arguments (found from each constructor's signature, so a new
method is covered), the MGDA-UB redirect, the order of the suffixes, every method's
``scale_convention`` checked numerically, and the ``Rescaled`` wrapper (``"*T"``)."""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from torch_mtlgrad.aggregators import (
    Aggregator,
    Rescaled,
    Tensioned,
    aliases,
    available,
    get,
    resolve,
    scale_convention,
)
from torch_mtlgrad.aggregators import _registry as reg

CANONICAL = sorted(reg._ENTRIES)
TENSIONABLE = [n for n in CANONICAL if reg._ENTRIES[n][2]]
# Test values for required constructor arguments, by parameter name (T: the number of tasks).
REQUIRED_VALUES: dict[str, Callable[[int], Any]] = {"weights": lambda T: [1.0] * T}


def _required(name: str) -> list[str]:
    cls = reg._resolve(name)
    return [p.name for p in inspect.signature(cls).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


def _kwargs(name: str, T: int) -> dict[str, Any]:
    out = {}
    for p in _required(name):
        if p not in REQUIRED_VALUES:
            pytest.fail(f"{name!r} requires {p!r}: add a test value to REQUIRED_VALUES")
        out[p] = REQUIRED_VALUES[p](T)
    return out


def _build(form: str, T: int, seed: int | None = None) -> Aggregator:
    """``form`` (any name form) with test values for required arguments and, for a tensioned
    form, ``window=1`` so that the tension applies from the second call; ``seed`` for a method
    that takes one."""
    base, tension, _, _ = reg._parse(form)
    kw = _kwargs(base, T)
    if tension:
        kw["window"] = 1
    if seed is not None and "seed" in inspect.signature(reg._resolve(base)).parameters:
        kw["seed"] = seed
    return get(form, **kw)


# -- aliases ---------------------------------------------------------------------------------------
ASKED = ["nash_mtl", "nash-mtl", "pc-grad", "pc_grad", "imtl-g", "imtl_g", "grad-drop", "grad_vac",
         "gradvac", "aligned-mtl", "aligned_mtl", "dual-proj", "up-grad", "ca-grad", "min-norm",
         "minnorm", "uncertainty", "uncertainty-weighting", "grad-norm"]


def test_the_asked_spellings_are_accepted() -> None:
    for name in ASKED:
        assert name in aliases() or name in CANONICAL, name


def test_the_alias_table() -> None:
    table = aliases()
    assert table and all(t in reg._ENTRIES for t in table.values())
    assert not set(table) & set(reg._ENTRIES)
    assert not set(table) & set(available())  # available() lists canonical names only
    table["nash-mtl"] = "mean"  # a copy
    assert aliases()["nash-mtl"] == "nashmtl"


@pytest.mark.parametrize("alias", sorted(aliases()))
def test_alias_builds_the_canonical_class(alias: str) -> None:
    canonical = aliases()[alias]
    T = 3
    kw = _kwargs(canonical, T)
    assert type(get(alias, **kw)) is type(get(canonical, **kw))
    assert type(get(f"  {alias.upper()}  ", **kw)) is type(get(canonical, **kw))
    rescaled = get(alias + "*T", **kw)
    assert isinstance(rescaled, Rescaled) and type(rescaled.base) is type(get(canonical, **kw))
    if reg._ENTRIES[canonical][2]:
        for form in (alias + "+tension", f" {alias.upper()} + Tension ", alias + "+TENSION"):
            t = get(form, **kw)
            assert isinstance(t, Tensioned) and type(t.base) is type(get(canonical, **kw)), form
        both = get(alias + "+tension*t", **kw)
        assert isinstance(both, Rescaled) and isinstance(both.base, Tensioned)
        assert type(both.base.base) is type(get(canonical, **kw))
        assert scale_convention(alias + "+tension") == scale_convention(canonical + "+tension")
    assert scale_convention(alias) == scale_convention(canonical)


def test_resolve_takes_aliases() -> None:
    assert type(resolve("Nash-MTL")) is type(get("nashmtl"))


# -- misspelt names --------------------------------------------------------------------------------
def test_the_misspelling_message() -> None:
    with pytest.raises(ValueError) as err:
        get("nashmt")
    assert str(err.value) == ("unknown aggregator 'nashmt'; did you mean 'nashmtl'? (all names: "
                              "torch_mtlgrad.aggregators.available())")


@pytest.mark.parametrize("wrong,meant", [
    ("nashmt", "'nashmtl'"), ("nash-mt", "'nashmtl'"), ("mgdaa", "'mgda'"), ("pcgard", "'pcgrad'"),
    ("upgrd", "'upgrad'"), ("centrl+tension", "'central+tension'"),
    ("mgda+tensoin", "'mgda+tension'"), ("gradvacc*T", "'gradvac*T'"), ("Aligned-MT", "'alignedmtl'"),
    ("uncertanty", "'uw'"), ("dual-prj", "'dualproj'"),
])
def test_misspelt_names_get_suggestions(wrong: str, meant: str) -> None:
    with pytest.raises(ValueError, match="unknown aggregator") as err:
        get(wrong)
    msg = str(err.value)
    assert "did you mean" in msg and meant in msg and "available()" in msg, msg
    # Every suggestion is an accepted canonical name.
    for s in msg.split("did you mean ")[1].split("?")[0].replace(" or ", ", ").split(", "):
        s = s.strip("'")
        assert s.removesuffix("*T") in available(), s


def test_a_name_far_from_all_lists_the_methods() -> None:
    with pytest.raises(ValueError, match="unknown aggregator 'zzzzqqq': the methods are") as err:
        get("zzzzqqq")
    assert all(n in str(err.value) for n in CANONICAL)


def test_mgda_ub_is_a_capture_mode() -> None:
    for name in ("mgda-ub", "MGDA-UB", "mgda_ub"):
        with pytest.raises(ValueError, match="capture='representation'") as err:
            get(name)
        assert "aggregator='mgda'" in str(err.value) and "features=" in str(err.value)
    with pytest.raises(ValueError, match="aggregator='mgda\\+tension'"):
        get("mgda-ub+tension")


def test_the_order_of_the_suffixes() -> None:
    with pytest.raises(ValueError, match="'<name>\\+tension\\*T'") as err:
        get("mgda*T+tension")
    assert "'mgda+tension*T'" in str(err.value)
    with pytest.raises(ValueError, match="order"):
        scale_convention("mgda*T+tension")
    assert isinstance(get("mgda+tension*T"), Rescaled)
    with pytest.raises(ValueError, match="loss weighting"):
        get("uw+tension")
    assert isinstance(get("uw*T"), Rescaled)


# -- arguments -------------------------------------------------------------------------------------
NEEDING = [n for n in CANONICAL if _required(n)]


def test_some_method_needs_arguments() -> None:
    assert "constant" in NEEDING  # so the next tests check something
    # One example per method with required arguments, and none for the others.
    assert set(reg._EXAMPLES) == set(NEEDING)


def test_the_constant_message() -> None:
    with pytest.raises(TypeError) as err:
        get("constant")
    assert str(err.value) == (
        "aggregator 'constant' needs the argument(s) weights: e.g. get('constant', "
        "weights=[1.0, 2.0]) or MultiTaskOptimizer(..., aggregator=Constant([1.0, 2.0]))")


@pytest.mark.parametrize("name", NEEDING)
def test_missing_required_arguments_are_named(name: str) -> None:
    missing = ", ".join(_required(name))
    forms = [name, name + "*T"] + ([name + "+tension", name + "+tension*T"]
                                   if reg._ENTRIES[name][2] else [])
    for form in forms:
        with pytest.raises(TypeError, match="needs the argument") as err:
            get(form)
        msg = str(err.value)
        assert f"aggregator {form!r}" in msg and missing in msg, msg
        assert f"get({form!r}, " in msg and "MultiTaskOptimizer(..., aggregator=" in msg, msg
        if "+tension" in form:
            assert "Tensioned(" in msg
        if form.endswith("*T"):
            assert "Rescaled(" in msg
        with pytest.raises(TypeError, match="needs the argument"):
            resolve(form)
    get(name, **_kwargs(name, 3))  # the test values build it


@pytest.mark.parametrize("name", CANONICAL)
def test_unknown_keyword_arguments_are_named(name: str) -> None:
    params = [p for p in inspect.signature(reg._resolve(name)).parameters]
    with pytest.raises(TypeError, match="takes no argument") as err:
        get(name, bogus_argument=1, **_kwargs(name, 3))
    msg = str(err.value)
    assert repr(name) in msg and "'bogus_argument'" in msg, msg
    assert all(p in msg for p in params), msg


def test_unknown_keyword_arguments_suggest_the_close_one() -> None:
    with pytest.raises(TypeError, match="did you mean 'order' for 'ordr'\\?") as err:
        get("pcgrad", ordr="fixed")
    assert "PCGrad" in str(err.value)
    with pytest.raises(TypeError, match="'alpha' for 'alpah'") as err:
        get("mgda+tension", alpah=0.3)
    assert "window" in str(err.value) and "normalization" in str(err.value)


def test_tension_arguments_still_go_to_the_tensioner() -> None:
    t = get("mgda+tension", alpha=0.5, window=3, normalization="l2")
    assert isinstance(t, Tensioned) and t.alpha == 0.5 and t.window == 3
    assert t.base.normalization == "l2"


# -- scale conventions, numerically ----------------------------------------------------------------
CALLS = 4


def _losses(T: int, gen: torch.Generator) -> Tensor:
    return torch.rand(T, generator=gen, dtype=torch.float64) + 0.5


def _sum_violations(form: str) -> list[str]:
    """Calls on ``T`` equal rows ``g`` where ``d != T g``."""
    out = []
    for seed, T in enumerate((2, 3, 5)):
        gen = torch.Generator().manual_seed(seed)
        agg = _build(form, T)
        for k in range(CALLS):
            g = torch.randn(6, generator=gen, dtype=torch.float64)
            g = g * float(torch.exp(torch.empty(()).uniform_(-3, 3, generator=gen)))
            J = g.expand(T, -1).clone()
            d = agg.aggregate(J, _losses(T, gen)).direction
            assert d is not None
            if not torch.allclose(d, T * g, rtol=1e-9, atol=1e-12 * float(g.norm())):
                out.append(f"T={T} call {k}: |d - T g| / |T g| = "
                           f"{float((d - T * g).norm() / (T * g).norm()):.3g}")
    return out


def _convex_violations(form: str) -> list[str]:
    """Calls on random ``J`` without weights of the rows or whose weights do not sum to 1, or
    (with non-negative weights) whose direction is longer than the longest row."""
    out = []
    for seed, (T, scale) in enumerate([(2, 1.0), (3, 1.0), (4, 1e-3), (5, 1e3), (3, 1e-3)]):
        gen = torch.Generator().manual_seed(100 + seed)
        agg = _build(form, T)
        for k in range(CALLS):
            J = torch.randn(T, 6, generator=gen, dtype=torch.float64)
            J = J * torch.exp(torch.randn(T, 1, generator=gen, dtype=torch.float64)) * scale
            longest = float(J.norm(dim=1).max())
            out_k = agg.aggregate(J, _losses(T, gen))
            d, w = out_k.direction, out_k.weights
            assert d is not None
            if w is None:
                out.append(f"T={T} call {k}: no weights of the rows")
            elif abs(float(w.sum()) - 1.0) > 1e-9:
                out.append(f"T={T} call {k}: weights sum to {float(w.sum())!r}")
            if w is not None and bool((w >= 0).all()) and float(d.norm()) > longest * (1 + 1e-9):
                out.append(f"T={T} call {k}: |d| = {float(d.norm()):.3g} > {longest:.3g}")
    return out


def _check_convention(form: str) -> None:
    conv = scale_convention(form)
    assert conv in ("sum", "convex", "unnormalised")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sums, convexes = _sum_violations(form), _convex_violations(form)
    if conv == "sum":
        assert sums == [], (form, sums)
    elif conv == "convex":
        assert convexes == [], (form, convexes)
    else:  # neither, which each check must show
        assert sums and convexes, (form, sums, convexes)


# (a method that reads a validation batch checks its convention in its own file)
@pytest.mark.parametrize("name", [n for n in CANONICAL if not reg.needs_validation(n)])
def test_scale_convention(name: str) -> None:
    _check_convention(name)


@pytest.mark.parametrize("name", TENSIONABLE)
def test_scale_convention_with_tension(name: str) -> None:
    _check_convention(name + "+tension")


@pytest.mark.parametrize("name", [n for n in CANONICAL if reg._SCALES[n] == "convex"])
def test_scale_convention_rescaled(name: str) -> None:
    assert scale_convention(name + "*T") == "sum"
    _check_convention(name + "*T")


def test_every_method_has_a_convention() -> None:
    assert set(reg._SCALES) == set(reg._ENTRIES)
    assert scale_convention("mean") == "convex" and scale_convention("sum") == "sum"
    assert scale_convention("sum*T") == "unnormalised"
    assert scale_convention("mgda+tension*T") == "unnormalised"


# -- Rescaled --------------------------------------------------------------------------------------
def _rescaled_matches(form: str) -> None:
    """``Rescaled`` of a copy of ``form`` gives exactly ``T`` times its direction and weights, call
    after call (stateful and random bases included: both copies start from the same state)."""
    for seed, T in enumerate((2, 4)):
        gen = torch.Generator().manual_seed(7 + seed)
        base = _build(form, T)
        wrapped = Rescaled(copy.deepcopy(base))
        for _ in range(CALLS):
            J = torch.randn(T, 5, generator=gen, dtype=torch.float64)
            losses = _losses(T, gen)
            a, b = base.aggregate(J, losses), wrapped.aggregate(J, losses)
            assert a.direction is not None and b.direction is not None
            torch.testing.assert_close(b.direction, T * a.direction, rtol=1e-14, atol=0)
            assert b.direction.dtype == torch.float64
            if a.weights is None:
                assert b.weights is None and wrapped.weights is None
            else:
                assert b.weights is not None
                torch.testing.assert_close(b.weights, T * a.weights, rtol=1e-14, atol=0)
                assert wrapped.weights is b.weights
            assert wrapped.diagnostics is b.diagnostics
            assert set(b.diagnostics) == set(a.diagnostics)


@pytest.mark.parametrize("name", [n for n in CANONICAL if reg._SCALES[n] == "convex"])
def test_rescaled_is_t_times_the_base(name: str) -> None:
    _rescaled_matches(name)
    if reg._ENTRIES[name][2]:
        _rescaled_matches(name + "+tension")


def test_rescaled_docstring_case_orthogonal_rows() -> None:
    J = torch.diag(torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(get("mgda*T")(J), 3 * get("mgda")(J), rtol=1e-15, atol=0)
    assert repr(get("mgda*T")) == "Rescaled(MinNorm(normalization='none', method='auto'))"


@pytest.mark.parametrize("form", [*CANONICAL, *(n + "+tension" for n in TENSIONABLE)])
def test_rescaled_forwards_the_flags(form: str) -> None:
    base, wrapped = _build(form, 3), Rescaled(_build(form, 3))
    for flag in ("gramian_only", "needs_losses", "stateful", "reads", "from_gramian",
                 "runs_on_features"):
        assert getattr(wrapped, flag) == getattr(base, flag), (form, flag)
    assert repr(wrapped) == f"Rescaled({base!r})"


def test_rescaled_on_the_gramian_and_the_losses() -> None:
    gen = torch.Generator().manual_seed(3)
    J = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    losses = _losses(3, gen)
    for name in ("mgda", "central", "imtlg", "upgrad"):
        w = get(name).aggregate_gramian(J @ J.T, losses).weights
        out = get(name + "*T").aggregate_gramian(J @ J.T, losses)
        assert out.direction is None and out.weights is not None and w is not None
        torch.testing.assert_close(out.weights, 3 * w, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="reads J"):
        get("graddrop*T").aggregate_gramian(J @ J.T)
    with pytest.raises(ValueError, match="reads J"):
        get("mean+tension*T").aggregate_gramian(J @ J.T, losses)
    assert get("mean*T").reads == "losses"
    out = get("mean*T").aggregate_losses(losses, num_tasks=3, dtype=torch.float64)
    torch.testing.assert_close(out.weights, torch.ones(3, dtype=torch.float64))
    for name in ("dwa", "famo", "sum"):  # stateful ones too: the same calls on a copy
        base = get(name)
        wrapped = Rescaled(copy.deepcopy(base))
        for _ in range(3):
            lv = _losses(3, gen)
            a = base.aggregate_losses(lv, num_tasks=3, dtype=torch.float64).weights
            b = wrapped.aggregate_losses(lv, num_tasks=3, dtype=torch.float64).weights
            torch.testing.assert_close(b, 3 * a, rtol=1e-14, atol=0)
    with pytest.raises(ValueError):
        get("mgda*T").aggregate_losses(losses, num_tasks=3)  # the base reads G


_HAS_PRESENT = "present" in inspect.signature(Aggregator.aggregate).parameters


@pytest.mark.skipif(not _HAS_PRESENT, reason="Aggregator.aggregate takes no present= here")
def test_rescaled_passes_present_through() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    out = get("mean*T").aggregate(J, present=[True, False, True])
    torch.testing.assert_close(out.direction, J.sum(0))  # T = 2 present tasks
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    out = get("mean*T").aggregate_losses(num_tasks=3, present=[True, False, True])
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 0.0, 1.0]))
    G = J @ J.T
    base = get("mgda").aggregate_gramian(G, present=[False, True, True]).weights
    out = get("mgda*T").aggregate_gramian(G, present=[False, True, True])
    torch.testing.assert_close(out.weights, 2 * base)


@pytest.mark.parametrize("form", ["famo*T", "dwa*T", "moco*T", "mgda+tension*T", "rlw*T"])
def test_rescaled_state_dict_round_trip(form: str) -> None:
    T = 3
    gen = torch.Generator().manual_seed(11)
    steps = [(torch.randn(T, 4, generator=gen, dtype=torch.float64), _losses(T, gen))
             for _ in range(6)]
    ref = _build(form, T, seed=5)
    assert ref.stateful
    directions = [ref.aggregate(J, lv).direction for J, lv in steps]
    first = _build(form, T, seed=5)
    for J, lv in steps[:3]:
        first.aggregate(J, lv)
    state = copy.deepcopy(first.state_dict())
    assert state.keys() == first.base.state_dict().keys()  # the base's state, as it is
    resumed = _build(form, T, seed=6)  # the state holds the generator's too
    resumed.load_state_dict(state)
    for (J, lv), d in zip(steps[3:], directions[3:]):
        out = resumed.aggregate(J, lv).direction
        assert out is not None and d is not None and torch.equal(out, d), form
    resumed.reset()
    fresh = _build(form, T, seed=6)
    for J, lv in steps[:2]:
        a, b = resumed.aggregate(J, lv).direction, fresh.aggregate(J, lv).direction
        assert a is not None and b is not None and torch.equal(a, b), form


def test_rescaled_construction() -> None:
    assert isinstance(Rescaled("central").base, type(get("central")))
    with pytest.raises(TypeError, match="already rescaled"):
        Rescaled(get("mean*T"))
    with pytest.raises(TypeError, match="Aggregator or a name"):
        Rescaled(3)  # type: ignore[arg-type]
    plain = Rescaled("mean")
    with pytest.raises(ValueError, match="keeps no state"):
        plain.load_state_dict({"x": 1})


def test_rescaled_forwards_the_layer_route() -> None:
    base = get("gradnorm", layer=(0, 1))
    wrapped = Rescaled(copy.deepcopy(base))
    assert wrapped.reads == base.reads and wrapped.layer == (0, 1)  # the base's settings
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        norms, lv = torch.rand(3, generator=gen) + 0.1, torch.rand(3, generator=gen) + 0.5
        a, b = base.aggregate_norms(norms, lv).weights, wrapped.aggregate_norms(norms, lv).weights
        assert a is not None and b is not None
        torch.testing.assert_close(b, 3 * a, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="no gradient norms"):
        get("mgda*T").aggregate_norms(torch.ones(2), torch.ones(2))
    with pytest.raises(AttributeError):
        get("mgda*T").no_such_setting  # noqa: B018
    assert copy.deepcopy(wrapped).layer == (0, 1)


@pytest.mark.parametrize("capture", ["loop", "batched"])
@pytest.mark.parametrize("name", ["mgda", "mean", "central+tension"])
def test_rescaled_in_the_optimizer(name: str, capture: str) -> None:
    """SGD on ``"<name>*T"`` moves the shared parameters ``T`` times as far as on ``"<name>"``
    (one step from the same start) and the task heads exactly as far."""
    from torch import nn

    from torch_mtlgrad import MultiTaskOptimizer

    T = 3
    torch.manual_seed(0)
    x = torch.randn(8, 4, dtype=torch.float64)
    ys = [torch.randn(8, 1, dtype=torch.float64) for _ in range(T)]

    def run(agg: str) -> tuple[list[Tensor], list[Tensor]]:
        torch.manual_seed(1)
        enc = nn.Linear(4, 5).double()
        heads = nn.ModuleList([nn.Linear(5, 1).double() for _ in range(T)])
        start = [p.detach().clone() for p in [*enc.parameters(), *heads.parameters()]]
        sgd = torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1)
        opt = MultiTaskOptimizer(sgd, shared=enc, aggregator=agg, capture=capture)
        opt.zero_grad()
        z = torch.tanh(enc(x))
        opt.backward([nn.functional.mse_loss(h(z), y) + 0.1 for h, y in zip(heads, ys)])
        opt.step()
        moved = [p.detach() - s for p, s in zip([*enc.parameters(), *heads.parameters()], start)]
        return moved[:2], moved[2:]

    shared_a, heads_a = run(name)
    shared_b, heads_b = run(name + "*T")
    for a, b in zip(shared_a, shared_b):
        torch.testing.assert_close(b, T * a, rtol=1e-10, atol=1e-14)
    for a, b in zip(heads_a, heads_b):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
