"""Capture modes: loop, batched, feature give the same J; representation mode; fallback; no sync."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import Aggregator, Central, MinNorm, Tensioned, get
from torch_mtlgrad.capture import auto_chunk_size, available_memory, chunks

T = 4


class ConvNet(nn.Module):
    def __init__(self, tasks: int = T) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                     nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 1))
                                    for _ in range(tasks)])


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 10, 10, generator=g), [torch.randn(8, 1, generator=g) for _ in range(T)]


def step(model, opt, seed: int, use_features: bool) -> None:
    x, ys = batch(seed)
    opt.zero_grad()
    z = model.encoder(x)
    losses = [nn.functional.mse_loss(h(z), y) * (t + 1) for t, (h, y) in enumerate(zip(model.heads, ys))]
    opt.backward(losses, features=z if use_features else None)
    opt.step()


def build(capture: str, aggregator="mgda", chunk_size=None, **kw):
    torch.manual_seed(0)
    model = ConvNet()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                             shared=model.encoder, aggregator=aggregator, capture=capture,
                             chunk_size=chunk_size, **kw)
    return model, opt


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("aggregator", ["mean", "mgda", "central+tension"])
@pytest.mark.parametrize("capture,chunk", [("batched", None), ("batched", 3), ("feature", None),
                                           ("feature", 1), ("auto", 2), ("timed", None),
                                           ("timed", 2)])
def test_exact_modes_match_the_loop(aggregator: str, capture: str, chunk) -> None:
    # diagnostics="full": the Jacobian routes even for "mean" (else the loss-only route)
    ref_model, ref = build("loop", aggregator, diagnostics="full")
    model, opt = build(capture, aggregator, chunk, diagnostics="full")
    for i in range(12):
        step(ref_model, ref, i, use_features=False)
        step(model, opt, i, use_features=capture in ("feature", "auto", "timed"))
        if opt.last_capture != "loop" and chunk is None and aggregator != "central+tension":
            if capture != "timed":  # (timed: its loop trials have built J)
                assert opt.jacobian is None  # the Gramian path: J is never built
        else:
            assert torch.allclose(opt.jacobian, ref.jacobian, rtol=1e-4, atol=1e-6)
        assert torch.allclose(params(model), params(ref_model), rtol=1e-4, atol=1e-5)
        for k in ("weights", "grad_norms", "cosine", "direction_norm", "param_grad_norms"):
            if k in ref.diagnostics:
                assert torch.allclose(opt.diagnostics[k], ref.diagnostics[k], rtol=1e-4, atol=1e-5), k
        assert torch.allclose(opt.diagnostics["angle"], ref.diagnostics["angle"], atol=1e-2)


@pytest.mark.parametrize("name", ["mgda", "upgrad", "dualproj", "imtlg", "cagrad", "pcgrad", "nashmtl",
                                  "alignedmtl", "gradvac", "central", "mean", "rlw", "dwa", "uw",
                                  "famo", "gradnorm", "constant"])
@pytest.mark.parametrize("capture", ["batched", "feature"])
def test_gramian_path_equals_the_jacobian_path(name: str, capture: str) -> None:
    """Gramian-only weightings in one batched pass read G and write d = w^T J per parameter,
    without J: the same step as with J (chunk_size=1 forces J), for every such aggregator."""
    kw = {"seed": 0} if name == "pcgrad" else {"weights": [1.0, 2.0, 0.5, 1.0]} if name == "constant" else {}
    with_j_model, with_j = build(capture, get(name, **kw), chunk_size=1)
    model, opt = build(capture, get(name, **kw), chunk_size=None)
    for i in range(4):
        step(with_j_model, with_j, i, use_features=capture == "feature")
        step(model, opt, i, use_features=capture == "feature")
        assert opt.jacobian is None and with_j.jacobian is not None
        assert torch.allclose(opt.aggregator.weights, with_j.aggregator.weights, rtol=1e-4, atol=1e-6)
        assert torch.allclose(params(model), params(with_j_model), rtol=1e-4, atol=1e-5)


def test_chunks_cover_tasks() -> None:
    assert chunks(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunks(5, None) == [(0, 5)]


def test_auto_chunk_size_from_free_memory(monkeypatch) -> None:
    """``chunk_size="auto"``: all tasks at once when they fit, chunks when the probe reports little
    free memory; J equal to the loop's either way."""
    assert auto_chunk_size(10, 100, 4, None) is None  # unknown: all at once
    assert auto_chunk_size(10, 100, 4, 10**6) is None
    assert auto_chunk_size(10, 100, 4, 3200) == 2  # 1600 bytes of budget / 800 per task
    assert auto_chunk_size(10, 100, 4, 10) == 1
    assert available_memory(torch.device("cpu")) is None or available_memory(torch.device("cpu")) > 0
    import torch_mtlgrad.capture.run as runmod
    import torch_mtlgrad.capture.select as selmod

    ref_model, ref = build("loop")
    D = ref.layout.numel
    real = runmod.capture_batched
    for free, want in [(10**12, None), (2 * 2 * D * 4 * 3, 3), (1, 1)]:
        monkeypatch.setattr(selmod, "available_memory", lambda device, free=free: free)
        seen = []

        def spy(*a, **k):
            seen.append(a[5])  # chunk_size, positional
            return real(*a, **k)

        monkeypatch.setattr(runmod, "capture_batched", spy)
        model, opt = build("batched", chunk_size="auto")
        ref_model, ref = build("loop")
        for i in range(2):
            step(ref_model, ref, i, use_features=False)
            step(model, opt, i, use_features=False)
            if want is None:  # one piece: the Gramian path, J never built
                assert opt.jacobian is None
            else:
                assert torch.allclose(opt.jacobian, ref.jacobian, rtol=1e-4, atol=1e-6)
            assert torch.allclose(params(model), params(ref_model), rtol=1e-4, atol=1e-5)
        assert seen == ([] if want is None else [want, want])
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, 'auto' or None"):
        build("batched", chunk_size="big")


