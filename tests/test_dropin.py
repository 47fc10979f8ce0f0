"""The two-line change in real training loops: defaults, absent tasks, gradient accumulation,
clipping in legacy loops, frozen layers, and the mistakes a new user makes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators._registry import needs_validation

from ._helpers import Net, T, data


def mse(outs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    return [nn.functional.mse_loss(o, y) for o, y in zip(outs, ys)]


def build(net: Net, aggregator: object = None, optim: str = "sgd", **kw) -> MultiTaskOptimizer:
    inner = (torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) if optim == "sgd"
             else torch.optim.Adam(net.parameters(), lr=1e-2))
    if aggregator is None:
        return MultiTaskOptimizer(inner, shared=net.encoder, **kw)
    return MultiTaskOptimizer(inner, shared=net.encoder, aggregator=aggregator, **kw)


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


# -- Defaults: the two-line change trains exactly as sum(losses).backward() ------------------------

@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_defaults_train_bit_for_bit_as_plain_sum(optim: str) -> None:
    torch.manual_seed(0)
    plain_net = Net()
    ours_net = copy.deepcopy(plain_net)
    plain = (torch.optim.SGD(plain_net.parameters(), lr=0.05, momentum=0.9) if optim == "sgd"
             else torch.optim.Adam(plain_net.parameters(), lr=1e-2))
    ours = build(ours_net, optim=optim)
    for step in range(8):
        x, ys = data(step)
        plain.zero_grad()
        sum(mse(plain_net(x), ys)).backward()
        plain.step()
        ours.zero_grad()
        ours.backward(mse(ours_net(x), ys))
        ours.step()
        for a, b in zip(plain_net.parameters(), ours_net.parameters()):
            assert torch.equal(a.grad, b.grad)
            assert torch.equal(a, b)
    assert ours.last_capture == "losses"
    assert ours.jacobian is None  # never built
    assert set(ours.diagnostics) == {"weights", "losses"}


def test_defaults_accumulate_into_grad_as_plain_backward() -> None:
    # Without zero_grad between two backward calls .grad accumulates, as with plain backward.
    torch.manual_seed(1)
    a, b = Net(), None
    b = copy.deepcopy(a)
    opt = build(b)
    for step in range(2):
        x, ys = data(step)
        sum(mse(a(x), ys)).backward()
        opt.backward(mse(b(x), ys))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("name", ["mean", "constant", "rlw", "dwa", "uw", "famo"])
def test_loss_only_route_equals_the_jacobian_route(name: str) -> None:
    kw = {"weights": [1.0, 0.5, 2.0]} if name == "constant" else {}
    torch.manual_seed(2)
    net_a = Net()
    net_b = copy.deepcopy(net_a)
    fast = MultiTaskOptimizer(torch.optim.SGD(net_a.parameters(), lr=0.05), shared=net_a.encoder,
                              aggregator=get(name, **kw))
    slow = MultiTaskOptimizer(torch.optim.SGD(net_b.parameters(), lr=0.05), shared=net_b.encoder,
                              aggregator=get(name, **kw), capture="loop")
    if name == "rlw":
        slow.aggregator.load_state_dict(fast.aggregator.state_dict())
    for step in range(6):
        x, ys = data(step)
        for opt, net in ((fast, net_a), (slow, net_b)):
            opt.zero_grad()
            opt.backward(mse(net(x), ys))
        assert fast.last_capture == "losses" and slow.last_capture == "loop"
        for p, q in zip(net_a.parameters(), net_b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fast.diagnostics["weights"], slow.diagnostics["weights"])
        fast.step()
        slow.step()


def test_full_diagnostics_build_j_for_a_loss_only_method() -> None:
    net = Net()
    opt = build(net, "mean", diagnostics="full")
    x, ys = data(0)
    opt.backward(mse(net(x), ys))
    assert opt.last_capture != "losses"
    assert {"cosine", "grad_norms", "angle", "weights"} <= set(opt.diagnostics)
    with pytest.raises(ValueError, match="diagnostics must be"):
        build(Net(), diagnostics="some")


class NaNGrad(torch.autograd.Function):
    """The identity whose backward is NaN: a non-finite gradient behind a finite loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.full_like(g, float("nan"))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_loss_only_route_nonfinite_gradient_leaves_everything_untouched(policy: str) -> None:
    from torch_mtlgrad import NonFiniteError

    net = Net()
    opt = build(net, "dwa", nonfinite=policy)
    for step in range(3):  # DWA keeps a loss history
        x, ys = data(step)
        opt.zero_grad()
        opt.backward(mse(net(x), ys))
        opt.step()
    state = copy.deepcopy(opt.aggregator.state_dict())
    params = flat(net)
    opt.zero_grad()
    x, ys = data(5)
    z = net.encoder(x)
    losses = mse([net.heads[0](z), net.heads[1](NaNGrad.apply(z)), net.heads[2](z)], ys)
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="shared parameter"):
            opt.backward(losses)
    else:
        opt.backward(losses)
        opt.step()
        assert opt.skipped_steps == 1
    assert all(p.grad is None for p in net.parameters())
    assert str(opt.aggregator.state_dict()) == str(state)
    assert torch.equal(flat(net), params)


