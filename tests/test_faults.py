"""Faults and bad input.

* Non-finite task gradients: by default an error naming the task and the first bad shared
  parameter (every capture path); with ``nonfinite="skip"`` the step is skipped, counted and
  logged, parameters, optimizer state, aggregator state and plugin state are bit-for-bit unchanged,
  and the run goes on exactly as if the bad batch had never been seen.
* Zero rows (a task with no path to the shared parameters) never divide by zero, for every
  aggregator in the registry.
* Hypothesis drives the public API with generated bad input (wrong counts, shapes, dtypes,
  devices, non-scalar / non-finite / detached losses, duplicated, missing and foreign shared
  parameters, empty shared sets, bad options): every failure is a clear ``ValueError`` /
  ``TypeError`` naming the offending item, and the model is untouched.
* Long run: many steps of min-norm + tension and PCGrad without growth of live tensors, bytes or
  the tensioner's history.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import available, get
from torch_mtlgrad.aggregators._registry import needs_validation

from ._helpers import Net, T, data

NAN = float("nan")

# Extra constructor arguments for registry entries that have required ones.
REQUIRED_KWARGS = {"constant": {"weights": [0.2, 0.3, 0.5]}}


def losses_of(model: Net, step: int) -> list[torch.Tensor]:
    x, ys = data(step)
    return [nn.functional.mse_loss(o, y) for o, y in zip(model(x), ys)]


def aggregator(name: str):
    base = name.split("+")[0]
    kw = dict(REQUIRED_KWARGS.get(base, {}))
    if name.endswith("+tension"):
        kw["window"] = 3
    if base in ("pcgrad", "graddrop", "gradvac", "rlw"):
        kw["seed"] = 5
    return get(name, **kw)


def build(name: str = "central+tension", adam: bool = False, **kw):
    torch.manual_seed(0)
    model = Net()
    base = (torch.optim.Adam(model.parameters(), lr=1e-2) if adam
            else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    return model, MultiTaskOptimizer(base, shared=model.encoder, aggregator=aggregator(name), **kw)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def nested_equal(a, b) -> bool:
    """Bit-for-bit equality of nested state dicts (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def snapshot(model: nn.Module, opt: MultiTaskOptimizer):
    return flat(model).clone(), copy.deepcopy(opt.state_dict())


def assert_untouched(model: nn.Module, opt: MultiTaskOptimizer, snap) -> None:
    params, state = snap
    assert torch.equal(params, flat(model)), "parameters changed"
    now = opt.state_dict()
    now["mtlgrad"].pop("skipped_steps", None)
    state = copy.deepcopy(state)
    state["mtlgrad"].pop("skipped_steps", None)
    assert nested_equal(state, now), "optimizer / aggregator / plugin state changed"


def bad_gradient(model: Net, losses: list[torch.Tensor], t: int) -> list[torch.Tensor]:
    """Task ``t``'s loss stays finite but its gradient in encoder[2].bias (only) is NaN:
    d sqrt(|0 * b|) / db = inf * 0."""
    out = list(losses)
    out[t] = out[t] + (model.encoder[2].bias * 0).abs().sqrt().sum()
    return out


# -- non-finite gradients: raise ---------------------------------------------------------------
@pytest.mark.parametrize("path", ["loop", "batched", "timed", "legacy"])
def test_nonfinite_gradient_error_names_task_and_first_bad_parameter(path: str) -> None:
    capture = "auto" if path == "legacy" else path
    model, opt = build("mgda", capture=capture, num_tasks=T)
    # Under "timed" the first steps alternate loop and batched: the bad step is the 4th, batched.
    for step in range(3 if path == "timed" else 2):
        opt.zero_grad()
        opt.backward(losses_of(model, step))
        opt.step()
    snap = snapshot(model, opt)
    opt.zero_grad()
    losses = bad_gradient(model, losses_of(model, 3), 1)
    # The batched backward sends every task's cotangent through every node: a zero cotangent
    # times task 1's infinite local derivative is NaN in *every* row.  The optimizer then refills
    # J by the loop (it kept the graph) to name task 1.
    with pytest.raises(FloatingPointError, match=r"task 1 has a non-finite gradient in shared "
                                                 r"parameter '2\.bias'"):
        if path == "legacy":
            for t, loss in enumerate(losses):
                with opt.task(t, loss=loss):
                    loss.backward(retain_graph=t < T - 1)
        else:
            opt.backward(losses)
    if path in ("batched", "timed"):
        assert opt.last_capture == "batched"
    assert_untouched(model, opt, snap)
    assert all(p.grad is None for p in model.encoder.parameters())


def test_nonfinite_loss_error_names_task() -> None:
    model, opt = build("mgda")
    losses = losses_of(model, 0)
    losses[2] = losses[2] * float("inf")
    snap = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"loss of task 2 is not finite \(inf\)"):
        opt.backward(losses)
    assert_untouched(model, opt, snap)