def explicit_representation_direction(model, x, ys, aggregator):
    z = model.encoder(x)
    losses = [nn.functional.mse_loss(h(z), y) * (t + 1) for t, (h, y) in enumerate(zip(model.heads, ys))]
    Z = torch.stack([torch.autograd.grad(l, z, retain_graph=True)[0].flatten() for l in losses])
    dz = aggregator(Z, torch.stack([l.detach() for l in losses]))
    grads = torch.autograd.grad(z, list(model.encoder.parameters()), grad_outputs=dz.view_as(z))
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("name", ["mgda", "central", "sum"])
def test_representation_mode_is_the_encoder_vjp_of_the_combined_feature_gradient(name: str) -> None:
    model, opt = build("representation", name)
    ref_model = copy.deepcopy(model)
    x, ys = batch(3)
    opt.zero_grad()
    z = model.encoder(x)
    losses = [nn.functional.mse_loss(h(z), y) * (t + 1) for t, (h, y) in enumerate(zip(model.heads, ys))]
    opt.backward(losses, features=z)
    got = torch.cat([p.grad.flatten() for p in model.encoder.parameters()])
    ref = explicit_representation_direction(ref_model, x, ys, get(name))
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    if name == "sum":  # linear aggregator: the representation mode is exact
        ex_model, ex = build("loop", "sum")
        xz = ex_model.encoder(x)
        ex.zero_grad()
        ex.backward([nn.functional.mse_loss(h(xz), y) * (t + 1)
                     for t, (h, y) in enumerate(zip(ex_model.heads, ys))])
        exact = torch.cat([p.grad.flatten() for p in ex_model.encoder.parameters()])
        assert torch.allclose(got, exact, rtol=1e-4, atol=1e-6)
    # Task-specific parameters get the plain sum in every mode.
    for h, l in zip(ref_model.heads, [nn.functional.mse_loss(h(ref_model.encoder(x)), y) * (t + 1)
                                       for t, (h, y) in enumerate(zip(ref_model.heads, ys))]):
        ref_g = torch.autograd.grad(l, list(h.parameters()))
        got_h = model.heads[list(ref_model.heads).index(h)]
        for p, r in zip(got_h.parameters(), ref_g):
            assert torch.allclose(p.grad, r, rtol=1e-4, atol=1e-6)
    opt.step()


