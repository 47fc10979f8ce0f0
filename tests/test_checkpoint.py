"""Checkpoint and resume, and untrusted files.

* In a FRESH PROCESS: train k steps, save, load into a new process (``torch.load(...,
  weights_only=True)``: plain tensors, numbers, strings, lists and dicts only), train k more; the
  parameters equal 2k uninterrupted steps bit for bit, for every method in the registry (stateful
  ones keep histories, EMAs, generators, inner optimizers) and for the plugins (CoNAL conflict
  noticing, NORMAL's position updater, MPPS).  The global random generator is re-seeded
  differently in the two processes at the resume point, so anything that draws from it instead
  of its own checkpointed generator shows up.
* A checkpoint made with another number of tasks, other shared parameters, another aggregator or
  another set of plugins is a clear error, and nothing is loaded.
* Untrusted files: a pickled object that would run code is refused by the loading the library
  documents (``weights_only=True``) without running it; malformed optimizer states are clear
  errors; the CoNAL architecture JSON is validated before anything is built from it.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import available, get
from torch_mtlgrad.aggregators._registry import needs_validation

from ._helpers import Net, T, data

K = 7  # steps before and after the checkpoint; 2K > the tensioner's window of 10
REQUIRED_KWARGS = {"constant": {"weights": [0.2, 0.3, 0.5]}}
PLUGIN_CASES = ["plugin:conal", "plugin:normal", "plugin:mpps"]
CASES = [f"agg:{n}" for n in available()] + PLUGIN_CASES



class OdeNet(nn.Module):
    """Encoder -> NORMAL block -> one head per task."""

    def __init__(self) -> None:
        super().__init__()
        from torch_mtlgrad.normal import TimeAwareODE

        self.encoder = nn.Linear(5, 6)
        self.ode = TimeAwareODE(6, T, positions_init=[0.3, 0.9, -0.4], step_size=0.1)
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(T)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [h(f) for h, f in zip(self.heads, self.ode(self.encoder(x)))]


class Run:
    """One training setup: model, wrapped optimizer and (for MPPS) the masking module."""

    def __init__(self, case: str, init_seed: int) -> None:
        torch.manual_seed(init_seed)
        self.case, self.mpps = case, None
        kind, name = case.split(":")
        if kind == "agg":
            base = name.split("+")[0]
            self.model = Net()
            agg = get(name, **REQUIRED_KWARGS.get(base, {}))
            kw: dict[str, Any] = {}
            if needs_validation(name):  # a validation batch of its own
                xv, yv = data(1000)
                kw["validation_losses"] = lambda: [nn.functional.mse_loss(o, y) for o, y in
                                                   zip(self.model(xv), yv)]
            self.opt = MultiTaskOptimizer(torch.optim.Adam(self.model.parameters(), lr=1e-2),
                                          shared=self.model.encoder, aggregator=agg, **kw)
        elif name == "conal":
            self.model = Net()
            self.opt = MultiTaskOptimizer(
                torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9), shared=self.model.encoder,
                aggregator="sum", conflict_noticing=[self.model.encoder[0], self.model.encoder[2]])
        elif name == "normal":
            from torch_mtlgrad.normal import PositionUpdater, parameters_except_positions

            self.model = OdeNet()
            upd = PositionUpdater(self.model.ode, lr=0.2, every=2)
            shared = [*self.model.encoder.parameters(), *self.model.ode.shared_parameters()]
            self.opt = MultiTaskOptimizer(torch.optim.Adam(parameters_except_positions(self.model), lr=1e-2),
                                          shared=shared, aggregator="central+tension", plugins=[upd])
        elif name == "mpps":
            from torch_mtlgrad.mpps import MPPS

            self.model = Net()
            self.mpps = MPPS(self.model.encoder, T, scheduler=4, layers=2, seed=11)
            base = torch.optim.Adam([{"params": self.model.parameters()},
                                     {"params": self.mpps.parameters(), "lr": 5e-2}], lr=1e-2)
            self.opt = MultiTaskOptimizer(base, shared=self.model.encoder, aggregator="mgda")
        else:
            raise AssertionError(case)

    def step(self, i: int) -> None:
        x, ys = data(i)
        self.opt.zero_grad()
        if self.mpps is not None:
            model = self.model
            losses = self.mpps.losses(
                lambda t: nn.functional.mse_loss(model.heads[t](model.encoder(x)), ys[t]))
        else:
            losses = [nn.functional.mse_loss(o, y) for o, y in zip(self.model(x), ys)]
        self.opt.backward(losses)
        self.opt.step()
        if self.mpps is not None and i % 3 == 2:
            self.mpps.end_epoch()  # scheduler, target update

    def state(self) -> dict[str, Any]:
        out = {"model": self.model.state_dict(), "opt": self.opt.state_dict()}
        if self.mpps is not None:
            out["mpps"] = self.mpps.state_dict()
        return out

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.mpps is not None:
            self.mpps.load_state_dict(state["mpps"])
        self.opt.load_state_dict(state["opt"])

    def params(self) -> torch.Tensor:
        ps = [p.detach().reshape(-1) for p in self.model.parameters()]
        if self.mpps is not None:
            ps += [p.detach().reshape(-1) for p in self.mpps.parameters()]
        return torch.cat(ps)


def _phase(which: str, folder: str) -> None:
    """Run in a subprocess: ``first`` trains 2K steps (checkpoint at K), ``second`` resumes."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = Path(folder)
    for case in CASES:
        tag = case.replace(":", "_").replace("+", "_")
        try:
            run = Run(case, init_seed=0 if which == "first" else 1234)
        except ImportError as err:  # a method whose module does not import yet
            torch.save({"skip": f"{case}: {err}"}, out / f"{tag}.{which}.pt")
            continue
        if which == "first":
            for i in range(K):
                run.step(i)
            torch.save(run.state(), out / f"{tag}.ckpt")
            torch.manual_seed(111)  # the global generator after the resume point ...
            for i in range(K, 2 * K):
                run.step(i)
        else:
            run.load(torch.load(out / f"{tag}.ckpt", weights_only=True))
            torch.manual_seed(222)  # ... differs between the processes
            for i in range(K, 2 * K):
                run.step(i)
        torch.save({"params": run.params()}, out / f"{tag}.{which}.pt")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    for which in ("first", "second"):
        # Run as the module tests.test_checkpoint from the repository root (its relative imports).
        proc = subprocess.run([sys.executable, "-m", "tests.test_checkpoint", which, str(folder)],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True,
                              text=True, timeout=600, check=False)
        assert proc.returncode == 0, f"{which} process failed:\n{proc.stdout}\n{proc.stderr}"
    return folder