# -- non-finite gradients: skip ----------------------------------------------------------------
SKIP_CASES = [("central+tension", False), ("pcgrad", True), ("famo", True), ("mgda+tension", True)]


@pytest.mark.parametrize("name,adam", SKIP_CASES)
def test_skip_policy_changes_nothing_and_resumes_as_if_never_seen(name: str, adam: bool, caplog) -> None:
    bad_steps = {2, 5}

    def conflict(m: Net) -> list[nn.Module]:  # a stateful plugin too
        return [m.encoder[0], m.encoder[2]]

    torch.manual_seed(0)
    model = Net()
    base = (torch.optim.Adam(model.parameters(), lr=1e-2) if adam
            else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    opt = MultiTaskOptimizer(base, shared=model.encoder, aggregator=aggregator(name),
                             conflict_noticing=conflict(model), nonfinite="skip")
    torch.manual_seed(0)
    ref = Net()
    ref_base = (torch.optim.Adam(ref.parameters(), lr=1e-2) if adam
                else torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9))
    ref_opt = MultiTaskOptimizer(ref_base, shared=ref.encoder, aggregator=aggregator(name),
                                 conflict_noticing=conflict(ref))
    caplog.set_level(logging.WARNING, logger="torch_mtlgrad")
    for step in range(9):
        if step in bad_steps:
            snap = snapshot(model, opt)
            opt.zero_grad()
            opt.backward(bad_gradient(model, losses_of(model, step), step % T))
            assert opt.step() is None
            assert_untouched(model, opt, snap)
            continue
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            o.backward(losses_of(m, step))
            o.step()
    assert opt.skipped_steps == len(bad_steps)
    assert opt.state_dict()["mtlgrad"]["skipped_steps"] == len(bad_steps)
    logged = [r.getMessage() for r in caplog.records if "skipping step" in r.getMessage()]
    assert len(logged) == 2 and "task 2" in logged[0] and "task 2" in logged[1]
    # The bad batches left no trace: the run equals one that never saw them, bit for bit.
    assert torch.equal(flat(model), flat(ref))
    assert nested_equal(ref_opt.state_dict()["mtlgrad"]["aggregator"],
                        opt.state_dict()["mtlgrad"]["aggregator"])
    assert nested_equal(ref_opt.state_dict()["mtlgrad"]["plugins"], opt.state_dict()["mtlgrad"]["plugins"])


def test_skip_policy_legacy_loop_restores_accumulated_grad() -> None:
    model, opt = build("mgda", nonfinite="skip", num_tasks=T)
    opt.zero_grad()
    opt.backward(losses_of(model, 0))  # an accumulated micro-batch
    held = [p.grad.clone() for p in model.encoder.parameters()]
    snap = snapshot(model, opt)
    losses = bad_gradient(model, losses_of(model, 1), 0)
    for t, loss in enumerate(losses):
        with opt.task(t, loss=loss):
            loss.backward(retain_graph=t < T - 1)
    assert opt.step() is None and opt.skipped_steps == 1
    assert_untouched(model, opt, snap)
    for p, g in zip(model.encoder.parameters(), held):
        assert torch.equal(p.grad, g), "the skipped micro-batch leaked into the accumulated grad"


