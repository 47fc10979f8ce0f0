"""MultiTaskOptimizer: the two-line change, legacy loops, PyTorch tooling, state, bad input."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import Central, Tensioned, get

from ._helpers import Net, T


def data(seed: int = 0, tasks: int = T) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=g)
    return x, [torch.randn(32, 1, generator=g) * (t + 1) for t in range(tasks)]


def losses_of(model: Net, x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    return [nn.functional.mse_loss(o, y) for o, y in zip(model(x), ys)]


def make(aggregator="mean", seed: int = 0, momentum: float = 0.9, **kw):
    torch.manual_seed(seed)
    model = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
                             shared=model.encoder, aggregator=aggregator, **kw)
    return model, opt


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train(model, opt, steps: int, mode: str = "backward", start: int = 0) -> None:
    for i in range(start, start + steps):
        x, ys = data(i)
        opt.zero_grad()
        losses = losses_of(model, x, ys)
        if mode == "backward":
            opt.backward(losses)
        else:
            for t, loss in enumerate(losses):
                with opt.task(t, loss=loss):
                    loss.backward(retain_graph=t < len(losses) - 1)
        opt.step()


def test_sum_aggregator_equals_plain_backward() -> None:
    model, opt = make("sum")
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for i in range(5):
        x, ys = data(i)
        opt.zero_grad()
        opt.backward(losses_of(model, x, ys))
        opt.step()
        ref_opt.zero_grad()
        sum(losses_of(ref, x, ys)).backward()
        ref_opt.step()
    assert torch.allclose(flat_params(model), flat_params(ref), atol=1e-6)


@pytest.mark.parametrize("agg", ["mean", "mgda", "central", "central+tension", "mgda+tension"])
def test_shared_gets_direction_and_specific_gets_sum(agg: str) -> None:
    model, opt = make(agg)
    x, ys = data(0)
    opt.zero_grad()
    losses = losses_of(model, x, ys)
    opt.backward(losses)
    shared = list(model.encoder.parameters())
    J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(l, shared, retain_graph=True)])
                     for l in losses_of(model, x, ys)])
    d = get(agg)(J, torch.stack([l.detach() for l in losses]))
    got = torch.cat([p.grad.flatten() for p in shared])
    assert torch.allclose(got, d, atol=1e-6)
    # Task-specific: the plain sum (each head only sees its task).
    for h, l in zip(model.heads, losses_of(model, x, ys)):
        ref = torch.autograd.grad(l, list(h.parameters()), retain_graph=True)
        for p, r in zip(h.parameters(), ref):
            assert torch.allclose(p.grad, r, atol=1e-6)
    # The shared .grad are views of one flat buffer (the loss-only route writes them one by one,
    # as backward() does).
    if opt.last_capture != "losses":
        base = shared[0].grad.untyped_storage().data_ptr()
        assert all(p.grad.untyped_storage().data_ptr() == base for p in shared)


@pytest.mark.parametrize("agg", ["mean", "mgda", "central+tension"])
@pytest.mark.parametrize("num_tasks", [None, T])
def test_legacy_loop_hooks_equal_backward(agg: str, num_tasks) -> None:
    """Bit for bit against backward's loop capture; to float rounding against ``timed`` (which
    may pick the batched pass on the CPU)."""
    m1, o1 = make(agg, num_tasks=num_tasks, capture="loop")
    m2, o2 = make(agg, num_tasks=num_tasks)
    m3, o3 = make(agg, num_tasks=num_tasks, capture="timed")
    train(m1, o1, 14, "backward")
    train(m2, o2, 14, "hooks")
    train(m3, o3, 14, "backward")
    assert torch.equal(flat_params(m1), flat_params(m2))
    assert o2.last_capture == "task hooks" and o3.last_capture in ("loop", "batched", "losses")
    assert torch.allclose(flat_params(m3), flat_params(m2), rtol=1e-5, atol=1e-6)


def test_legacy_loop_direction_ready_for_clipping_when_T_known() -> None:
    model, opt = make("mgda", num_tasks=T)
    x, ys = data(0)
    opt.zero_grad()
    for t, loss in enumerate(losses_of(model, x, ys)):
        with opt.task(t):
            loss.backward(retain_graph=t < T - 1)
    total = nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert float(total) > 1e-3
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert float(norm) <= 1e-3 * 1.0001
    opt.step()


def test_legacy_loop_errors() -> None:
    model, opt = make("central+tension", num_tasks=None)
    x, ys = data(0)
    losses = losses_of(model, x, ys)
    for t, loss in enumerate(losses):
        with opt.task(t):  # no loss= given
            loss.backward(retain_graph=True)
    before = flat_params(model)
    with pytest.raises(ValueError, match="reads the loss values"):
        opt.step()
    assert torch.equal(before, flat_params(model))
    opt.zero_grad()
    with pytest.raises(ValueError, match="task index"):
        with opt.task(-1):
            pass
    with opt.task(0):
        with pytest.raises(RuntimeError, match="do not nest"):
            with opt.task(1):
                pass
    opt.zero_grad()
    with opt.task(0, loss=losses[0]):
        losses[0].backward(retain_graph=True)
    with opt.task(2, loss=losses[2]):
        losses[2].backward(retain_graph=True)
    opt.step()  # task 1 had no block: it is absent from this step
    assert opt.diagnostics["present"].tolist() == [True, False, True]


def test_gradient_accumulation_without_zero_grad() -> None:
    model, opt = make("mgda", momentum=0.0)
    x, ys = data(0)
    opt.zero_grad()
    opt.backward(losses_of(model, x, ys))
    first = [p.grad.clone() for p in model.parameters()]
    opt.backward(losses_of(model, x, ys))
    for p, g in zip(model.parameters(), first):
        assert torch.allclose(p.grad, 2 * g, atol=1e-6)


def test_lr_scheduler_and_clipping_work() -> None:
    model, opt = make("central+tension")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "step() before optimizer.step()" warning
        for i in range(4):
            x, ys = data(i)
            opt.zero_grad()
            opt.backward(losses_of(model, x, ys))
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
            assert float(norm) <= 0.5 * 1.0001
            opt.step()
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize("agg", ["mean", "central+tension", "mgda+tension"])
def test_checkpoint_resume_is_bit_exact(agg: str) -> None:
    m1, o1 = make(agg)
    train(m1, o1, 24)
    m2, o2 = make(agg)
    train(m2, o2, 12)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    m3, o3 = make(agg, seed=123)
    m3.load_state_dict(ck["model"])
    o3.load_state_dict(ck["opt"])
    train(m3, o3, 12, start=12)
    assert torch.equal(flat_params(m1), flat_params(m3))


def test_load_state_dict_mismatches_are_errors() -> None:
    model, opt = make("central+tension")
    train(model, opt, 2)
    sd = opt.state_dict()
    # Different number of tasks.
    torch.manual_seed(0)
    m2 = Net(tasks=2)
    o2 = MultiTaskOptimizer(torch.optim.SGD(m2.parameters(), lr=0.1), shared=m2.encoder,
                            aggregator="central+tension", num_tasks=2)
    with pytest.raises(ValueError, match="3 tasks"):
        o2.load_state_dict(sd)
    # Different shared parameters.
    o3 = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                            shared=model.encoder[0], aggregator="central+tension")
    with pytest.raises(ValueError, match="different shared parameters"):
        o3.load_state_dict(sd)
    # Different aggregator.
    o4 = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), shared=model.encoder,
                            aggregator="mgda")
    with pytest.raises(ValueError, match="aggregator is Tensioned"):
        o4.load_state_dict(sd)
    assert o4.state_dict()["state"] == {}


def snapshot(model, opt):
    return flat_params(model), copy.deepcopy(opt.optimizer.state_dict()), copy.deepcopy(opt.aggregator.state_dict())


def assert_untouched(model, opt, snap) -> None:
    p, st, ag = snap
    assert torch.equal(p, flat_params(model))
    now = opt.optimizer.state_dict()
    assert now["param_groups"] == st["param_groups"]
    for k, v in st["state"].items():
        for name, t in v.items():
            assert torch.equal(now["state"][k][name], t)
    now_ag = opt.aggregator.state_dict()
    if ag.get("history") is not None:
        assert torch.equal(now_ag["history"], ag["history"]) and now_ag["count"] == ag["count"]


@pytest.mark.filterwarnings("ignore:task 2.s loss does not depend")  # the zero loss, in batched mode
def test_bad_losses_are_clear_errors_and_change_nothing() -> None:
    model, opt = make("central+tension")
    train(model, opt, 3)
    snap = snapshot(model, opt)
    x, ys = data(9)
    losses = losses_of(model, x, ys)
    cases = [
        ([losses[0], losses[1]], ValueError, "expected 3 task losses"),
        ([losses[0], losses[1], torch.stack([losses[2], losses[2]])], ValueError, "task 2 is not a scalar"),
        ([losses[0], losses[1].detach(), losses[2]], ValueError, "task 1 does not require grad"),
        ([losses[0], losses[1] * float("nan"), losses[2]], FloatingPointError, "task 1 is not finite"),
        ([losses[0], 1.0, losses[2]], TypeError, "task 1 is a float"),
        ([], ValueError, "empty"),
        ("abc", TypeError, "sequence of scalar tensors"),
        ([losses[0], losses[1], losses[2] * 0.0 + 0.0], ValueError, "task 2 has loss"),
    ]
    for bad, exc, msg in cases:
        opt.zero_grad()
        with pytest.raises(exc, match=msg):
            opt.backward(bad)
        assert_untouched(model, opt, snap)
        for p in model.parameters():
            assert p.grad is None


def test_nonfinite_gradient_raise_and_skip() -> None:
    model, opt = make("mgda")
    train(model, opt, 2)
    snap = snapshot(model, opt)
    x, ys = data(5)

    def losses_with_bad_grad():
        outs = model(x)
        z = model.encoder(x)
        # A finite loss whose gradient is not finite: sqrt at 0.
        bad = (z[:, :1] * 0).abs().sqrt().sum()
        return [nn.functional.mse_loss(outs[0], ys[0]), bad + 1.0,
                nn.functional.mse_loss(outs[2], ys[2])]

    opt.zero_grad()
    with pytest.raises(FloatingPointError, match="task 1 has a non-finite gradient in shared parameter '0.weight'"):
        opt.backward(losses_with_bad_grad())
    assert_untouched(model, opt, snap)
    model2, opt2 = make("mgda", nonfinite="skip")
    train(model2, opt2, 2)
    snap2 = snapshot(model2, opt2)
    opt2.zero_grad()
    outs = model2(x)
    z = model2.encoder(x)
    bad = (z[:, :1] * 0).abs().sqrt().sum()
    ls = [nn.functional.mse_loss(outs[0], ys[0]), bad + 1.0, nn.functional.mse_loss(outs[2], ys[2])]
    opt2.backward(ls)
    assert opt2.step() is None
    assert opt2.skipped_steps == 1
    assert_untouched(model2, opt2, snap2)
    train(model2, opt2, 1)  # the next good step runs
    assert not torch.equal(snap2[0], flat_params(model2))


def test_construction_errors() -> None:
    model = Net()
    sgd = torch.optim.SGD(model.heads.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not held by the wrapped optimizer"):
        MultiTaskOptimizer(sgd, shared=model.encoder)
    full = torch.optim.SGD(model.parameters(), lr=0.1)
    p = next(model.encoder.parameters())
    with pytest.raises(ValueError, match="given twice"):
        MultiTaskOptimizer(full, shared=[p, p])
    with pytest.raises(ValueError, match="no shared parameters"):
        MultiTaskOptimizer(full, shared=[])
    with pytest.raises(ValueError, match="no shared parameters"):
        MultiTaskOptimizer(full, shared=nn.Sequential())
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        MultiTaskOptimizer(object(), shared=model.encoder)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown aggregator"):
        MultiTaskOptimizer(full, shared=model.encoder, aggregator="bogus")
    with pytest.raises(ValueError, match="nonfinite"):
        MultiTaskOptimizer(full, shared=model.encoder, nonfinite="ignore")
    with pytest.raises(TypeError, match="transform"):
        MultiTaskOptimizer(full, shared=model.encoder, plugins=[object()])


def test_task_without_path_to_shared_gets_zero_row_and_warns_once() -> None:
    model, opt = make("central+tension")
    x, ys = data(0)
    for i in range(3):
        opt.zero_grad()
        outs = model(x)
        # Task 2's loss reaches only its own head, never the encoder.
        losses = [nn.functional.mse_loss(outs[0], ys[0]), nn.functional.mse_loss(outs[1], ys[1]),
                  (model.heads[2].bias ** 2).sum() + 1.0]
        if i == 0:
            with pytest.warns(RuntimeWarning, match="task 2's loss does not depend on the shared"):
                opt.backward(losses)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                opt.backward(losses)
        shared_grad = torch.cat([p.grad.flatten() for p in model.encoder.parameters()])
        assert bool(torch.isfinite(shared_grad).all())
        opt.step()


def test_diagnostics() -> None:
    model, opt = make("central+tension")
    train(model, opt, 12)
    dg = opt.diagnostics
    assert dg["cosine"].shape == (T, T) and torch.allclose(torch.diagonal(dg["cosine"]), torch.ones(T))
    assert dg["angle"].shape == (T,) and bool((dg["angle"] <= 90 + 1e-3).all())
    assert dg["weights"].shape == (T,)
    assert dg["c"].shape == (T,) and dg["delta"].shape == (T,)
    assert dg["tensioned"].item() == 1.0
    off = make("mean", diagnostics=False)[1]
    assert off.diagnostics == {}


def test_bf16_shared_parameters_aggregate_in_float32() -> None:
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), shared=model.encoder,
                             aggregator="central+tension")
    x, ys = data(0)
    opt.zero_grad()
    opt.backward(losses_of(model, x.bfloat16(), [y.bfloat16() for y in ys]))
    assert opt.jacobian is not None and opt.jacobian.dtype == torch.float32
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    opt.step()


def test_losses_as_one_tensor_and_plugins_parameters() -> None:
    model, opt = make("mean")
    x, ys = data(0)
    opt.zero_grad()
    opt.backward(torch.stack(losses_of(model, x, ys)))
    opt.step()

    class Scale:
        def __init__(self) -> None:
            self.p = nn.Parameter(torch.tensor(2.0))
            self.calls = 0

        def parameters(self):
            return [self.p]

        def transform(self, J, losses):
            self.calls += 1
            return J * 2

        def post_step(self):
            self.calls += 10

    plug = Scale()
    torch.manual_seed(0)
    m = Net()
    o = MultiTaskOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), shared=m.encoder,
                           aggregator="sum", plugins=[plug])
    o.zero_grad()
    losses = [l * plug.p for l in losses_of(m, x, ys)]
    o.backward(losses)
    assert plug.p.grad is not None  # plugin-declared tensors receive their summed gradient
    shared = list(m.encoder.parameters())
    ref = sum(torch.cat([g.flatten() for g in torch.autograd.grad(l * plug.p, shared, retain_graph=True)])
              for l in losses_of(m, x, ys))
    assert torch.allclose(torch.cat([p.grad.flatten() for p in shared]), 2 * ref, atol=1e-5)
    o.step()
    assert plug.calls == 11
