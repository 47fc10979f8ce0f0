"""Mixed precision: half-precision models aggregate in float32; GradScaler.

* bf16 and fp16 models on the CPU: ``J`` is float32, the direction is the float32 aggregator's,
  cast back to the parameters' dtype (checked exactly against an independent float32 reference).
* ``torch.amp.GradScaler`` (CPU scaler; CUDA variants skip without a GPU), with the optimizer's
  ``scaler=`` option: training with the scaler is bit-for-bit the training without
  it (the aggregator sees ``J / S`` and the unscaled losses, exact since ``S`` is a power of two),
  also for methods whose direction does not scale with ``J`` (tensioners, Nash-MTL, MoCo) and
  for loss weightings; an overflow makes ``scaler.step`` skip the step and ``scaler.update``
  lower the scale exactly as in a plain PyTorch loop, with parameters, optimizer state and
  aggregator state untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import get

from ._helpers import Net, T, data

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def losses_of(outs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    return [nn.functional.mse_loss(o.float(), y.float()) for o, y in zip(outs, ys)]


def agg(name: str):
    if name == "pcgrad":
        return get(name, seed=3)
    if name.endswith("+tension"):
        return get(name, window=3)
    return get(name)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


# -- half-precision models ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mean", "mgda", "central+tension", "pcgrad", "upgrad"])
def test_half_models_aggregate_in_float32(dtype: torch.dtype, name: str) -> None:
    torch.manual_seed(0)
    model = Net().to(dtype)
    aggregator = agg(name)
    # capture="loop": the Jacobian route (the loss-only route of "mean" is plain half backward)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), shared=model.encoder,
                             aggregator=aggregator, capture="loop")
    for step in range(5):  # past the tensioner's window of 3
        x, ys = data(step)
        outs = model(x.to(dtype))
        losses = [nn.functional.mse_loss(o, y.to(dtype)) for o, y in zip(outs, ys)]
        shared = list(model.encoder.parameters())
        reference = copy.deepcopy(aggregator)  # its state before this step
        rows = []
        for loss in losses:
            grads = torch.autograd.grad(loss, shared, retain_graph=True)
            assert all(g.dtype == dtype for g in grads)
            rows.append(torch.cat([g.reshape(-1).float() for g in grads]))
        J = torch.stack(rows)  # the half gradients, exactly, in float32
        values = torch.stack([loss.detach().float() for loss in losses])
        d = reference(J, values)
        assert d.dtype == torch.float32
        opt.zero_grad()
        opt.backward(losses)
        got = torch.cat([p.grad.reshape(-1) for p in shared])
        assert got.dtype == dtype
        assert torch.equal(got, d.to(dtype)), "direction is not the float32 one cast back"
        opt.step()
    assert bool(torch.isfinite(flat(model)).all())


def test_autocast_bf16_with_float32_parameters() -> None:
    torch.manual_seed(0)
    model = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), shared=model.encoder,
                             aggregator=agg("central+tension"))
    before = flat(model)
    for step in range(6):
        x, ys = data(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = model(x)
            assert outs[0].dtype == torch.bfloat16
            losses = losses_of(outs, ys)
        opt.backward(losses)
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        opt.step()
    assert bool(torch.isfinite(flat(model)).all()) and not torch.equal(before, flat(model))


# -- GradScaler -----------------------------------------------------------------------------------
def train_scaled(name: str, steps: int, scaler: torch.amp.GradScaler | None, autocast: bool,
                 legacy: bool = False, device: str = "cpu", amp_dtype=torch.bfloat16,
                 capture: str = "loop"):
    torch.manual_seed(0)
    model = Net().to(device)
    kw = {"scaler": scaler} if scaler is not None else {}
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                             shared=model.encoder, aggregator=agg(name),
                             num_tasks=T if legacy else None, capture=capture, **kw)
    for step in range(steps):
        x, ys = data(step, device)
        opt.zero_grad()
        with torch.autocast(device, dtype=amp_dtype, enabled=autocast):
            losses = losses_of(model(x), ys)
        if legacy:
            for t, loss in enumerate(losses):
                with opt.task(t, loss=loss):
                    (scaler.scale(loss) if scaler is not None else loss).backward(retain_graph=t < T - 1)
        else:
            opt.backward(losses)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return model, opt


@pytest.mark.parametrize("capture", ["loop", "batched"])  # batched: the Gramian path where it applies
@pytest.mark.parametrize("name", ["central+tension", "mgda+tension", "nashmtl", "moco", "pcgrad",
                                  "uw", "famo"])
def test_gradscaler_is_bit_identical_to_no_scaler(name: str, capture: str) -> None:
    """Tensioners, Nash-MTL and MoCo are not positively homogeneous in J, and UW/FAMO read the
    losses: only the unscaled J and losses give back the same training."""
    plain, o1 = train_scaled(name, 8, None, autocast=True, capture=capture)
    scaler = torch.amp.GradScaler("cpu")
    scaled, o2 = train_scaled(name, 8, scaler, autocast=True, capture=capture)
    assert scaler.get_scale() == 65536.0  # no overflow happened
    assert torch.equal(flat(plain), flat(scaled))
    assert o1.aggregator.state_dict().keys() == o2.aggregator.state_dict().keys()
    for k, v in o1.diagnostics.items():
        assert torch.equal(v, o2.diagnostics[k]), k


def test_gradscaler_legacy_loop_equals_backward() -> None:
    s1, s2 = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    m1, _ = train_scaled("central+tension", 6, s1, autocast=False)
    m2, _ = train_scaled("central+tension", 6, s2, autocast=False, legacy=True)
    assert torch.equal(flat(m1), flat(m2))


def test_gradscaler_overflow_skips_like_plain_pytorch() -> None:
    """A scale of 2**127 overflows float32 at once: both loops skip, back off and train alike."""
    steps = 12

    def plain_loop():
        torch.manual_seed(0)
        model = Net()
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=4)
        scales = []
        for step in range(steps):
            x, ys = data(step)
            sgd.zero_grad()
            scaler.scale(sum(losses_of(model(x), ys))).backward()
            scaler.step(sgd)
            scaler.update()
            scales.append(scaler.get_scale())
        return model, scales

    torch.manual_seed(0)
    model = Net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=4)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                             shared=model.encoder, aggregator="sum", scaler=scaler)
    scales, skipped = [], 0
    for step in range(steps):
        x, ys = data(step)
        before = (flat(model), copy.deepcopy(opt.optimizer.state_dict()))
        opt.zero_grad()
        opt.backward(losses_of(model(x), ys))
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        if scaler.get_scale() < scale:  # overflow: the step was skipped
            skipped += 1
            assert torch.equal(before[0], flat(model))
            assert str(before[1]) == str(opt.optimizer.state_dict())
    ref_model, ref_scales = plain_loop()
    assert skipped >= 1
    assert scales == ref_scales
    torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-5, atol=1e-6)


def test_gradscaler_overflow_leaves_aggregator_state_untouched() -> None:
    torch.manual_seed(0)
    model = Net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), shared=model.encoder,
                             aggregator=agg("central+tension"), scaler=scaler)
    overflowed = 0
    for step in range(8):
        x, ys = data(step)
        state = copy.deepcopy(opt.aggregator.state_dict())
        opt.zero_grad()
        opt.backward(losses_of(model(x), ys))
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < scale:
            overflowed += 1
            now = opt.aggregator.state_dict()
            assert now["count"] == state["count"]
            assert (now["history"] is None and state["history"] is None) or torch.equal(
                now["history"], state["history"])
    assert overflowed >= 1
    assert opt.aggregator.state_dict()["count"] == 8 - overflowed
    assert opt.skipped_steps == 0  # the scaler skipped, not the non-finite policy


def test_scaler_argument_is_checked() -> None:
    model = Net()
    with pytest.raises(TypeError, match="GradScaler"):
        MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), shared=model.encoder,
                           scaler=object())
    # A disabled scaler is a no-op.
    m1, _ = train_scaled("mgda", 3, None, autocast=False)
    m2, _ = train_scaled("mgda", 3, torch.amp.GradScaler("cpu", enabled=False), autocast=False)
    assert torch.equal(flat(m1), flat(m2))


# -- CUDA, fp16 ----------------------------------------------------------------------------------
@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_models_aggregate_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Net().to("cuda", dtype)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), shared=model.encoder,
                             aggregator="mgda")
    x, ys = data(0, "cuda")
    outs = model(x.to(dtype))
    losses = [nn.functional.mse_loss(o, y.to(dtype)) for o, y in zip(outs, ys)]
    shared = list(model.encoder.parameters())
    J = torch.stack([torch.cat([g.reshape(-1).float() for g in torch.autograd.grad(l, shared, retain_graph=True)])
                     for l in losses])
    d = get("mgda")(J)
    opt.zero_grad()
    opt.backward(losses)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), d.to(dtype).float(), rtol=0, atol=0)


@cuda
@pytest.mark.cuda
def test_cuda_fp16_autocast_gradscaler() -> None:
    scaler = torch.amp.GradScaler("cuda")
    model, opt = train_scaled("central+tension", 8, scaler, autocast=True, device="cuda",
                              amp_dtype=torch.float16)
    assert bool(torch.isfinite(flat(model)).all())
    big = torch.amp.GradScaler("cuda", init_scale=2.0**127)
    model, opt = train_scaled("central+tension", 6, big, autocast=True, device="cuda",
                              amp_dtype=torch.float16)
    assert big.get_scale() < 2.0**127  # it overflowed and backed off
    assert opt.aggregator.state_dict()["count"] < 6  # overflowed steps did not reach the tensioner
    assert bool(torch.isfinite(flat(model)).all())
