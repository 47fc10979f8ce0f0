"""MultiTaskOptimizer in a PyTorch Lightning ``LightningModule`` (manual optimisation).

Two regression tasks share an encoder.  ``torch_mtlgrad.lightning`` routes every task's backward
through Lightning's ``manual_backward``, so the Trainer's precision plugin applies (``--precision
bf16-mixed`` on a CPU; ``16-mixed`` with its GradScaler on a GPU), and Lightning's checkpoints
hold the optimizer's multi-task state: the script trains for ``--epochs``, saves a checkpoint
half-way, resumes from it in a second Trainer, and checks that the resumed run ends with the same
parameters as the uninterrupted one.

The module, as you would write it::

    class MultiTaskModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            ...
        def configure_optimizers(self):
            base = torch.optim.Adam(self.parameters(), lr=...)
            return mtl_lightning.multitask_optimizer(self, base, shared=self.encoder,
                                                     num_tasks=2, aggregator="upgrad")
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            losses = [...]                                  # one per task
            mtl_lightning.manual_backward(self, losses)     # not self.manual_backward(sum(...))
            opt.step()

Run:  pip install "torch_mtlgrad[lightning]"
      python examples/lightning_module.py [--epochs 4] [--precision bf16-mixed] [--out DIR]

Checkpoints go into ``--out`` (default: a new folder under the current directory, printed).
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch
from _common import add_output_args, output_dir, positive_int, table  # examples/_common.py
from torch import nn

try:
    import lightning.pytorch as L
except ImportError:
    raise SystemExit('this example needs PyTorch Lightning: pip install "torch_mtlgrad[lightning]"'
                     ) from None

from torch_mtlgrad import lightning as mtl_lightning


def make_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y1 = torch.tanh(x[:, :4].sum(1, keepdim=True))
    y2 = -10.0 * torch.tanh(x[:, 2:6].sum(1, keepdim=True))  # 10x larger, in conflict
    return torch.utils.data.TensorDataset(x, y1, y2)


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle that depends on the epoch only: Lightning calls ``set_epoch`` (also after a
    resume), while a ``DataLoader(shuffle=True, generator=g)`` would restart ``g`` on resume and
    feed the resumed run other batches than the uninterrupted one."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class MultiTaskModule(L.LightningModule):
    def __init__(self, aggregator: str = "upgrad", lr: float = 3e-3) -> None:
        super().__init__()
        self.automatic_optimization = False  # the optimizer needs each task's backward
        self.aggregator, self.lr = aggregator, lr
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [h(z) for h in self.heads]

    def configure_optimizers(self):
        base = torch.optim.Adam(self.parameters(), lr=self.lr)
        return mtl_lightning.multitask_optimizer(self, base, shared=self.encoder, num_tasks=2,
                                                 aggregator=self.aggregator)

    def training_step(self, batch, batch_idx):
        x, *ys = batch
        opt = self.optimizers()
        opt.zero_grad()
        losses = [nn.functional.mse_loss(o.float(), y) for o, y in zip(self(x), ys)]
        mtl_lightning.manual_backward(self, losses)  # each task through Lightning's backward
        opt.step()                                   # Lightning's step (scaler.step under 16-mixed)
        self.log_dict({f"loss{t}": loss.detach() for t, loss in enumerate(losses)})


def trainer(args: argparse.Namespace, epochs: int, root, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="auto", devices=1, max_epochs=epochs, precision=args.precision,
                     logger=False, enable_model_summary=False,
                     enable_progress_bar=not args.quiet, default_root_dir=root, **kwargs)


@torch.no_grad()
def relative_losses(model: MultiTaskModule, data: torch.utils.data.TensorDataset) -> list[float]:
    x, *ys = data.tensors
    return [float(nn.functional.mse_loss(o, y) / y.var()) for o, y in zip(model(x), ys)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=positive_int, default=4, help="epochs (at least 2)")
    p.add_argument("--n-train", type=positive_int, default=2048)
    p.add_argument("--aggregator", default="upgrad")
    p.add_argument("--precision", default="32-true",
                   choices=["32-true", "bf16-mixed", "16-mixed"],
                   help="Lightning's precision (16-mixed needs a GPU: on a CPU Lightning uses "
                        "bf16-mixed instead)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    add_output_args(p)
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the checkpoint is taken half-way)")
    torch.set_num_threads(args.threads)
    # Lightning's start-up notes (GPU available, tips, workers) are not this example's subject
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*callbacks used to create the checkpoint.*",
                    ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)
    out = output_dir(args, "lightning")
    train = torch.utils.data.DataLoader(make_data(args.n_train, 0), batch_size=64,
                                        sampler=EpochShuffle(args.n_train))
    test = make_data(2048, 1)

    L.seed_everything(0, verbose=False)
    full = MultiTaskModule(args.aggregator)
    trainer(args, args.epochs, out / "full").fit(full, train)

    L.seed_everything(0, verbose=False)
    first = MultiTaskModule(args.aggregator)
    ckpt = L.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)
    trainer(args, args.epochs // 2, out / "first", callbacks=[ckpt]).fit(first, train)
    resumed = MultiTaskModule(args.aggregator)
    trainer(args, args.epochs, out / "resumed", enable_checkpointing=False).fit(
        resumed, train, ckpt_path=ckpt.last_model_path)

    same = all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
    weights = mtl_lightning.unwrap(full.optimizers()).diagnostics["weights"].tolist()
    rows = [[name, *relative_losses(m, test)] for name, m in
            (("uninterrupted", full), (f"resumed at epoch {args.epochs // 2}", resumed))]
    print(f"\n{args.aggregator}, precision {args.precision}, {args.epochs} epochs; test loss "
          "relative to each task's variance:")
    print(table(["run", "task 1", "task 2 (10x)"], rows))
    print(f"\ncheckpoint: {ckpt.last_model_path}")
    print(f"\nResult: the run resumed from the checkpoint ended "
          f"{'with exactly the same parameters as' if same else 'with DIFFERENT parameters from'} "
          f"the uninterrupted one; the last step weighted the tasks "
          f"{', '.join(f'{w:.3f}' for w in weights)}.")


if __name__ == "__main__":
    main()
