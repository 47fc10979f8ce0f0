"""Sync-free steps on CUDA, proven with ``torch.cuda.set_sync_debug_mode("error")``, and CUDA-graph
replay of whole steps.

Every test here needs a CUDA device and is skipped cleanly without one.  (The CPU stand-in for the
sync check is ``tests/test_capture.py::test_sync_free_steps``.)

* ``test_step_is_sync_free``: whole training steps (forward, ``opt.backward(losses)``,
  ``opt.step()``) with ``nonfinite="unchecked"``, diagnostics on and off, loop and feature
  capture, for the methods that can run sync-free: mean, min-norm with the fixed-iteration
  solver, central, the tensioner, PCGrad with a fixed order, IMTL-G, CAGrad's closed form (T = 2)
  and CoNAL's conflict noticing.  Any host-device synchronisation raises inside the step.
* ``test_aggregation_replays_in_a_cuda_graph``: aggregator + write-back into the flat ``.grad``
  buffer + SGD step on a static ``J``, captured once and replayed on new ``J``.
* ``test_whole_step_replays_in_a_cuda_graph``: forward + ``opt.backward`` + ``opt.step`` captured
  once and replayed on new batches, against the same steps run eagerly.  Stateful methods whose
  state advances in Python (the tensioner's step counter, CoNAL's history position) cannot be
  replayed by a graph and are left out of the graph tests.

Measured exception (a strict xfail, with the place it syncs): IMTL-G; see ``IMTLG_SYNCS``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_mtlgrad import FlatLayout, MultiTaskOptimizer
from torch_mtlgrad.aggregators import IMTLG, CAGrad, Central, MinNorm, PCGrad, Tensioned, get

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class ConvNet(nn.Module):
    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.Tanh())
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 1))
                                    for _ in range(tasks)])


METHODS = {
    "mean": (lambda: get("mean"), 3, False),
    "mgda-pgd": (lambda: MinNorm(method="pgd"), 3, False),
    "central-pgd": (lambda: Central(method="pgd"), 3, False),
    "central+tension-pgd": (lambda: Tensioned(Central(method="pgd"), window=2, solver="pgd",
                                              check_losses=False), 3, False),
    "pcgrad-fixed": (lambda: PCGrad(order="fixed"), 3, False),
    "imtlg": (lambda: IMTLG(), 3, False),
    "cagrad-closed-form-T2": (lambda: CAGrad(method="closed-form"), 2, False),
    "conal-conflict-noticing+sum": (lambda: get("sum"), 3, True),
}
# Measured on an H100 (torch 2.11, CUDA 13): IMTL-G synchronises, in imtlg_weights
# (torch_mtlgrad/aggregators/imtlg.py, ``torch.linalg.eigh(C)``: cuSOLVER's syevd reports its
# ``info`` to the host), and that call cannot be captured in a CUDA graph either.  A strict
# xfail: it turns into a failure once IMTL-G is fixed, so the mark gets removed then.  (PCGrad's
# fixed order used to be built on the CPU and copied over, which a graph capture refuses; it is
# now built on the device, and PCGrad is an ordinary graph case.)
IMTLG_SYNCS = pytest.mark.xfail(strict=True, reason="IMTL-G syncs: torch.linalg.eigh in "
                                "aggregators/imtlg.py imtlg_weights (cuSOLVER info check)")


def sync_free_params():
    return [pytest.param(n, marks=IMTLG_SYNCS) if n == "imtlg" else n for n in METHODS]


def graph_params():
    out = [n for n in ("mean", "mgda-pgd", "central-pgd", "cagrad-closed-form-T2")]
    return out + ["pcgrad-fixed", pytest.param("imtlg", marks=IMTLG_SYNCS)]


def batch(seed: int, tasks: int, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, 12, 12, generator=g)
    ys = [torch.randn(16, 1, generator=g) for _ in range(tasks)]
    return x.to(device), [y.to(device) for y in ys]


def build(name: str, capture: str = "loop", diagnostics: bool = False, seed: int = 0):
    make, tasks, conal = METHODS[name]
    torch.manual_seed(seed)
    model = ConvNet(tasks).cuda()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                             shared=model.encoder, aggregator=make(), capture=capture,
                             nonfinite="unchecked", diagnostics=diagnostics,
                             conflict_noticing=[model.encoder[0], model.encoder[3], model.encoder[7]]
                             if conal else None)
    return model, opt, tasks


def train_step(model, opt, x, ys, capture: str = "loop") -> None:
    opt.zero_grad(set_to_none=True)
    z = model.encoder(x)
    losses = [nn.functional.mse_loss(h(z), y) for h, y in zip(model.heads, ys)]
    opt.backward(losses, features=z if capture == "feature" else None)
    opt.step()


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("diagnostics", [False, True], ids=["nodiag", "diag"])
@pytest.mark.parametrize("capture", ["loop", "feature"])
@pytest.mark.parametrize("name", sync_free_params())
def test_step_is_sync_free(name: str, capture: str, diagnostics: bool) -> None:
    model, opt, tasks = build(name, capture, diagnostics)
    x, ys = batch(0, tasks)
    for _ in range(2):  # warm-up: first-use allocations, kernel compilation, cuBLAS handles
        train_step(model, opt, x, ys, capture)
    torch.cuda.synchronize()
    before = params(model).clone()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(4):  # past the tensioner's window of 2
            train_step(model, opt, x, ys, capture)
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    after = params(model)
    assert bool(torch.isfinite(after).all())
    assert not torch.equal(after, before)
    if diagnostics:
        assert opt.diagnostics and all(torch.isfinite(v).all() for k, v in opt.diagnostics.items()
                                       if v.is_floating_point() and k not in ("delta",))


@pytest.mark.parametrize("name", graph_params())
def test_aggregation_replays_in_a_cuda_graph(name: str) -> None:
    """Aggregator + write-back (views of one flat .grad buffer) + SGD step on a static J."""
    make, tasks, _ = METHODS[name]
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 5)).cuda()
    ref_net = copy.deepcopy(net)
    layout = FlatLayout(list(net.parameters()))
    agg, ref_agg = make(), make()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ref_sgd = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    # CPU random numbers only: a failed capture (the xfail cases) leaves the CUDA generator unusable.
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(tasks, layout.numel, generator=gen).cuda()
    flat = torch.zeros(layout.numel, device="cuda")
    for p, v in zip(layout.params, layout.views(flat)):
        p.grad = v

    def step() -> None:
        flat.copy_(agg(J))
        sgd.step()

    def ref_step(Jk: torch.Tensor) -> None:
        for p, g in zip(ref_net.parameters(), FlatLayout(list(ref_net.parameters())).views(ref_agg(Jk))):
            p.grad = g.clone()
        ref_sgd.step()

    draws = [torch.randn(tasks, layout.numel, generator=gen).cuda() for _ in range(5)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for k in range(2):
            J.copy_(draws[k])
            step()
    torch.cuda.current_stream().wait_stream(s)
    for k in range(2):
        ref_step(draws[k])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for k in range(2, 5):
        J.copy_(draws[k])
        graph.replay()
        ref_step(draws[k])
        torch.cuda.synchronize()
        assert torch.allclose(params(net), params(ref_net), rtol=1e-5, atol=1e-6), f"replay {k}"


@pytest.mark.parametrize("name", graph_params())
def test_whole_step_replays_in_a_cuda_graph(name: str) -> None:
    """Forward, opt.backward (capture of J, aggregation, write-back) and opt.step in one graph."""
    model, opt, tasks = build(name)
    ref_model, ref_opt, _ = build(name)
    assert torch.equal(params(model), params(ref_model))
    batches = [batch(10 + k, tasks) for k in range(6)]
    sx, sys_ = batch(0, tasks)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for k in range(3):
            sx.copy_(batches[k][0])
            for a, b in zip(sys_, batches[k][1]):
                a.copy_(b)
            train_step(model, opt, sx, sys_)
    torch.cuda.current_stream().wait_stream(s)
    for k in range(3):
        train_step(ref_model, ref_opt, *batches[k])
    torch.cuda.synchronize()
    assert torch.allclose(params(model), params(ref_model), rtol=1e-5, atol=1e-6)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, sx, sys_)
    for k in range(3, 6):
        sx.copy_(batches[k][0])
        for a, b in zip(sys_, batches[k][1]):
            a.copy_(b)
        graph.replay()
        train_step(ref_model, ref_opt, *batches[k])
        torch.cuda.synchronize()
        assert torch.allclose(params(model), params(ref_model), rtol=1e-4, atol=1e-6), f"replay {k}"