@pytest.mark.parametrize("case", CASES)
def test_resume_in_fresh_process_is_bit_exact(resumed: Path, case: str) -> None:
    tag = case.replace(":", "_").replace("+", "_")
    a = torch.load(resumed / f"{tag}.first.pt", weights_only=True)
    if "skip" in a:
        pytest.skip(a["skip"])
    b = torch.load(resumed / f"{tag}.second.pt", weights_only=True)
    assert torch.equal(a["params"], b["params"]), f"{case}: resumed run differs from the uninterrupted one"


def test_resume_starts_from_a_different_initialisation() -> None:
    """The fresh process builds its model from another seed: equality above comes from loading."""
    torch.manual_seed(0)
    a = torch.cat([p.reshape(-1) for p in Net().parameters()])
    torch.manual_seed(1234)
    b = torch.cat([p.reshape(-1) for p in Net().parameters()])
    assert not torch.equal(a, b)


# -- mismatched checkpoints ---------------------------------------------------------------------
def trained(name: str = "central+tension", steps: int = 12) -> Run:
    run = Run(f"agg:{name}", 0)
    for i in range(steps):
        run.step(i)
    return run


def test_checkpoint_with_other_tasks_or_shared_parameters_is_a_clear_error() -> None:
    run = trained()
    sd = run.opt.state_dict()
    torch.manual_seed(0)
    model2 = Net()
    # another number of tasks
    opt2 = MultiTaskOptimizer(torch.optim.Adam(model2.parameters()), shared=model2.encoder,
                              aggregator="central+tension", num_tasks=2)
    with pytest.raises(ValueError, match="made with 3 tasks, this optimizer has 2"):
        opt2.load_state_dict(sd)
    # the same model with fewer shared parameters (a layer moved to the heads)
    opt3 = MultiTaskOptimizer(torch.optim.Adam(model2.parameters()), shared=model2.encoder[2],
                              aggregator="central+tension")
    with pytest.raises(ValueError, match="different shared parameters"):
        opt3.load_state_dict(sd)
    # a wider encoder
    wide = nn.Sequential(nn.Linear(5, 9), nn.Tanh())
    opt4 = MultiTaskOptimizer(torch.optim.Adam(wide.parameters()), shared=wide, aggregator="central+tension")
    with pytest.raises(ValueError, match="different shared parameters"):
        opt4.load_state_dict(sd)
    # another aggregator, another set of plugins
    opt5 = MultiTaskOptimizer(torch.optim.Adam(model2.parameters()), shared=model2.encoder, aggregator="mgda")
    with pytest.raises(ValueError, match="aggregator is Tensioned"):
        opt5.load_state_dict(sd)
    opt6 = MultiTaskOptimizer(torch.optim.Adam(model2.parameters()), shared=model2.encoder,
                              aggregator="central+tension", conflict_noticing=[model2.encoder[0]])
    with pytest.raises(ValueError, match="0 plugins, this optimizer has 1"):
        opt6.load_state_dict(sd)
    for opt in (opt2, opt3, opt4, opt5, opt6):  # nothing was loaded
        assert opt.state_dict()["state"] == {}
        assert opt.aggregator.state_dict().get("count", 0) == 0


