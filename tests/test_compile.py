"""torch.compile'd models through MultiTaskOptimizer (CPU): every capture mode trains as the eager
model does, without recompiling, without touching the user's compile settings; a compiled
backward with donated buffers is refused with one error naming the fix.

Compiling is slow (tens of seconds the first time on two cores), so three tiny graphs serve all
tests: ``plain`` (default ``torch.compile`` of the whole model, static shapes), ``dynamic`` (the
encoder alone, ``mode="reduce-overhead"``, dynamic shapes, forwards under
``donated_buffer=False``: the documented fix) and, in the last test, an encoder whose backward
a plain ``backward()`` compiled first, with donated buffers.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch._functorch.config as functorch_config
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import get
from torch_mtlgrad.capture.compiled import DonatedBufferError, compiled_regions, donates

T = 3
STEPS = 4


class Net(nn.Module):
    """A tanh MLP encoder and T linear heads; returns the features and the outputs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width),
                                     nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(width, 1) for _ in range(T)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.encoder(x)
        return z, [h(z) for h in self.heads]


def batch(step: int, rows: int = 16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(rows, 5, generator=g), [torch.randn(rows, 1, generator=g) * (t + 1)
                                               for t in range(T)]


def losses_of(outs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    return [nn.functional.mse_loss(o, y) for o, y in zip(outs, ys)]


def no_donation() -> contextlib.AbstractContextManager[None]:
    """The documented fix: the compiled model's forward calls under ``donated_buffer=False``."""
    return functorch_config.patch(donated_buffer=False)


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _compile_unavailable() -> str | None:
    """Why torch.compile (Inductor on the CPU) cannot run here, or ``None``; checked without
    compiling (each compile costs seconds): the first real compile skips on failure too."""
    try:
        if not torch._dynamo.is_inductor_supported():
            return "torch.compile unavailable here: Inductor does not support this Python/platform"
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 - any failure here means: no compile
        return f"torch.compile unavailable here: {type(err).__name__}: {str(err)[:200]}"
    if shutil.which(compiler) is None:
        return f"torch.compile unavailable here: no C++ compiler ({compiler!r} not found)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _compile_works() -> None:
    reason = _compile_unavailable()
    if reason is not None:
        pytest.skip(reason)


class Compiled:
    """One compiled model kept for the whole module (the whole of it, or its encoder alone), the
    eager twin's initial state, and how its forward is called."""

    def __init__(self, width: int, fix: bool, encoder_only: bool = False,
                 **compile_kwargs: object) -> None:
        torch.manual_seed(0)
        self.model = Net(width)
        self.init = copy.deepcopy(self.model.state_dict())
        self.compiled = torch.compile(self.model.encoder if encoder_only else self.model,
                                      **compile_kwargs)
        self.fix, self.encoder_only = fix, encoder_only

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with no_donation() if self.fix else contextlib.nullcontext():
            out = self.compiled(x)
        if self.encoder_only:
            return out, [h(out) for h in self.model.heads]
        return out


@contextlib.contextmanager
def fresh_compile_caches() -> Iterator[None]:
    """No AOT autograd cache entry from another process (one compiled with donated buffers by a
    plain backward would decide for us); scoped to the compiling calls."""
    with functorch_config.patch(enable_autograd_cache=False):
        yield


@pytest.fixture(scope="module")
def plain() -> Compiled:
    """Default ``torch.compile``; its backward is compiled at its first traversal, ours (which
    keeps the graph), so it donates nothing."""
    c = Compiled(16, fix=False)
    x, ys = batch(0)
    opt = MultiTaskOptimizer(torch.optim.SGD(c.model.parameters(), lr=0.0), shared=c.model.encoder,
                             aggregator="mgda", capture="loop")
    with fresh_compile_caches():
        try:
            _, outs = c.forward(x)  # the first compile
        except Exception as err:  # noqa: BLE001 - a toolchain that cannot build the kernels
            pytest.skip(f"torch.compile unavailable here: {type(err).__name__}: {str(err)[:200]}")
        opt.backward(losses_of(outs, ys))
    c.model.zero_grad(set_to_none=True)
    return c


@pytest.fixture(scope="module")
def dynamic() -> Compiled:
    """``mode="reduce-overhead"`` (CUDA graphs: not on the CPU, where it compiles as the default
    mode) and dynamic shapes: the backward is compiled at the forward; with the fix it donates
    nothing."""
    return Compiled(12, fix=True, encoder_only=True, mode="reduce-overhead", dynamic=True)


def optimizer(model: nn.Module, aggregator: str, capture: str) -> MultiTaskOptimizer:
    kwargs = {"seed": 0} if aggregator == "pcgrad" else {}
    return MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5),
                              shared=model.encoder, aggregator=get(aggregator, **kwargs),
                              capture=capture)


def train(forward, model: nn.Module, opt: MultiTaskOptimizer, rows: list[int],
          on_step=None) -> list[torch.Tensor]:
    """One step per entry of ``rows`` (its batch size); returns every parameter after the last."""
    for step, n in enumerate(rows):
        x, ys = batch(step, n)
        opt.zero_grad()
        z, outs = forward(x)
        opt.backward(losses_of(outs, ys), features=z)
        opt.step()
        if on_step is not None:
            on_step(step, opt)
    return [p.detach().clone() for p in model.parameters()]


AGGREGATORS = ["mean", "mgda", "central+tension", "pcgrad", "upgrad"]
CAPTURES = ["auto", "loop", "batched", "feature", "timed", "representation"]