def test_nonfinite_task_specific_gradient() -> None:
    model, opt = build("mgda")
    losses = losses_of(model, 0)
    losses[1] = losses[1] + (model.heads[1].bias * 0).abs().sqrt().sum()  # NaN in a head only
    snap = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="task-specific parameter 3 "):
        opt.backward(losses)
    assert_untouched(model, opt, snap)
    model, opt = build("mgda", nonfinite="skip")
    snap = snapshot(model, opt)
    losses = losses_of(model, 0)
    losses[1] = losses[1] + (model.heads[1].bias * 0).abs().sqrt().sum()
    opt.backward(losses)
    assert opt.step() is None and opt.skipped_steps == 1
    assert_untouched(model, opt, snap)


def test_nonfinite_error_is_also_a_value_error() -> None:
    model, opt = build("mgda")
    losses = losses_of(model, 0)
    losses[0] = losses[0] * NAN
    with pytest.raises(ValueError, match="task 0"):
        opt.backward(losses)


# -- zero rows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in available() if not needs_validation(n)])
def test_zero_rows_never_divide_by_zero(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    J = torch.randn(T, 7, generator=g)
    losses = torch.tensor([0.5, 1.0, 2.0])
    for case in (J.index_fill(0, torch.tensor([1]), 0.0), torch.zeros(T, 7),
                 J.index_fill(0, torch.tensor([0, 2]), 0.0)):
        agg = aggregator(name)
        for _ in range(5):  # past the tensioner's window: its ratios see zero norms too
            d = agg(case, losses)
            assert bool(torch.isfinite(d).all()), f"{name} gives a non-finite direction on {case}"


@pytest.mark.parametrize("name", ["mgda", "central+tension", "nashmtl", "imtlg", "gradnorm", "pcgrad"])
def test_task_without_path_to_shared_parameters_trains(name: str) -> None:
    model, opt = build(name)
    for step in range(4):
        opt.zero_grad()
        x, ys = data(step)
        outs = model(x)
        losses_t = [nn.functional.mse_loss(outs[0], ys[0]), nn.functional.mse_loss(outs[1], ys[1]),
                    (model.heads[2].bias ** 2).sum() + 1.0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.backward(losses_t)
        opt.step()
    assert bool(torch.isfinite(flat(model)).all())


# -- hostile input (hypothesis) ----------------------------------------------------------------
LOSS_KINDS = ["fewer", "more", "non_scalar", "not_tensor", "detached", "int_dtype", "nonfinite",
              "matrix", "empty"]


def corrupt(kind: str, losses: list[torch.Tensor], t: int, k: int, shape: list[int], value: float,
            junk) -> tuple[object, type | tuple[type, ...], str]:
    """(bad input, expected exception type(s), regex the message must match)."""
    L = list(losses)
    if kind == "fewer":
        return L[: T - k] if k < T else L[:1], ValueError, rf"expected {T} task losses"
    if kind == "more":
        return L + [L[0]] * k, ValueError, rf"expected {T} task losses .*got {T + k}"
    if kind == "non_scalar":
        L[t] = L[t] * torch.ones(shape)
        return L, ValueError, rf"task {t} is not a scalar"
    if kind == "not_tensor":
        L[t] = junk
        return L, TypeError, rf"loss of task {t} is a "
    if kind == "detached":
        L[t] = L[t].detach()
        return L, ValueError, rf"task {t} does not require grad"
    if kind == "int_dtype":
        L[t] = torch.tensor(k)
        return L, (TypeError, ValueError), rf"task {t} "
    if kind == "nonfinite":
        L[t] = L[t] * value
        return L, FloatingPointError, rf"loss of task {t} is not finite"
    if kind == "matrix":
        return torch.stack(L).reshape(1, T).expand(k, T), ValueError, r"1-D"
    if kind == "empty":
        return [], ValueError, r"empty"
    if kind == "complex":
        L[t] = L[t] * (1 + 1j)
        return L, TypeError, rf"task {t} has dtype torch.complex"
    if kind == "device":
        L[t] = torch.zeros((), device="meta", requires_grad=True)
        return L, ValueError, rf"task {t}: meta"
    raise AssertionError(kind)


JUNK = st.sampled_from([None, 1.0, 3, "loss", [0.5], b"x", object()])
loss_cases = {"t": st.integers(0, T - 1), "k": st.integers(1, 3),
              "shape": st.lists(st.integers(2, 3), min_size=1, max_size=3),
              "value": st.sampled_from([NAN, float("inf"), -float("inf")]), "junk": JUNK}


def drive_backward(kind: str, t: int, k: int, shape: list[int], value: float, junk, legacy: bool) -> None:
    model, opt = build("central+tension", num_tasks=T)
    for step in range(2):  # some optimizer and tensioner state to protect
        opt.zero_grad()
        opt.backward(losses_of(model, step))
        opt.step()
    opt.zero_grad()
    snap = snapshot(model, opt)
    bad, exc, msg = corrupt(kind, losses_of(model, 2), t, k, shape, value, junk)
    with pytest.raises(exc, match=msg):
        if legacy and isinstance(bad, list) and len(bad) == T and kind != "not_tensor":
            for i, loss in enumerate(bad):
                with opt.task(i, loss=loss):
                    loss.backward(retain_graph=True)
            opt.step()
        else:
            opt.backward(bad)
    assert_untouched(model, opt, snap)
    if legacy:  # the blocks before the bad one accumulated into .grad, as backward() does;
        opt.zero_grad()  # zero_grad drops the unfinished capture
    assert all(p.grad is None for p in model.encoder.parameters())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(LOSS_KINDS), legacy=st.booleans(), **loss_cases)
def test_hostile_losses_are_clear_errors_and_change_nothing(kind, legacy, t, k, shape, value, junk) -> None:
    drive_backward(kind, t, k, shape, value, junk, legacy)


@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(["complex", "device", "int_dtype"]), **loss_cases)
def test_hostile_loss_dtypes_and_devices(kind, t, k, shape, value, junk) -> None:
    drive_backward(kind, t, k, shape, value, junk, legacy=False)