def test_representation_mode_rules() -> None:
    model = ConvNet()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    class ReadsJ(Aggregator):
        def forward(self, J, losses):
            return J.abs().sum(0)

    with pytest.raises(ValueError, match="reads only the Gramian"):
        MultiTaskOptimizer(sgd, shared=model.encoder, aggregator=ReadsJ(), capture="representation")

    class Plug:
        def transform(self, J, losses):
            return J

    with pytest.raises(ValueError, match="cannot run plugins"):
        MultiTaskOptimizer(sgd, shared=model.encoder, aggregator="mgda", capture="representation",
                           plugins=[Plug()])
    opt = MultiTaskOptimizer(sgd, shared=model.encoder, aggregator="central+tension",
                             capture="representation")
    x, ys = batch(0)
    z = model.encoder(x)
    losses = [nn.functional.mse_loss(h(z), y) for h, y in zip(model.heads, ys)]
    with pytest.raises(ValueError, match="needs the shared features"):
        opt.backward(losses)
    with pytest.raises(ValueError, match="capture must be one of"):
        MultiTaskOptimizer(sgd, shared=model.encoder, capture="vmap")
    with pytest.raises(ValueError, match="chunk_size"):
        MultiTaskOptimizer(sgd, shared=model.encoder, chunk_size=0)


class NoVmap(torch.autograd.Function):
    """Identity whose backward reads a Python number: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * (1.0 + 0.0 * float(g.sum().item()))


def test_batched_falls_back_to_loop_with_one_warning() -> None:
    torch.manual_seed(0)
    enc = nn.Linear(4, 6)
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])
    opt = MultiTaskOptimizer(torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1),
                             shared=enc, capture="batched", aggregator="mgda")
    ref_enc, ref_heads = copy.deepcopy(enc), copy.deepcopy(heads)
    ref = MultiTaskOptimizer(torch.optim.SGD([*ref_enc.parameters(), *ref_heads.parameters()], lr=0.1),
                             shared=ref_enc, capture="loop", aggregator="mgda")
    x = torch.randn(5, 4)
    for i in range(3):
        for e, hs, o in [(enc, heads, opt), (ref_enc, ref_heads, ref)]:
            o.zero_grad()
            z = NoVmap.apply(e(x))
            losses = [h(z).pow(2).mean() for h in hs]
            if o is opt and i == 0:
                with pytest.warns(RuntimeWarning, match="falling back to the per-task loop"):
                    o.backward(losses)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    o.backward(losses)
            o.step()
    assert torch.equal(params(enc), params(ref_enc))


@contextlib.contextmanager
def forbid_host_sync():
    """Make every way of reading a tensor's value on the host raise (CPU stand-in for
    ``torch.cuda.set_sync_debug_mode("error")``): item, bool, int, float, tolist, numpy."""
    names = ["item", "__bool__", "__int__", "__float__", "tolist", "numpy", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def boom(name):
        def f(self, *a, **k):
            raise AssertionError(f"host sync: Tensor.{name} called during a sync-free step")
        return f

    try:
        for n in names:
            setattr(torch.Tensor, n, boom(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


SYNC_FREE = {
    "mean": lambda: get("mean"),
    "sum": lambda: get("sum"),
    "mgda-2": lambda: MinNorm(),                       # T = 2: closed form
    "mgda-pgd": lambda: MinNorm(method="pgd"),
    "central-pgd": lambda: Central(method="pgd"),
    "central+tension-pgd": lambda: Tensioned(Central(method="pgd"), window=2, solver="pgd",
                                             check_losses=False),
    "mgda+tension-segment": lambda: Tensioned(MinNorm(method="pgd"), window=2, solver="pgd",
                                              feasibility="segment", check_losses=False),
}


@pytest.mark.parametrize("name", sorted(SYNC_FREE))
@pytest.mark.parametrize("capture", ["loop", "feature"])
def test_sync_free_steps(name: str, capture: str) -> None:
    tasks = 2 if name == "mgda-2" else 3
    torch.manual_seed(0)
    model = ConvNet(tasks)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), shared=model.encoder,
                             aggregator=SYNC_FREE[name](), capture=capture, nonfinite="unchecked")
    x, ys = batch(0)
    for i in range(4):  # past the tensioner's window
        opt.zero_grad()
        z = model.encoder(x)
        losses = [nn.functional.mse_loss(h(z), y) for h, y in zip(model.heads, ys[:tasks])]
        with forbid_host_sync():
            opt.backward(losses, features=z if capture == "feature" else None)
            opt.step()
    assert bool(torch.isfinite(params(model)).all())
