"""capture="timed" off the GPU: the timed choice between the loop and the batched pass (and
"auto", the default, which never times)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.capture.tuner import CaptureTuner

from .test_capture import NoVmap


# -- the tuner alone ----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(warmup=st.integers(0, 3), trials=st.integers(1, 4),
       loop=st.lists(st.floats(1e-4, 10.0), min_size=7, max_size=7),
       batched=st.lists(st.floats(1e-4, 10.0), min_size=7, max_size=7),
       features=st.booleans())
def test_tuner_alternates_then_keeps_the_faster(warmup, trials, loop, batched, features) -> None:
    tuner = CaptureTuner(warmup=warmup, trials=trials, margin=0.9)
    key = tuner.key(5, features)
    cand = "feature" if features else "batched"
    seen, timed_seen = [], {"loop": [], cand: []}
    times = {"loop": iter(loop), cand: iter(batched)}
    for _ in range(2 * (warmup + trials)):
        assert tuner.choices == {}
        mode, timed = tuner.mode(key)
        assert tuner.mode(key) == (mode, timed)  # asking changes nothing
        sec = next(times[mode])
        seen.append(mode)
        if timed:
            timed_seen[mode].append(sec)
        tuner.record(key, mode, sec, timed)
    assert seen == ["loop", cand] * (warmup + trials)
    assert len(timed_seen["loop"]) == len(timed_seen[cand]) == trials
    want = cand if min(timed_seen[cand]) < 0.9 * min(timed_seen["loop"]) else "loop"
    assert tuner.choices == {key: want}
    assert tuner.mode(key) == (want, False)
    tuner.record(key, want, 123.0, False)  # after the choice, nothing changes
    assert tuner.choices == {key: want}


def test_tuner_ties_go_to_the_loop_and_settings_are_separate() -> None:
    tuner = CaptureTuner(warmup=0, trials=1)
    a, b = tuner.key(3, False), tuner.key(10, True)
    tuner.record(a, "loop", 1.0, True)
    tuner.record(a, "batched", 0.95, True)  # 5% faster: below the 10% margin
    assert tuner.choices == {a: "loop"}
    assert tuner.mode(b) == ("loop", True)  # another T / candidate starts its own trials
    tuner.decide(b, "loop")
    assert tuner.choices == {a: "loop", b: "loop"}


def test_tuner_state_round_trip_and_malformed_states() -> None:
    tuner = CaptureTuner(warmup=0, trials=2)
    key = tuner.key(4, False)
    tuner.record(key, "loop", 0.5, True)
    tuner.record(key, "batched", 0.2, True)
    other = CaptureTuner(warmup=0, trials=2)
    other.load_state_dict(copy.deepcopy(tuner.state_dict()))
    assert other.state_dict() == tuner.state_dict()
    for t in (tuner, other):  # both go on with the same trial sequence and decide alike
        t.record(key, *t.mode(key)[:1], 0.4, True)
        t.record(key, *t.mode(key)[:1], 0.3, True)
    assert tuner.choices == other.choices == {key: "batched"}
    good = tuner.state_dict()
    bad_states = [
        ([1, 2], TypeError, "must be a dict"),
        ({"nocomma": good[key]}, ValueError, "malformed"),
        ({key: {**good[key], "step": -1}}, ValueError, "step must be an int"),
        ({key: {**good[key], "times": {"loop": [0.1]}}}, ValueError, "times must map"),
        ({key: {**good[key], "choice": "feature"}}, ValueError, "choice must be one of"),
    ]
    for state, exc, msg in bad_states:
        with pytest.raises(exc, match=msg):
            other.load_state_dict(state)
        assert other.state_dict() == good  # unchanged


def test_tuner_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="warmup"):
        CaptureTuner(warmup=-1)
    with pytest.raises(ValueError, match="trials"):
        CaptureTuner(trials=0)
    with pytest.raises(ValueError, match="margin"):
        CaptureTuner(margin=1.5)


# -- inside the optimizer -----------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(tasks)])


def run(model: Net, opt: MultiTaskOptimizer, steps: int, features: bool = False,
        start: int = 0) -> list[str]:
    used = []
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(16, 5, generator=g)
        opt.zero_grad()
        z = model.encoder(x)
        losses = [h(z).sub(t).pow(2).mean() for t, h in enumerate(model.heads)]
        opt.backward(losses, features=z) if features else opt.backward(losses)
        opt.step()
        used.append(opt.last_capture)
    return used


def make(**kw) -> tuple[Net, MultiTaskOptimizer]:
    torch.manual_seed(0)
    kw.setdefault("capture", "timed")
    model = Net(kw.pop("tasks", 3))
    return model, MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), shared=model.encoder,
                                     aggregator="mgda", **kw)


@pytest.mark.parametrize("features", [False, True])
def test_auto_times_both_then_keeps_the_faster(features: bool) -> None:
    model, opt = make()
    cand = "feature" if features else "batched"
    used = run(model, opt, 9, features)
    assert used[:6] == ["loop", cand] * 3
    key = f"T=3,{cand}"
    state = opt.state_dict()["mtlgrad"]["capture_tuning"][key]
    want = cand if min(state["times"][cand]) < 0.9 * min(state["times"]["loop"]) else "loop"
    assert opt.capture_choices == {key: want}
    assert used[6:] == [want] * 3
    # Exact either way: the same parameters as the loop, to float rounding.
    ref_model, ref = make(capture="loop")
    run(ref_model, ref, 9, features)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_resume_goes_on_with_the_same_choice_and_trials() -> None:
    model, opt = make()
    run(model, opt, 3)  # mid-trial: loop, batched, loop
    sd = copy.deepcopy(opt.state_dict())
    model3, opt3 = make()
    model3.load_state_dict(model.state_dict())
    opt3.load_state_dict(sd)
    # The trials go on where they stopped (the times measured before the checkpoint count).
    assert run(model3, opt3, 3, start=3) == ["batched", "loop", "batched"]
    assert list(opt3.capture_choices) == ["T=3,batched"]
    # After the choice, a fresh optimizer loading the checkpoint uses it from its first step.
    done = opt3.state_dict()
    model4, opt4 = make()
    opt4.load_state_dict(done)
    assert opt4.capture_choices == opt3.capture_choices
    assert run(model4, opt4, 1) == list(opt3.capture_choices.values())


def test_checkpoints_without_tuning_state_load_and_bad_ones_change_nothing() -> None:
    model, opt = make()
    run(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(sd)
    del old["mtlgrad"]["capture_tuning"]  # a checkpoint from before the tuner
    _, fresh = make()
    fresh.load_state_dict(old)
    bad = copy.deepcopy(sd)
    bad["mtlgrad"]["capture_tuning"] = {"T=3,batched": {"step": "x", "times": {}, "choice": None}}
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="step must be an int"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["mtlgrad"]["capture_tuning"] == before["mtlgrad"]["capture_tuning"]
    assert after["state"].keys() == before["state"].keys()


def test_one_task_and_explicit_modes_are_not_timed() -> None:
    model, opt = make(tasks=1)
    assert run(model, opt, 3) == ["loop"] * 3 and opt.capture_choices == {}
    model, opt = make(capture="batched")
    assert run(model, opt, 3) == ["batched"] * 3 and opt.capture_choices == {}


def test_auto_decides_for_the_loop_when_the_batched_pass_cannot_run() -> None:
    torch.manual_seed(0)
    enc = nn.Linear(4, 6)
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])
    opt = MultiTaskOptimizer(torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1),
                             shared=enc, aggregator="mgda", capture="timed")
    x = torch.randn(5, 4)
    used = []
    for i in range(5):
        opt.zero_grad()
        z = NoVmap.apply(enc(x))
        losses = [h(z).pow(2).mean() for h in heads]
        if i == 1:  # the first batched trial
            with pytest.warns(RuntimeWarning, match="falling back to the per-task loop"):
                opt.backward(losses)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                opt.backward(losses)
        used.append(opt.last_capture)
        opt.step()
    assert used == ["loop"] * 5
    assert opt.capture_choices == {"T=3,batched": "loop"}


@pytest.mark.parametrize("features", [False, True])
def test_auto_is_a_fixed_rule_and_two_runs_give_the_same_bits(features: bool) -> None:
    """The default never times: the loop on the CPU, every step, and two runs agree bit for bit."""
    runs = []
    for _ in range(2):
        model, opt = make(capture="auto")
        assert run(model, opt, 8, features) == ["loop"] * 8
        assert opt.capture_choices == {}
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