SHARED_KINDS = ["duplicate", "not_held", "empty_list", "empty_module", "not_tensor", "frozen",
                "other_device", "scalar_type", "bad_option"]


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(SHARED_KINDS), i=st.integers(0, 3),
       option=st.sampled_from([("num_tasks", 0), ("num_tasks", -2), ("num_tasks", 2.5),
                               ("nonfinite", "ignore"), ("aggregator", "no-such-method"),
                               ("aggregator", 3), ("capture", "magic"), ("chunk_size", 0)]))
def test_hostile_shared_parameters_and_options(kind, i, option) -> None:
    torch.manual_seed(0)
    model = Net()
    before = flat(model).clone()
    enc = list(model.encoder.named_parameters())
    params = [p for _, p in enc]
    full = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {}
    if kind == "duplicate":
        shared, exc, msg = params + [params[i]], ValueError, rf"given twice .*positions {i} and 4"
    elif kind == "not_held":
        full = torch.optim.SGD([p for q, p in enumerate(model.parameters()) if q != i], lr=0.1)
        shared, exc, msg = model.encoder, ValueError, rf"{enc[i][0]!r} is not held by the wrapped optimizer"
    elif kind == "empty_list":
        shared, exc, msg = [], ValueError, r"no shared parameters"
    elif kind == "empty_module":
        shared, exc, msg = nn.Sequential(nn.Tanh()), ValueError, r"no shared parameters"
    elif kind == "not_tensor":
        shared = list(params)
        shared[i] = "weight"
        exc, msg = TypeError, rf"shared parameter {i} is a str"
    elif kind == "frozen":  # frozen but not held: the frozen parameter is simply not in J
        params[i].requires_grad_(False)
        full = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        opt = MultiTaskOptimizer(full, shared=model.encoder)
        assert enc[i][0] not in opt.layout.names and len(opt.layout.names) == len(enc) - 1
        return
    elif kind == "other_device":
        shared = list(params)
        shared[i] = nn.Parameter(torch.zeros(2, device="meta"))
        full = torch.optim.SGD([*model.parameters(), shared[i]], lr=0.1)
        exc, msg = ValueError, r"several devices"
    elif kind == "scalar_type":
        shared, exc, msg = 3, TypeError, r"shared must be an nn.Module or an iterable"
    else:
        key, val = option
        shared = model.encoder
        kw = {key: val}
        exc = TypeError if (key == "aggregator" and not isinstance(val, str)) else ValueError
        msg = {"num_tasks": "num_tasks", "nonfinite": "nonfinite", "aggregator": "aggregator",
               "capture": "capture", "chunk_size": "chunk_size"}[key]
    with pytest.raises(exc, match=msg):
        MultiTaskOptimizer(full, shared=shared, **kw)
    for p in model.parameters():
        p.requires_grad_(True)
    assert torch.equal(before, flat(model))
    assert all(p.grad is None for p in model.parameters())