def test_tasks_learnt_from_checkpoint_then_enforced() -> None:
    run = trained()
    torch.manual_seed(0)
    model2 = Net()
    opt2 = MultiTaskOptimizer(torch.optim.Adam(model2.parameters()), shared=model2.encoder,
                              aggregator="central+tension")  # T unknown until the checkpoint
    opt2.load_state_dict(run.opt.state_dict())
    assert opt2.num_tasks == T
    x, ys = data(0)
    losses = [nn.functional.mse_loss(o, y) for o, y in zip(model2(x), ys)]
    with pytest.raises(ValueError, match="expected 3 task losses"):
        opt2.backward(losses[:2])


MALFORMED = {
    "mtlgrad_not_a_dict": lambda sd: sd.__setitem__("mtlgrad", [1, 2]),
    "missing_key": lambda sd: sd["mtlgrad"].pop("shared_shapes"),
    "num_tasks_str": lambda sd: sd["mtlgrad"].__setitem__("num_tasks", "3"),
    "shapes_str": lambda sd: sd["mtlgrad"].__setitem__("shared_shapes", "abc"),
    "aggregator_list": lambda sd: sd["mtlgrad"].__setitem__("aggregator", [1]),
    "plugins_int": lambda sd: sd["mtlgrad"].__setitem__("plugins", 7),
    "skipped_str": lambda sd: sd["mtlgrad"].__setitem__("skipped_steps", "many"),
    "history_str": lambda sd: sd["mtlgrad"]["aggregator"].__setitem__("history", "x"),
    "no_param_groups": lambda sd: sd.pop("param_groups"),
    "names_int": lambda sd: sd["mtlgrad"].__setitem__("shared_names", 5),
    "names_short": lambda sd: sd["mtlgrad"]["shared_names"].pop(),
    "names_other": lambda sd: sd["mtlgrad"]["shared_names"].reverse(),
}