def applies(aggregator: str, capture: str) -> bool:
    try:
        optimizer(Net(2), aggregator, capture)
    except ValueError:  # the representation mode reads the Gramian only
        return False
    return True


# Every capture mode with MGDA; the others where their route differs (the loss-only route, the
# loop, the batched and Gramian paths that fall back, the representation mode's refusal).
CASES = ([("mgda", c) for c in CAPTURES]
         + [(a, c) for a in AGGREGATORS[2:] for c in ("auto", "batched", "representation")
            if applies(a, c)]
         + [("mean", "auto"), ("mean", "loop"), ("sum", "auto")])


def check_against_eager(c: Compiled, aggregator: str, capture: str, rows: list[int]) -> None:
    user_flag = functorch_config.donated_buffer
    eager = Net(c.model.encoder[0].out_features)
    eager.load_state_dict(c.init)
    c.model.load_state_dict(c.init)  # in place: the compiled graph stays valid
    seen: list[int] = []

    def count(step: int, opt: MultiTaskOptimizer) -> None:
        seen.append(graphs())
        if aggregator in ("sum", "mean") and capture == "auto":
            assert opt.last_capture == "losses"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train(c.forward, c.model, optimizer(c.model, aggregator, capture), rows, count)
    fallbacks = [w for w in caught if "falling back" in str(w.message)]
    assert len(fallbacks) <= 1
    if capture in ("batched", "feature"):  # a compiled backward cannot be batched: once, said why
        assert len(fallbacks) == 1 and "torch.compile" in str(fallbacks[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = train(eager, eager, optimizer(eager, aggregator, capture), rows)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert seen[1:] == [seen[1]] * (len(seen) - 1), f"recompiled after step 2: {seen}"
    assert functorch_config.donated_buffer is user_flag


@pytest.mark.parametrize(("aggregator", "capture"), CASES)
def test_compiled_equals_eager(plain: Compiled, aggregator: str, capture: str) -> None:
    if capture == "representation":  # the heads are compiled too: no gradient of the features
        opt = optimizer(plain.model, aggregator, capture)
        opt.zero_grad()
        x, ys = batch(0)
        z, outs = plain.forward(x)
        with pytest.raises(NotImplementedError, match="compile the encoder alone"):
            opt.backward(losses_of(outs, ys), features=z)
        assert all(p.grad is None for p in plain.model.parameters())
        return
    check_against_eager(plain, aggregator, capture, [16] * STEPS)
    regions = compiled_regions(plain.forward(batch(0)[0])[0])
    assert regions and not any(donates(r) for r in regions)


@pytest.mark.parametrize(("aggregator", "capture"),
                         [("mgda", "loop"), ("mean", "auto"), ("upgrad", "representation"),
                          ("central+tension", "representation"), ("pcgrad", "feature")])
def test_dynamic_shapes_with_the_fix(dynamic: Compiled, aggregator: str, capture: str) -> None:
    # A last batch of another size: no recompile (dynamic), and the kept graph is allowed.
    check_against_eager(dynamic, aggregator, capture, [16, 16, 16, 9])


@pytest.mark.parametrize("user_flag", [True, False])
def test_user_flag_untouched(plain: Compiled, user_flag: bool) -> None:
    with functorch_config.patch(donated_buffer=user_flag):
        opt = optimizer(plain.model, "mgda", "loop")
        x, ys = batch(1)
        _, outs = plain.forward(x)
        opt.backward(losses_of(outs, ys))
        assert functorch_config.donated_buffer is user_flag
    plain.model.zero_grad(set_to_none=True)


def test_donated_backward_is_refused_with_the_fix_named() -> None:
    # A plain backward through the compiled encoder first compiles its backward with donated
    # buffers (as dynamic shapes or a compile cache written so would).
    torch.manual_seed(0)
    model = Net(10)
    encoder = torch.compile(model.encoder)
    user_flag = functorch_config.donated_buffer
    x, ys = batch(0)
    with fresh_compile_caches():
        z = encoder(x)
        sum(losses_of([h(z) for h in model.heads], ys)).backward()
    model.zero_grad(set_to_none=True)
    z = encoder(x)
    outs = [h(z) for h in model.heads]
    regions = compiled_regions(z)
    assert regions and all(donates(r) for r in regions)
    opt = optimizer(model, "mgda", "loop")
    with pytest.raises(DonatedBufferError, match=r"patch\(donated_buffer=False\)"):
        opt.backward(losses_of(outs, ys))
    assert all(p.grad is None for p in model.parameters())  # nothing written
    for capture in ("batched", "feature", "timed"):  # no fallback warning first: the same error
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(DonatedBufferError):
                optimizer(model, "mgda", capture).backward(losses_of(outs, ys), features=z)
    with pytest.raises(DonatedBufferError):
        optimizer(model, "mean", "auto").backward(losses_of(outs, ys))
    assert all(p.grad is None for p in model.parameters())
    assert functorch_config.donated_buffer is user_flag
    # Routes that traverse the compiled region once run: the representation mode (the heads are
    # eager, the encoder is backpropagated once) and the one-pass "sum".
    eager = Net(10)
    eager.load_state_dict(model.state_dict())
    for aggregator, capture in (("mgda", "representation"), ("sum", "auto")):
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        z = encoder(x)
        optimizer(model, aggregator, capture).backward(
            losses_of([h(z) for h in model.heads], ys), features=z)
        z_eager, outs_eager = eager(x)
        optimizer(eager, aggregator, capture).backward(losses_of(outs_eager, ys),
                                                       features=z_eager)
        for p, q in zip(model.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