# -- Absent tasks ----------------------------------------------------------------------------------

def test_absent_task_gets_no_gradient_and_the_rest_combine_in_place() -> None:
    torch.manual_seed(3)
    net = Net()
    opt = build(net, "mgda", capture="loop")
    x, ys = data(0)
    outs = net(x)
    losses = mse(outs, ys)
    opt.backward([losses[0], None, losses[2]], retain_graph=True)
    w = opt.diagnostics["weights"]
    assert w.shape == (T,) and w[1] == 0
    assert torch.isnan(opt.diagnostics["grad_norms"][1])
    assert opt.diagnostics["present"].tolist() == [True, False, True]
    assert all(p.grad is None for p in net.heads[1].parameters())
    # The reference: MGDA on the present rows only.
    J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        losses[t], list(net.encoder.parameters()), retain_graph=True)]) for t in (0, 2)])
    d = get("mgda")(J)
    got = torch.cat([p.grad.flatten() for p in net.encoder.parameters()])
    torch.testing.assert_close(got, d, rtol=1e-5, atol=1e-7)


def test_present_mask_equals_none_entries() -> None:
    torch.manual_seed(4)
    a = Net()
    b = copy.deepcopy(a)
    oa, ob = build(a, "upgrad"), build(b, "upgrad")
    x, ys = data(1)
    la, lb = mse(a(x), ys), mse(b(x), ys)
    oa.backward([la[0], None, la[2]])
    ob.backward(lb, present=[True, False, True])
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)
    with pytest.raises(ValueError, match="present has 2 entries"):
        ob.backward(lb, present=[True, False])
    with pytest.raises(TypeError, match="bools"):
        ob.backward(lb, present=[1, 0, 1])


def test_no_task_present_does_nothing_and_says_so() -> None:
    net = Net()
    opt = build(net, "mgda")
    x, ys = data(0)
    opt.zero_grad()
    opt.backward(mse(net(x), ys))
    opt.step()  # momentum buffers exist now
    before = flat(net)
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match="no task is present"):
        opt.backward([None, None, None])
    opt.step()
    assert torch.equal(flat(net), before)


@pytest.mark.parametrize("aggregator", ["sum", "mgda", "central+tension", "dwa"])
def test_absent_tasks_over_many_steps_train(aggregator: str) -> None:
    torch.manual_seed(5)
    net = Net()
    opt = build(net, aggregator, num_tasks=T)
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        x, ys = data(step)
        losses = mse(net(x), ys)
        keep = torch.rand(T, generator=g) < 0.6
        if not keep.any():
            keep[step % T] = True
        opt.zero_grad()
        heads_before = [h.weight.detach().clone() for h in net.heads]
        opt.backward([loss if k else None for loss, k in zip(losses, keep.tolist())])
        for t in range(T):
            assert (net.heads[t].weight.grad is None) == (not keep[t])
        opt.step()
        for t in range(T):
            if not keep[t] and step == 0:
                assert torch.equal(net.heads[t].weight, heads_before[t])
    assert torch.isfinite(flat(net)).all()


def test_legacy_loop_skipping_a_block_equals_none_loss() -> None:
    torch.manual_seed(6)
    a = Net()
    b = copy.deepcopy(a)
    oa = build(a, "mgda", num_tasks=T)
    ob = build(b, "mgda", num_tasks=T)
    x, ys = data(2)
    la = mse(a(x), ys)
    oa.backward([la[0], la[1], None])
    oa.step()
    lb = mse(b(x), ys)
    for t in (0, 1):
        with ob.task(t):
            lb[t].backward(retain_graph=True)
    ob.step()
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-6, atol=1e-7)


def test_zero_loss_warning_suggests_none_and_points_at_the_caller() -> None:
    net = Net()
    opt = build(net, "mgda")
    x, ys = data(0)
    losses = mse(net(x), ys)
    with pytest.warns(RuntimeWarning, match="pass None") as record:
        opt.backward([losses[0], 0 * losses[1], losses[2]])
    assert record[0].filename == __file__  # the user's line, not the library's