@settings(max_examples=20, deadline=None)
@given(index=st.one_of(st.integers(-5, -1), st.integers(T, T + 5), st.sampled_from([1.0, "0", None])))
def test_hostile_task_index(index) -> None:
    model, opt = build("mgda", num_tasks=T)
    before = flat(model).clone()
    with pytest.raises(ValueError, match=r"task index must be an integer in \[0, 3\)"), \
            opt.task(index):  # type: ignore[arg-type]
        pass
    assert torch.equal(before, flat(model))


# -- long run ----------------------------------------------------------------------------------
def _live_tensors() -> tuple[int, int]:
    """Number of live tensors the garbage collector sees, and their distinct storage bytes."""
    gc.collect()
    count, seen, nbytes = 0, set(), 0
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor):
                continue
            count += 1
            if obj.device.type == "meta":
                continue
            st_ = obj.untyped_storage()
            if st_.data_ptr() not in seen:
                seen.add(st_.data_ptr())
                nbytes += st_.nbytes()
        except Exception:  # noqa: BLE001, S112  (objects that vanish or refuse inspection)
            continue
    return count, nbytes


# 1,000 steps in the default run; the 10,000-step run: TORCH_MTLGRAD_LONG_STEPS=10000
# (its numbers are in docs/robustness.md).
LONG_STEPS = int(os.environ.get("TORCH_MTLGRAD_LONG_STEPS", "1000"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mgda+tension", "pcgrad"])
def test_long_run_has_no_growth(name: str) -> None:
    steps = LONG_STEPS
    torch.manual_seed(0)
    enc, heads = nn.Linear(2, 4), nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])
    opt = MultiTaskOptimizer(torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.01),
                             shared=enc, aggregator=get(name, seed=1) if name == "pcgrad" else get(name),
                             diagnostics=False)
    x = torch.randn(8, 2)
    ys = [torch.randn(8, 1) for _ in range(2)]
    samples = []
    for step in range(steps):
        opt.zero_grad()
        z = enc(x)
        opt.backward([nn.functional.mse_loss(h(z), y) + 0.01 for h, y in zip(heads, ys)])
        opt.step()
        if step % (steps // 5) == steps // 5 - 1:
            samples.append(_live_tensors())
            if name.endswith("+tension"):
                hist = opt.aggregator.state_dict()["history"]
                assert hist.shape == (11, 2)  # window + 1 rows, T columns: never grows
    counts = [c for c, _ in samples]
    sizes = [b for _, b in samples]
    assert max(counts) - min(counts) <= 2, f"live tensors grew: {counts}"
    assert max(sizes) - min(sizes) <= 4096, f"tensor bytes grew: {sizes}"
    assert bool(torch.isfinite(enc.weight).all())
