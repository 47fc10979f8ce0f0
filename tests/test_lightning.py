"""PyTorch Lightning: ``torch_mtlgrad.lightning`` in a ``LightningModule`` with manual optimisation.

* Every task's backward goes through Lightning's ``manual_backward`` (its ``on_before_backward`` /
  ``on_after_backward`` hooks run once per task and step), and a ``Trainer`` run takes the same
  steps as an independent plain-PyTorch loop with ``opt.backward(losses)`` (32-true; bf16-mixed
  with the reference under the same CPU autocast; absent tasks drawn by the shared
  ``presence_patterns`` sampler from hypothesis seeds, for several methods).
* ``"16-mixed"``: the GradScaler of the precision plugin is the optimizer's; on the CPU (the plugin
  given explicitly, Lightning maps ``precision="16-mixed"`` on a CPU to bf16) the run matches a
  plain loop with the same scaler, and an overflow makes Lightning's ``scaler.step`` skip the
  step and lower the scale; on CUDA with ``precision="16-mixed"`` (skipped without a GPU).
* Checkpoints: ``ModelCheckpoint`` saves the ``"mtlgrad"`` state; ``fit(ckpt_path=...)`` resumes
  bit for bit (a stateful aggregator, the tensioners' window).
* Bad use is an error before anything runs.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import get

from ._helpers import Net, T, data
from .strategies import presence_patterns

pl = pytest.importorskip("lightning.pytorch", reason="needs lightning (pip install lightning)")
mtl = pytest.importorskip("torch_mtlgrad.lightning")
MixedPrecision = pl.plugins.precision.MixedPrecision

STEPS = 4


def batches(steps: int = STEPS, device: str = "cpu") -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    return [data(s, device) for s in range(steps)]


class Module(pl.LightningModule):
    """``tests._helpers.Net`` trained with ``torch_mtlgrad.lightning``; counts Lightning's
    backward hooks."""

    def __init__(self, aggregator: str = "upgrad", present: list[torch.Tensor] | None = None,
                 bad_step: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.net = Net()
        self.aggregator, self.present, self.bad_step = aggregator, present, bad_step
        self.backward_hooks = 0
        self.after_backward_hooks = 0

    def configure_optimizers(self):
        base = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
        # a window of 2 steps: the tensioners' state matters from the third step
        agg = get(self.aggregator, window=2) if "tension" in self.aggregator else self.aggregator
        return mtl.multitask_optimizer(self, base, shared=self.net.encoder, num_tasks=T,
                                       aggregator=agg)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.backward_hooks += 1

    def on_after_backward(self) -> None:
        self.after_backward_hooks += 1

    def training_step(self, batch, batch_idx):
        x, ys = batch
        opt = self.optimizers()
        opt.zero_grad()
        losses: list[torch.Tensor | None] = [
            nn.functional.mse_loss(o.float(), y) for o, y in zip(self.net(x), ys)]
        if batch_idx == self.bad_step:
            losses[0] = losses[0] * float("inf")
        if self.present is not None:
            losses = [loss if p else None for loss, p in zip(losses, self.present[batch_idx])]
        mtl.manual_backward(self, losses)
        opt.step()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(batches(), batch_size=None)  # the batches as they are


def fit(module: Module, tmp_path, ckpt_path: str | None = None, **kwargs) -> pl.Trainer:
    args = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": tmp_path, **kwargs}
    trainer = pl.Trainer(**args)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def reference(aggregator: str, *, autocast: torch.dtype | None = None,
              present: list[torch.Tensor] | None = None, scaler=None,
              bad_step: int | None = None, steps: int = STEPS) -> Net:
    """The same training as a plain loop: ``opt.backward(losses)``, no Lightning."""
    torch.manual_seed(0)
    net = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                             shared=net.encoder, aggregator=aggregator, num_tasks=T, scaler=scaler)
    for step, (x, ys) in enumerate(batches(steps)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            outs = net(x)
        losses: list[torch.Tensor | None] = [
            nn.functional.mse_loss(o.float(), y) for o, y in zip(outs, ys)]
        if step == bad_step:
            losses[0] = losses[0] * float("inf")
        if present is not None:
            losses = [loss if p else None for loss, p in zip(losses, present[step])]
        opt.backward(losses)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return net


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("aggregator", ["upgrad", "mgda", "sum"])
def test_trainer_steps_as_a_plain_loop(aggregator: str, tmp_path) -> None:
    module = Module(aggregator)
    fit(module, tmp_path)
    assert module.backward_hooks == module.after_backward_hooks == STEPS * T  # one per task
    assert max_diff(module.net, reference(aggregator)) < 1e-6


def test_bf16_mixed_on_the_cpu(tmp_path) -> None:
    module = Module("upgrad")
    trainer = fit(module, tmp_path, precision="bf16-mixed")
    assert isinstance(trainer.precision_plugin, MixedPrecision)
    assert mtl.unwrap(module.optimizers()).scaler is None  # bf16 needs no scaler
    assert module.backward_hooks == STEPS * T
    # the reference runs the forward under the same CPU autocast
    assert max_diff(module.net, reference("upgrad", autocast=torch.bfloat16)) < 1e-5
    assert max_diff(module.net, reference("upgrad")) > 1e-4  # bf16 did change the forward


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), name=st.sampled_from(["mgda", "upgrad", "imtlg", "mean"]))
def test_absent_tasks(seed: int, name: str) -> None:
    present = presence_patterns(seed, STEPS, T)
    module = Module(name, present=present)
    with tempfile.TemporaryDirectory() as tmp:
        fit(module, tmp)
    assert module.backward_hooks == int(sum(int(m.sum()) for m in present))
    assert max_diff(module.net, reference(name, present=present)) < 1e-6


def fp16_cpu_plugin() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))


@pytest.mark.parametrize("present", [False, True])
def test_16_mixed_grad_scaler_on_the_cpu(present: bool, tmp_path) -> None:
    masks = presence_patterns(3, STEPS, T) if present else None
    module = Module("upgrad", present=masks)
    plugin = fp16_cpu_plugin()
    fit(module, tmp_path, plugins=[plugin])
    opt = mtl.unwrap(module.optimizers())
    assert opt.scaler is plugin.scaler
    ref = reference("upgrad", autocast=torch.float16, present=masks,
                    scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert max_diff(module.net, ref) < 1e-5
    assert plugin.scaler.get_scale() == 2.0**10  # no overflow: the scale stayed


def test_16_mixed_overflow_skips_the_step(tmp_path) -> None:
    module = Module("upgrad", bad_step=1)
    plugin = fp16_cpu_plugin()
    fit(module, tmp_path, plugins=[plugin])
    assert plugin.scaler.get_scale() == 2.0**9  # scaler.update halved it once
    ref = reference("upgrad", autocast=torch.float16, bad_step=1,
                    scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert max_diff(module.net, ref) < 1e-5
    unskipped = reference("upgrad", autocast=torch.float16,
                          scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert max_diff(module.net, unskipped) > 1e-4  # step 1 was not taken


@pytest.mark.skipif(not torch.cuda.is_available(), reason="precision='16-mixed' needs a CUDA device")
def test_16_mixed_on_cuda(tmp_path) -> None:
    module = Module("upgrad")
    trainer = fit(module, tmp_path, accelerator="cuda", precision="16-mixed")
    opt = mtl.unwrap(module.optimizers())
    assert opt.scaler is trainer.precision_plugin.scaler is not None
    assert module.backward_hooks == STEPS * T
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    assert opt.diagnostics["weights"].shape == (T,)


def test_checkpoint_resume_is_exact(tmp_path) -> None:
    name = "central+tension"  # stateful: the tensioners' loss window (resuming without it differs)
    full = Module(name)
    fit(full, tmp_path / "full", max_epochs=2)
    first = Module(name)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(first, tmp_path / "first", max_epochs=1, enable_checkpointing=True, callbacks=[ckpt])
    saved = torch.load(ckpt.last_model_path, weights_only=False)
    state = saved["optimizer_states"][0]["mtlgrad"]
    assert state["num_tasks"] == T and state["aggregator"]  # the multi-task state is in it
    resumed = Module(name)
    fit(resumed, tmp_path / "resumed", ckpt_path=ckpt.last_model_path, max_epochs=2)
    agg_full = mtl.unwrap(full.optimizers()).aggregator.state_dict()
    agg_resumed = mtl.unwrap(resumed.optimizers()).aggregator.state_dict()
    assert torch.equal(torch.cat([p.flatten() for p in full.net.parameters()]),
                       torch.cat([p.flatten() for p in resumed.net.parameters()]))
    assert repr(agg_full) == repr(agg_resumed)
    # the control: the same checkpoint without the multi-task state resumes differently
    del saved["optimizer_states"][0]["mtlgrad"]
    torch.save(saved, tmp_path / "stripped.ckpt")
    stripped = Module(name)
    fit(stripped, tmp_path / "stripped", ckpt_path=str(tmp_path / "stripped.ckpt"), max_epochs=2)
    assert max_diff(full.net, stripped.net) > 1e-3


class AutoModule(Module):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = True


def test_bad_use_is_an_error(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="manual optimisation"):
        fit(AutoModule(), tmp_path)
    module = Module()
    base = torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="not attached to a Trainer"):
        mtl.multitask_optimizer(module, base, shared=module.net.encoder, num_tasks=T)
    with pytest.raises(TypeError, match="do not pass scaler"):
        mtl.multitask_optimizer(module, base, shared=module.net.encoder, num_tasks=T, scaler=None)
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        mtl.multitask_optimizer(module, base, shared=module.net.encoder, num_tasks=0)
    with pytest.raises(TypeError, match="MultiTaskOptimizer"):
        mtl.unwrap(base)

    class WrongCount(Module):
        def training_step(self, batch, batch_idx):
            x, ys = batch
            mtl.manual_backward(self, [nn.functional.mse_loss(self.net(x)[0], ys[0])])

    with pytest.raises(ValueError, match=f"expected {T} losses"):
        fit(WrongCount(), tmp_path)

    class NoTask(Module):
        def training_step(self, batch, batch_idx):
            mtl.manual_backward(self, [None] * T)

    with pytest.raises(ValueError, match="every loss is None"):
        fit(NoTask(), tmp_path)