# -- Legacy loops and clipping ---------------------------------------------------------------------

def legacy_backward(opt: MultiTaskOptimizer, losses: list[torch.Tensor]) -> None:
    """The loop a user already has: one backward per task, each in its task() block."""
    for t, loss in enumerate(losses):
        with opt.task(t):
            loss.backward(retain_graph=t < len(losses) - 1)


def test_legacy_clip_without_num_tasks_is_refused() -> None:
    net = Net()
    opt = build(net, "mgda")
    x, ys = data(0)
    losses = mse(net(x), ys)
    legacy_backward(opt, losses)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    before = flat(net)
    with pytest.raises(RuntimeError, match="num_tasks=T"):
        opt.step()
    assert torch.equal(flat(net), before)


def test_legacy_clip_with_num_tasks_sees_the_direction() -> None:
    torch.manual_seed(7)
    a = Net()
    b = copy.deepcopy(a)
    oa = build(a, "mgda", num_tasks=T)
    ob = build(b, "mgda")
    x, ys = data(0)
    la = mse(a(x), ys)
    legacy_backward(oa, la)
    norm_legacy = torch.nn.utils.clip_grad_norm_(a.encoder.parameters(), 1e9)
    ob.backward(mse(b(x), ys))
    norm_direct = torch.nn.utils.clip_grad_norm_(b.encoder.parameters(), 1e9)
    torch.testing.assert_close(norm_legacy, norm_direct)
    oa.step()  # no error: the direction was written when the last block ended


def test_legacy_loop_without_clipping_still_works_without_num_tasks() -> None:
    net = Net()
    opt = build(net, "mgda")
    x, ys = data(0)
    losses = mse(net(x), ys)
    legacy_backward(opt, losses)
    opt.step()
    assert opt.num_tasks == T


def test_plain_backward_next_to_the_optimizer_warns_once() -> None:
    net = Net()
    opt = build(net, "mgda")
    for step in range(3):
        x, ys = data(step)
        opt.zero_grad()
        sum(mse(net(x), ys)).backward()
        if step == 0:
            with pytest.warns(UserWarning, match="sum\\(losses\\).backward\\(\\)"):
                opt.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                opt.step()


def test_converted_loop_does_not_warn() -> None:
    net = Net()
    opt = build(net, "mgda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            x, ys = data(step)
            opt.zero_grad()
            opt.backward(mse(net(x), ys))
            opt.step()


# -- Gradient accumulation -------------------------------------------------------------------------

@pytest.mark.parametrize("aggregator", ["mgda", "upgrad", "central+tension", "dwa", "pcgrad", "sum"])
def test_accumulation_equals_one_step_on_the_concatenation(aggregator: str) -> None:
    torch.manual_seed(8)
    a = Net().double()
    b = copy.deepcopy(a)
    kw = {"seed": 0} if aggregator == "pcgrad" else {}  # the same random orders in both
    oa, ob = build(a, get(aggregator, **kw)), build(b, get(aggregator, **kw))
    k = 3
    for step in range(3):
        x, ys = data(step, rows=24)
        x, ys = x.double(), [y.double() for y in ys]
        oa.zero_grad()
        oa.backward(mse(a(x), ys))
        oa.step()
        ob.zero_grad()
        for i in range(k):
            sl = slice(8 * i, 8 * (i + 1))
            losses = [loss / k for loss in mse(b(x[sl]), [y[sl] for y in ys])]
            ob.backward(losses, accumulate=i < k - 1)
        ob.step()
        torch.testing.assert_close(flat(a), flat(b), rtol=1e-9, atol=1e-11)


def test_accumulation_finished_by_step_and_dropped_by_zero_grad() -> None:
    torch.manual_seed(9)
    a = Net().double()
    b = copy.deepcopy(a)
    oa, ob = build(a, "mgda"), build(b, "mgda")
    x, ys = data(0, rows=16)
    x, ys = x.double(), [y.double() for y in ys]
    oa.backward(mse(a(x), ys))
    oa.step()
    for i in range(2):
        sl = slice(8 * i, 8 * (i + 1))
        ob.backward([loss / 2 for loss in mse(b(x[sl]), [y[sl] for y in ys])], accumulate=True)
    ob.step()  # finishes the accumulation
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-9, atol=1e-11)
    ob.zero_grad()
    ob.backward(mse(b(x), ys), accumulate=True)
    ob.zero_grad()  # drops it: the step then has no gradient at all
    before = flat(b)
    ob.step()
    assert torch.equal(flat(b), before)


