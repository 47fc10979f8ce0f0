"""The diagnostics logger: names, every-N, TensorBoard event files read back, callables, absent
tasks, skipped steps, no diagnostics cost on the steps it does not log; and the history plot."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests._helpers import Net, T, data
from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.logging import DiagnosticsLogger, History, flatten_diagnostics

NAMES = ["depth", "seg", "normal"]


def _opt(aggregator: str = "mgda", **kw) -> tuple[Net, MultiTaskOptimizer]:
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), shared=net.encoder,
                             aggregator=aggregator, **kw)
    return net, opt


def _train(net, opt, log, steps: int, present=None) -> list:
    out = []
    for i in range(steps):
        x, ys = data(i)
        opt.zero_grad()
        losses = [torch.nn.functional.mse_loss(p, y) for p, y in zip(net(x), ys)]
        if present is not None:
            losses = [loss if keep else None for loss, keep in zip(losses, present)]
        opt.backward(losses)
        opt.step()
        out.append(log.step())
    return out


def test_names_every_n_and_values_match_the_optimizer():
    net, opt = _opt()
    hist = History()
    log = DiagnosticsLogger(opt, hist, every=3, task_names=NAMES)
    logged = _train(net, opt, log, 7)
    assert hist.steps == [0, 3, 6]
    assert [r is not None for r in logged] == [i % 3 == 0 for i in range(7)]
    rec = hist.records[-1]
    d = opt.diagnostics
    for t, name in enumerate(NAMES):
        assert rec[f"mtl/weights/{name}"] == pytest.approx(float(d["weights"][t]), rel=1e-6)
        assert rec[f"mtl/grad_norms/{name}"] == pytest.approx(float(d["grad_norms"][t]), rel=1e-6)
        assert rec[f"mtl/angle/{name}"] == pytest.approx(float(d["angle"][t]), rel=1e-6)
    # cosine: the upper triangle only, named by the pair
    pairs = [k for k in rec if k.startswith("mtl/cosine/")]
    assert sorted(pairs) == sorted(["mtl/cosine/depth-seg", "mtl/cosine/depth-normal",
                                    "mtl/cosine/seg-normal"])
    assert rec["mtl/cosine/seg-normal"] == pytest.approx(float(d["cosine"][1, 2]), rel=1e-6)
    # param_grad_norms: one column per shared parameter, named as in the layout
    names = opt.layout.names
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for p, pname in enumerate(names):
        assert rec[f"mtl/param_grad_norms/seg/{pname}"] == pytest.approx(
            float(d["param_grad_norms"][1, p]), rel=1e-6)
    assert rec["mtl/direction_norm"] == pytest.approx(float(d["direction_norm"]), rel=1e-6)


def test_no_diagnostics_on_the_steps_not_logged_and_setting_restored():
    net, opt = _opt(diagnostics="full")
    seen = []
    log = DiagnosticsLogger(opt, lambda s, i: seen.append(i), every=2)
    assert opt.compute_diagnostics == "full"  # step 0 is logged: the user's level
    for i in range(4):
        x, ys = data(i)
        opt.zero_grad()
        opt.backward([torch.nn.functional.mse_loss(p, y) for p, y in zip(net(x), ys)])
        before = opt.diagnostics
        opt.step()
        if i % 2 == 1:  # not logged: nothing was computed, the dict is the previous step's
            assert opt.diagnostics is before
        log.step()
        assert opt.compute_diagnostics == ("full" if (i + 1) % 2 == 0 else False)
    assert seen == [0, 2]
    log.close()
    assert opt.compute_diagnostics == "full"
    with DiagnosticsLogger(opt, History(), every=5, control=False):
        assert opt.compute_diagnostics == "full"  # control=False leaves it alone


def test_tensorboard_event_files_read_back(tmp_path):
    tb = pytest.importorskip("torch.utils.tensorboard", reason="needs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net, opt = _opt("central+tension")
    writer = tb.SummaryWriter(log_dir=str(tmp_path))
    log = DiagnosticsLogger(opt, writer, every=2, task_names=NAMES, prefix="train")
    logged = [r for r in _train(net, opt, log, 5) if r is not None]
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(logged[-1]) <= tags
    assert "train/weights/depth" in tags and "train/cosine/depth-seg" in tags
    events = acc.Scalars("train/weights/seg")
    assert [e.step for e in events] == [0, 2, 4]
    for e, rec in zip(events, logged):
        assert e.value == pytest.approx(rec["train/weights/seg"], rel=1e-6)


def test_absent_tasks_left_out_and_skipped_steps_not_logged():
    net, opt = _opt("mean", diagnostics="full", nonfinite="skip")
    hist = History()
    log = DiagnosticsLogger(opt, hist, task_names=NAMES)
    _train(net, opt, log, 2, present=[True, False, True])
    rec = hist.records[-1]
    assert "mtl/grad_norms/seg" not in rec and "mtl/grad_norms/depth" in rec
    assert rec["mtl/weights/seg"] == 0.0  # the weight of an absent task is 0, not NaN
    assert not any(math.isnan(v) for v in rec.values())
    # a skipped step (NaN loss) is not logged
    x, ys = data(9)
    opt.zero_grad()
    losses = [torch.nn.functional.mse_loss(p, y) for p, y in zip(net(x), ys)]
    opt.backward([losses[0] * float("nan"), losses[1], losses[2]])
    opt.step()
    assert opt.skipped_steps == 1
    assert log.step() is None and len(hist.steps) == 2


def test_loss_only_method_logs_weights_and_losses():
    net, opt = _opt("dwa")
    hist = History()
    log = DiagnosticsLogger(opt, hist)
    _train(net, opt, log, 3)
    keys = {k.split("/")[1] for k in hist.records[-1]}
    assert {"weights", "losses"} <= keys and "grad_norms" not in keys
    assert hist.records[-1]["mtl/weights/task0"] == pytest.approx(float(opt.diagnostics["weights"][0]))


def test_bad_arguments_are_named():
    _, opt = _opt()
    with pytest.raises(TypeError, match="add_scalar"):
        DiagnosticsLogger(opt, 42)
    with pytest.raises(ValueError, match="every"):
        DiagnosticsLogger(opt, History(), every=0)
    with pytest.raises(ValueError, match="level"):
        DiagnosticsLogger(opt, History(), level="some")
    with pytest.raises(ValueError, match="distinct"):
        DiagnosticsLogger(opt, History(), task_names=["a", "a", "b"])
    with pytest.raises(TypeError, match="MultiTaskOptimizer"):
        DiagnosticsLogger(object(), History())
    net, opt = _opt()
    log = DiagnosticsLogger(opt, History(), task_names=["a", "b"])
    with pytest.raises(ValueError, match="one name per task"):
        _train(net, opt, log, 1)


def test_flatten_other_shapes_and_slash_in_names():
    d = {"scale": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "k": torch.tensor([5.0, 6.0, 7.0]),
         "flag": torch.tensor([True, False])}
    out = flatten_diagnostics(d, task_names=["a/b", "c"], prefix="")
    assert out == {"scale/a_b/c": 2.0, "scale/a_b/a_b": 1.0, "scale/c/a_b": 3.0,
                   "scale/c/c": 4.0, "k/0": 5.0, "k/1": 6.0, "k/2": 7.0}


def test_history_csv_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="needs matplotlib")
    from torch_mtlgrad.plots import plot_history

    net, opt = _opt("mgda")
    hist = History()
    _train(net, opt, DiagnosticsLogger(opt, hist, task_names=NAMES), 4)
    csv_path = tmp_path / "h.csv"
    hist.to_csv(str(csv_path))
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 5
    png = plot_history(hist, str(tmp_path / "fig.png"), title="mgda")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty"):
        plot_history(History(), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="unknown panels"):
        plot_history(hist, str(tmp_path / "x.png"), panels=("weights", "loss"))
    with pytest.raises(ValueError, match="does not exist"):
        plot_history(hist, os.path.join(str(tmp_path), "no", "x.png"))
    assert T == 3