def test_shared_parameter_names_are_checked_when_both_sides_have_them() -> None:
    """Same shapes under other names (another module, or another order) are refused; positional
    names (``shared=`` an iterable) and checkpoints from before the names load as before."""

    class AB(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def opt_for(shared, params):
        return MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), shared=shared, aggregator="mean")

    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ab = AB()
    sd = opt_for(seq, seq.parameters()).state_dict()
    assert sd["mtlgrad"]["shared_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(ValueError, match=r"shared parameter 0 is '0.weight', this optimizer's is "
                                         r"'a.weight'"):
        opt_for(ab, ab.parameters()).load_state_dict(copy.deepcopy(sd))
    opt_for(list(ab.parameters()), ab.parameters()).load_state_dict(copy.deepcopy(sd))  # positional
    old = copy.deepcopy(sd)
    del old["mtlgrad"]["shared_names"]
    opt_for(ab, ab.parameters()).load_state_dict(old)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_optimizer_state_is_a_clear_error_and_loads_nothing(kind: str) -> None:
    source = trained(steps=12)
    bad = copy.deepcopy(source.opt.state_dict())
    MALFORMED[kind](bad)
    run = trained(steps=11)
    before = copy.deepcopy(run.opt.state_dict())
    with pytest.raises((ValueError, TypeError)):
        run.opt.load_state_dict(bad)
    after = run.opt.state_dict()
    assert str(before["param_groups"]) == str(after["param_groups"])
    for k, v in before["state"].items():
        assert all(torch.equal(v[n], after["state"][k][n]) for n in v)
    assert torch.equal(before["mtlgrad"]["aggregator"]["history"], after["mtlgrad"]["aggregator"]["history"])
    assert before["mtlgrad"]["aggregator"]["count"] == after["mtlgrad"]["aggregator"]["count"]


# -- untrusted files ---------------------------------------------------------------------------
class _Payload:
    """What a hostile checkpoint would smuggle in: code run on unpickling."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_every_saved_state_is_plain_data_and_code_is_refused(tmp_path: Path) -> None:
    run = trained("pcgrad+tension")
    buf = io.BytesIO()
    torch.save(run.state(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # plain tensors, numbers, strings, lists, dicts
    assert loaded["opt"]["mtlgrad"]["aggregator_type"] == "Tensioned"
    marker = tmp_path / "pwned"
    hostile = copy.deepcopy(run.opt.state_dict())
    hostile["mtlgrad"]["aggregator"]["payload"] = _Payload(str(marker))
    path = tmp_path / "hostile.pt"
    torch.save(hostile, path)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        torch.load(path, weights_only=True)
    assert not marker.exists(), "the payload ran"


GOOD_ARCH = {"format": "torch_mtlgrad.conal.architecture/1", "num_tasks": 3, "num_modules": 2,
             "branches": [{"tasks": [0, 2], "branch_point": 3}, {"tasks": [1], "branch_point": 2}]}


def _doc(**changes: Any) -> str:
    d = copy.deepcopy(GOOD_ARCH)
    d.update(changes)
    return json.dumps(d)


# Crafted architecture files; the "strict" ones need the schema check of
# conal/derive.py's Architecture.from_dict (exact JSON types, bounds, no extra keys).
CRAFTED = {
    "not_json": ("{not json", False),
    "duplicate_task": (_doc(branches=[{"tasks": [0, 0, 1, 2], "branch_point": 3}]), False),
    "negative_modules": (_doc(num_modules=-1), False),
    "branch_point_outside": (_doc(branches=[{"tasks": [0, 1, 2], "branch_point": 10**30}]), False),
    "branches_not_list": (_doc(branches={"a": 1}), False),
    "wrong_format": (_doc(format="evil/1"), False),
    "top_level_list": ("[1, 2]", True),
    "top_level_null": ("null", True),
    "num_tasks_string": (_doc(num_tasks="3"), True),
    "num_tasks_float": (_doc(num_tasks=3.7), True),
    "num_tasks_huge": (_doc(num_tasks=10**12), True),
    "num_modules_huge": (_doc(num_modules=10**9), True),
    "tasks_string": (_doc(branches=[{"tasks": "012", "branch_point": 3}]), True),
    "tasks_bool": (_doc(branches=[{"tasks": [False, True, 2], "branch_point": 3}]), True),
    "branch_point_float": (_doc(branches=[{"tasks": [0, 1, 2], "branch_point": 2.9}]), True),
    "branch_point_infinity": (_doc().replace('"branch_point": 3', '"branch_point": Infinity'), True),
    "unknown_key": (_doc(code="__import__('os').system('x')"), True),
    "deep_nesting": ("[" * 100_000 + "]" * 100_000, True),
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_architecture_json_is_a_clear_error(request, kind: str) -> None:
    from torch_mtlgrad.conal import Architecture

    text, _strict = CRAFTED[kind]
    with pytest.raises(ValueError):
        Architecture.from_json(text)


if __name__ == "__main__":  # the subprocess of `resumed`
    _phase(sys.argv[1], sys.argv[2])