def test_accumulation_with_absent_tasks_in_some_micro_batches() -> None:
    torch.manual_seed(10)
    net = Net().double()
    opt = build(net, "mgda")
    x, ys = data(0, rows=16)
    x, ys = x.double(), [y.double() for y in ys]
    l1 = mse(net(x[:8]), [y[:8] for y in ys])
    opt.backward([l1[0], None, None], accumulate=True)
    l2 = mse(net(x[8:]), [y[8:] for y in ys])
    opt.backward([l2[0], l2[1], None])
    assert opt.diagnostics["present"].tolist() == [True, True, False]
    assert all(p.grad is None for p in net.heads[2].parameters())
    with pytest.raises(ValueError, match="representation"):
        MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), shared=net.encoder,
                           aggregator="mgda", capture="representation").backward(
            l2, features=torch.ones(1, requires_grad=True), accumulate=True)


# -- Frozen layers, shared=, generators ------------------------------------------------------------

def test_partly_frozen_encoder() -> None:
    net = Net()
    net.encoder[0].requires_grad_(False)
    opt = MultiTaskOptimizer(torch.optim.SGD([p for p in net.parameters() if p.requires_grad],
                                             lr=0.1), shared=net.encoder, aggregator="mgda")
    assert opt.layout.names == ["2.weight", "2.bias"]
    x, ys = data(0)
    opt.backward(mse(net(x), ys))
    opt.step()
    assert net.encoder[0].weight.grad is None
    net.encoder[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="was frozen"):
        opt.backward(mse(net(x), ys))


def test_trainable_shared_parameter_missing_from_the_optimizer_is_an_error() -> None:
    net = Net()
    with pytest.raises(ValueError, match="not held by the wrapped optimizer"):
        MultiTaskOptimizer(torch.optim.SGD(net.heads.parameters(), lr=0.1), shared=net.encoder)


def test_everything_frozen_is_an_error() -> None:
    net = Net()
    net.encoder.requires_grad_(False)
    with pytest.raises(ValueError, match="every shared parameter is frozen"):
        MultiTaskOptimizer(torch.optim.SGD(net.heads.parameters(), lr=0.1), shared=net.encoder)


def test_shared_whole_model_warns() -> None:
    net = Net()
    with pytest.warns(UserWarning, match="no parameter is task-specific"):
        MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), shared=net)


def test_consumed_generator_is_named() -> None:
    net = Net()
    gen = net.parameters()
    inner = torch.optim.SGD(gen, lr=0.1)
    with pytest.raises(ValueError, match="consumed"):
        MultiTaskOptimizer(inner, shared=gen)


# -- Every registry entry with random presence patterns, against the method on the present rows ----

def _registry_method(name: str):
    kw: dict = {}
    base = name.split("+")[0]
    if base == "constant":
        kw["weights"] = [0.5, 2.0, 1.5]
    if base in ("rlw", "pcgrad", "graddrop", "gradvac", "cosmos"):
        kw["seed"] = 3
    if name.endswith("+tension"):
        kw["window"] = 2
    return get(name, **kw)


def _reference_step(net: Net, agg, x, ys, keep: list[bool], lr: float) -> None:
    """One SGD step by hand: J of the present tasks, the method on those rows (told which tasks
    they are), the direction into the encoder, each present head its own gradient."""
    losses = mse(net(x), ys)
    tasks = [t for t in range(T) if keep[t]]
    shared = list(net.encoder.parameters())
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
            for t in tasks]
    values = torch.stack([losses[t].detach() for t in tasks])
    present = torch.tensor(keep)
    out = agg.aggregate(torch.stack(rows), values,
                        present=None if all(keep) else present)
    d = out.direction
    with torch.no_grad():
        offset = 0
        for p in shared:
            p -= lr * d[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        for t in tasks:
            for p, g in zip(net.heads[t].parameters(),
                            torch.autograd.grad(losses[t], list(net.heads[t].parameters()),
                                                retain_graph=True)):
                p -= lr * g


@pytest.mark.parametrize("capture", ["auto", "batched"])
@pytest.mark.parametrize("name", sorted(n for n in __import__(
    "torch_mtlgrad.aggregators", fromlist=["available"]).available() if not needs_validation(n)))
def test_every_method_with_random_presence_equals_the_method_on_present_rows(name: str,
                                                                               capture: str) -> None:
    torch.manual_seed(11)
    net = Net().double()
    ref = copy.deepcopy(net)
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.02), shared=net.encoder,
                             aggregator=_registry_method(name), num_tasks=T, capture=capture)
    ref_agg = _registry_method(name)
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        x, ys = data(step)
        x, ys = x.double(), [y.double() for y in ys]
        keep = (torch.rand(T, generator=g) < 0.65).tolist()
        if not any(keep):
            keep[step % T] = True
        if step == 0:
            keep = [True, False, True]  # a task absent at the very first step
        opt.zero_grad()
        losses = mse(net(x), ys)
        opt.backward([loss if k else None for loss, k in zip(losses, keep)])
        opt.step()
        _reference_step(ref, ref_agg, x, ys, keep, lr=0.02)
        torch.testing.assert_close(flat(net), flat(ref), rtol=1e-9, atol=1e-11,
                                   msg=lambda m, s=step, k=keep: f"{name}, step {s}, present {k}: {m}")


# -- GradNorm at one layer: T small backward passes for the norms, then one weighted backward ------

def _last_layer_columns(net: Net) -> tuple[int, int]:
    from torch_mtlgrad.capture import FlatLayout

    layout = FlatLayout(list(net.encoder.parameters()))
    return layout.param_range(2)[0], layout.param_range(3)[1]  # encoder[2]: weight and bias


@pytest.mark.parametrize("absent", [False, True])
def test_gradnorm_layer_route_equals_the_jacobian_route(absent: bool) -> None:
    from torch_mtlgrad.aggregators.gradnorm import GradNorm

    torch.manual_seed(12)
    a = Net().double()
    b = copy.deepcopy(a)
    cols = _last_layer_columns(a)
    fast = MultiTaskOptimizer(torch.optim.SGD(a.parameters(), lr=0.05), shared=a.encoder,
                              aggregator=GradNorm(layer=cols))
    slow = MultiTaskOptimizer(torch.optim.SGD(b.parameters(), lr=0.05), shared=b.encoder,
                              aggregator=GradNorm(layer=cols), capture="loop")
    for step in range(6):
        x, ys = data(step)
        x, ys = x.double(), [y.double() for y in ys]
        keep = [True, step % 2 == 0 or not absent, True]
        for opt, net in ((fast, a), (slow, b)):
            opt.zero_grad()
            losses = mse(net(x), ys)
            opt.backward([loss if k else None for loss, k in zip(losses, keep)])
            opt.step()
        assert fast.last_capture == "layer" and fast.jacobian is None
        torch.testing.assert_close(fast.diagnostics["weights"], slow.diagnostics["weights"])
        torch.testing.assert_close(flat(a), flat(b), rtol=1e-10, atol=1e-12)


def test_gradnorm_layer_not_on_whole_parameters_takes_the_jacobian_route() -> None:
    from torch_mtlgrad.aggregators.gradnorm import GradNorm

    net = Net()
    opt = build(net, GradNorm(layer=(0, 7)))
    x, ys = data(0)
    opt.backward(mse(net(x), ys))
    assert opt.last_capture == "loop"


@pytest.mark.parametrize("name", ["mgda", "upgrad", "central", "imtlg", "pcgrad"])
def test_diagnostics_from_the_methods_gramian_equal_those_from_j(name: str) -> None:
    from torch_mtlgrad.diagnostics import step_diagnostics

    torch.manual_seed(13)
    net = Net().double()
    opt = build(net, get(name, seed=0) if name == "pcgrad" else name, capture="loop")
    x, ys = data(0)
    losses = mse(net(x.double()), [y.double() for y in ys])
    opt.backward([losses[0], None, losses[2]])
    J = opt.jacobian  # the present tasks' rows
    d = torch.cat([p.grad.flatten() for p in net.encoder.parameters()])
    ref = step_diagnostics(J, d, opt.diagnostics["weights"][[0, 2]])
    got = opt.diagnostics
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(got["grad_norms"][keep], ref["grad_norms"])
    torch.testing.assert_close(got["cosine"][keep][:, keep], ref["cosine"])
    torch.testing.assert_close(got["angle"][keep], ref["angle"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got["direction_norm"], ref["direction_norm"])


def test_gradnorm_norms_that_are_not_finite_raise_before_any_state_changes() -> None:
    from torch_mtlgrad import NonFiniteError
    from torch_mtlgrad.aggregators.gradnorm import GradNorm

    agg = GradNorm(layer=(0, 2))
    agg.aggregate_norms(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
    state = copy.deepcopy(agg.state_dict())
    with pytest.raises(NonFiniteError, match="norms are not finite .* task 1"):
        agg.aggregate_norms(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]))
    assert str(agg.state_dict()) == str(state)
    agg.aggregate_norms(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]),
                        check_finite=False)  # the caller's own policy: no check, no sync
