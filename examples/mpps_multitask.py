"""MPPS (progressive parameter sharing) against hard parameter sharing on a generated problem.

Three tasks on the same 16-d inputs, learnt by one MLP backbone (7 Linear layers of width 32, each
followed by BatchNorm1d and ReLU) with one head per task:

* task 0, regression: a random tanh teacher on shared random features of x;
* task 1, regression: a teacher 70% aligned with task 0's (related task);
* task 2, 4-class classification: an independent teacher on x (unrelated task).

Why BatchNorm: a guest's Gaussian mask at the initial ``phi = 0.01`` has standard deviation
``r(0.01) = 9.95``; without normalisation six masked layers multiply activations by that much and
the network collapses (training losses ~1e4, constant predictions).  The paper's backbones (ResNet,
VGG) normalise after their convolutions, and so does this one.  With BatchNorm after a masked
layer, a batch-shared mask ``m`` of a neuron is mostly normalised away except for its sign
(``BN(m h) = sign(m) BN(h)``) and ``m = 0`` (the neuron outputs BN's bias).

Evaluation: held-out test data, the full (unmasked) backbone in eval mode, as in the paper.  Its
BatchNorm statistics are first recomputed on the training inputs with that full backbone at the
final weights (every run, baselines included): the running statistics collected during training
are those of the *masked* forwards, and a neuron a task's mask switched off contributed zeros to
them.  As long as the masks reach full sharing before the end (the default schedule's frozen
last epochs) the two nearly agree; when they do not (``--epochs 3 --frozen 0``: EC(phi) is still
0.93 when training stops), the masked statistics under-estimate the full backbone's variances
by up to ~100x, six normalised layers multiply that, and the test MSE was ~1e4.  The script
also warns when the learnt masks end far from full sharing: the evaluated full backbone is then
not the network the tasks trained through.

Runs (each over ``--seeds`` seeds):

* ``STL``: one network per task (the baseline of Delta, the paper's eq. 5);
* ``HPS``: hard parameter sharing, the summed loss (``MultiTaskOptimizer`` with ``"sum"``);
* ``HPS+<agg>``: hard sharing with another aggregator (default CAGrad, as in the paper's Table 5);
* ``MPPS-B`` / ``MPPS-G``: MPPS with Bernoulli / Gaussian masks on the backbone's last 6 layers,
  Linear EC schedule with frozen epochs, summed loss;
* ``MPPS-B+<agg>``: MPPS-B with the other aggregator.

Prints per-task test metrics, Delta (%) against STL (mean over tasks of +-(P - P_stl) / P_stl,
sign so that higher is better) and wall time; saves two PNGs to ``--out`` (default: a new folder
under the current directory, printed): the EC schedules
(the paper's Figure 3, plus the scheduled, target and learnt EC of the MPPS runs) and the
per-layer share of task 1 against task 2 on the neurons task 0 owns (the paper's Figure 6).

``--bench`` instead times one training step of hard sharing and of MPPS (sequential, sequential
with one graph at a time, batched) on a small CNN (8 Conv2d layers of 16 channels on 3x32x32
inputs, MPPS on the last 6) for T = 3 and 10: median wall-clock and process CPU time per step (the
latter is the steadier number on a shared CPU with one torch thread), with the activation memory the
autograd graph holds (and CUDA peak memory with ``--device cuda``).

Usage::

    python examples/mpps_multitask.py                 # the comparison, a few minutes on a CPU
    python examples/mpps_multitask.py --bench         # step time and memory
    pip install "torch_mtlgrad[examples]"             # matplotlib (the PNGs), tqdm (progress)

``--quiet`` hides the progress bar.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import (  # examples/_common.py
    add_output_args,
    nonnegative_int,
    output_dir,
    positive_float,
    positive_int,
    progress,
    table,
)
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from torch_mtlgrad import MultiTaskOptimizer, aggregators
from torch_mtlgrad.mpps import MPPS, FullShare, Linear, Quad, Separ, StepN

T = 3
D_IN = 16
WIDTH = 32
N_CLASSES = 4


# --------------------------------------------------------------------------- the problem
def make_problem(seed: int, n_train: int = 2048, n_test: int = 4096) -> dict[str, Tensor]:
    """Inputs and the three tasks' targets (the teachers are fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)

    def teacher(
        d_in: int, d_hidden: int, d_out: int, base: Tensor | None = None, align: float = 0.0
    ):
        w1 = torch.randn(d_hidden, d_in, generator=g) / d_in**0.5
        if base is not None:
            w1 = align * base + (1 - align**2) ** 0.5 * w1
        w2 = torch.randn(d_out, d_hidden, generator=g) / d_hidden**0.5
        return w1, w2

    feat = torch.randn(32, D_IN, generator=g) / D_IN**0.5  # shared random features of x
    w0 = teacher(32, 24, 1)
    w1 = teacher(32, 24, 1, base=w0[0], align=0.7)
    w1 = (w1[0], 0.7 * w0[1] + 0.71 * w1[1])
    w2 = teacher(D_IN, 24, N_CLASSES)

    def targets(x: Tensor) -> list[Tensor]:
        h = torch.tanh(2.0 * x @ feat.T)
        y0 = torch.tanh(2.0 * h @ w0[0].T) @ w0[1].T
        y1 = torch.tanh(2.0 * h @ w1[0].T) @ w1[1].T
        y2 = (torch.tanh(1.5 * x @ w2[0].T) @ w2[1].T).argmax(1)
        return [y0, y1, y2]

    x_tr = torch.randn(n_train, D_IN, generator=g)
    x_te = torch.randn(n_test, D_IN, generator=g)
    y_tr, y_te = targets(x_tr), targets(x_te)
    out = {"x_train": x_tr, "x_test": x_te}
    for t in range(2):  # unit-variance regression targets, noisy for training
        mu, sd = y_tr[t].mean(), y_tr[t].std()
        out[f"y{t}_train"] = (y_tr[t] - mu) / sd + 0.1 * torch.randn(y_tr[t].shape, generator=g)
        out[f"y{t}_test"] = (y_te[t] - mu) / sd
    out["y2_train"], out["y2_test"] = y_tr[2], y_te[2]
    return out


def backbone() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(D_IN, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU()]
    return nn.Sequential(*layers)


def heads() -> nn.ModuleList:
    return nn.ModuleList([nn.Linear(WIDTH, 1), nn.Linear(WIDTH, 1), nn.Linear(WIDTH, N_CLASSES)])


def task_loss(t: int, out: Tensor, y: Tensor) -> Tensor:
    if t < 2:
        return nn.functional.mse_loss(out, y)
    return nn.functional.cross_entropy(out, y)


@torch.no_grad()
def evaluate(
    net: nn.Module, hs: nn.ModuleList, data: dict[str, Tensor], tasks: list[int]
) -> dict[int, float]:
    """Test metric per task: MSE for the regressions, accuracy for the classification."""
    net.eval()
    z = net(data["x_test"])
    res = {}
    for t in tasks:
        out = hs[t](z)
        y = data[f"y{t}_test"]
        res[t] = (
            float(nn.functional.mse_loss(out, y))
            if t < 2
            else float((out.argmax(1) == y).float().mean())
        )
    net.train()
    return res


def recalibrate(net: nn.Module, data: dict[str, Tensor], batch: int) -> None:
    """Recompute the BatchNorm statistics of the full backbone on the training inputs (the
    module docstring says why); a no-op for the weights."""
    x = data["x_train"]
    update_bn([x[i : i + batch] for i in range(0, x.shape[0], batch)], net)


# --------------------------------------------------------------------------- training runs
def run(
    kind: str,
    data: dict[str, Tensor],
    seed: int,
    args: argparse.Namespace,
    tasks: list[int] | None = None,
):
    """Train one configuration; returns (test metrics per task, history of MPPS quantities)."""
    torch.manual_seed(seed)
    tasks = list(range(T)) if tasks is None else tasks
    net, hs = backbone(), heads()
    mpps = None
    family = {"MPPS-B": "bernoulli", "MPPS-G": "gaussian"}.get(kind.split("+")[0])
    if family is not None:
        sched = Linear(args.epochs, frozen=args.frozen)
        mpps = MPPS(net, T, scheduler=sched, family=family, beta=args.beta, seed=seed)  # type: ignore[arg-type]
    groups = [{"params": [*net.parameters(), *hs.parameters()]}]
    if mpps is not None:
        groups.append({"params": list(mpps.parameters()), "lr": args.phi_lr})
    inner = torch.optim.Adam(groups, lr=args.lr)
    aggregator = kind.split("+")[1] if "+" in kind else "sum"
    opt = (
        MultiTaskOptimizer(inner, shared=net, aggregator=aggregator, diagnostics=False)
        if len(tasks) > 1
        else inner
    )
    n = data["x_train"].shape[0]
    hist: dict[str, list] = {"scheduled": [], "ec_target": [], "ec_phi": [], "share": []}
    g = torch.Generator().manual_seed(seed + 1000)
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, args.batch):
            idx = perm[i : i + args.batch]
            x = data["x_train"][idx]
            ys = [data[f"y{t}_train"][idx] for t in range(T)]
            opt.zero_grad()
            if mpps is None:
                z = net(x)
                losses = [task_loss(t, hs[t](z), ys[t]) for t in tasks]
            else:
                losses = mpps.losses(lambda t, x=x, ys=ys: task_loss(t, hs[t](net(x)), ys[t]))
            if len(tasks) > 1:
                opt.backward(losses)  # type: ignore[union-attr]
            else:
                losses[0].backward()
            opt.step()
        if mpps is not None:
            hist["scheduled"].append(mpps.scheduler(mpps.epoch))
            hist["ec_target"].append(float(mpps.ec("target")))
            hist["ec_phi"].append(float(mpps.ec("phi")))
            # Figure 6: on neurons owned by task 0, the share of task 1 relative to task 2, per layer
            hist["share"].append(
                [float(s[0, 1] / (s[0, 1] + s[0, 2])) for s in mpps.task_shares("phi")]
            )
            mpps.end_epoch()
    if mpps is not None:
        mpps.remove()  # evaluation uses the full backbone
    recalibrate(net, data, args.batch)
    return evaluate(net, hs, data, tasks), hist


def delta(metrics: dict[int, float], base: dict[int, float]) -> float:
    """Paper eq. (5): mean over tasks of C_t (P_t - P_base) / P_base, in %; C_t = -1 for MSE."""
    signs = {0: -1.0, 1: -1.0, 2: 1.0}
    return 100.0 * sum(signs[t] * (metrics[t] - base[t]) / base[t] for t in range(T)) / T


def compare(args: argparse.Namespace) -> None:
    agg = args.aggregator
    kinds = ["HPS", f"HPS+{agg}", "MPPS-B", "MPPS-G", f"MPPS-B+{agg}"]
    results: dict[str, list[dict[int, float]]] = {k: [] for k in ["STL", *kinds]}
    times: dict[str, float] = {k: 0.0 for k in results}
    hists: dict[str, dict] = {}
    final_ec: dict[str, float] = {}
    data = make_problem(1234, args.n_train, args.n_test)  # one problem, several training seeds
    jobs = [(seed, kind) for seed in range(args.seeds) for kind in ["STL", *kinds]]
    for seed, kind in progress(jobs, args, desc="runs"):
        t0 = time.perf_counter()
        if kind == "STL":
            metrics = {}
            for t in range(T):
                metrics.update(run("STL", data, seed, args, tasks=[t])[0])
        else:
            metrics, hist = run(kind, data, seed, args)
            if seed == 0 and kind.startswith("MPPS") and "+" not in kind:
                hists[kind] = hist
            if hist["ec_phi"]:
                final_ec[kind] = max(final_ec.get(kind, 0.0), hist["ec_phi"][-1])
        times[kind] += time.perf_counter() - t0
        results[kind].append(metrics)

    base = {t: statistics.mean(r[t] for r in results["STL"]) for t in range(T)}
    print(
        f"\nTest metrics, mean +- std over {args.seeds} seeds ({args.epochs} epochs; Delta vs STL, higher is better)"
    )
    rows = []
    for kind, rs in results.items():
        cols = []
        for t in range(T):
            vals = [r[t] for r in rs]
            cols.append(f"{statistics.mean(vals):.4f} +- {statistics.pstdev(vals):.4f}")
        ds = [delta(r, base) for r in rs]
        cols.append(f"{round(statistics.mean(ds), 2) + 0.0:+.2f} +- {statistics.pstdev(ds):.2f}")
        rows.append([kind, *cols, f"{times[kind] / args.seeds:.1f}"])
    print(table(["method", "MSE task0", "MSE task1", "acc task2", "Delta %", "time/run s"], rows))
    print()
    for kind, ec in final_ec.items():
        if ec > 0.1:
            print(f"warning: {kind}'s learnt masks ended at EC(phi) = {ec:.2f}, far from full "
                  "sharing (0): the full backbone evaluated is not the network the tasks trained "
                  "through; train longer or with frozen last epochs (--epochs, --frozen)")
    if hists:
        h = hists["MPPS-B"]
        print("\nMPPS-B (seed 0) per epoch: scheduled EC / EC(target) / EC(phi)")
        for e in range(0, args.epochs, max(1, args.epochs // 10)):
            print(
                f"  epoch {e:3d}: {h['scheduled'][e]:.3f} / {h['ec_target'][e]:.3f} / {h['ec_phi'][e]:.3f}"
            )
    plot(args, hists)


def plot(args: argparse.Namespace, hists: dict[str, dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no PNGs written")
        return
    out = output_dir(args, "mpps")
    e = args.epochs
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    scheds = {
        "Separ": Separ(e),
        "FullShare": FullShare(e),
        f"Step{min(5, e - 2 * args.frozen)}": StepN(
            e, min(5, e - 2 * args.frozen), frozen=args.frozen
        ),
        "Linear": Linear(e, frozen=args.frozen),
        "Quad": Quad(e, frozen=args.frozen),
    }
    for name, s in scheds.items():
        axes[0].step(range(e), s.curve(), where="post", label=name)
    axes[0].set(
        title=f"EC schedulers ({args.frozen} frozen epochs)",
        xlabel="epoch",
        ylabel="EC",
        ylim=(-0.05, 1.05),
    )
    axes[0].legend()
    for kind, h in hists.items():
        axes[1].plot(h["scheduled"], "k--", lw=1)
        axes[1].plot(h["ec_target"], label=f"{kind} EC(target)")
        axes[1].plot(h["ec_phi"], label=f"{kind} EC(phi)")
    axes[1].set(
        title="Linear schedule (dashed) and the EC reached",
        xlabel="epoch",
        ylabel="EC",
        ylim=(-0.05, 1.05),
    )
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mpps_ec_schedule.png", dpi=110)
    fig, axes = plt.subplots(
        1, max(1, len(hists)), figsize=(5.5 * max(1, len(hists)), 4), squeeze=False
    )
    for ax, (kind, h) in zip(axes[0], hists.items()):
        shares = torch.tensor(h["share"])  # [epochs, layers]
        for layer in range(shares.shape[1]):
            ax.plot(shares[:, layer], label=f"masked layer {layer + 1}")
        ax.axhline(0.5, color="k", lw=0.5)
        ax.set(
            title=f"{kind}: phi1 / (phi1 + phi2) on task 0's neurons", xlabel="epoch", ylim=(0, 1)
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "mpps_layer_shares.png", dpi=110)
    print(f"\nwrote {out / 'mpps_ec_schedule.png'} and {out / 'mpps_layer_shares.png'}")


# --------------------------------------------------------------------------- step benchmark
def bench_model(t: int) -> tuple[nn.Module, nn.ModuleList]:
    layers: list[nn.Module] = []
    c_in = 3
    for i in range(8):
        layers += [nn.Conv2d(c_in, 16, 3, padding=1, stride=2 if i in (2, 5) else 1), nn.ReLU()]
        c_in = 16
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, nn.ModuleList([nn.Linear(16, 1) for _ in range(t)])


class SavedBytes:
    """Bytes of distinct non-parameter tensors the autograd graph saves (activation memory)."""

    def __init__(self, params: list[Tensor]) -> None:
        self.skip = {p.data_ptr() for p in params}
        self.seen: set[int] = set()
        self.total = 0
        self.peak = 0

    def pack(self, x: Tensor) -> Tensor:
        ptr = x.untyped_storage().data_ptr()
        if ptr not in self.skip and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += x.untyped_storage().nbytes()
            self.peak = max(self.peak, self.total)
        return x

    def release(self) -> None:  # the graph was freed by backward
        self.seen.clear()
        self.total = 0


def bench_step(
    mode: str,
    net: nn.Module,
    hs: nn.ModuleList,
    mpps: MPPS | None,
    opt: torch.optim.Optimizer,
    meter: SavedBytes,
    x: Tensor,
    ys: Tensor,
    t: int,
) -> None:
    """One training step of hard sharing or of MPPS in one of its three forms."""

    def loss(i: int, z: Tensor) -> Tensor:
        return ((hs[i](z) - ys[i]) ** 2).mean()

    opt.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda v: v):
        if mpps is None:  # hard parameter sharing
            z = net(x)
            sum(loss(i, z) for i in range(t)).backward()
        elif mode == "mpps-sequential":  # T forwards, all T graphs alive until backward
            sum(mpps.losses(lambda i: loss(i, net(x)))).backward()
        elif mode == "mpps-sequential-lean":  # T forwards, backward right after each
            for i in range(t):
                with mpps.task(i):
                    obj = mpps.objective(i, loss(i, net(x)))
                obj.backward()
                meter.release()
        else:  # one forward on T copies of the batch

            def all_losses() -> list[Tensor]:
                zs = net(mpps.repeat(x)).chunk(t)
                return [loss(i, zs[i]) for i in range(t)]

            sum(mpps.losses_batched(all_losses)).backward()
    meter.release()
    opt.step()


def bench(args: argparse.Namespace) -> None:
    dev = torch.device(args.device)
    print(
        f"device {dev}, torch threads {torch.get_num_threads()}, batch {args.bench_batch} of 3x32x32"
    )
    warmed = False
    header = f"{'T':>3} {'mode':<22}"
    for name in ("wall ms", "cpu ms", "graph MB") + (("cuda MB",) if dev.type == "cuda" else ()):
        header += f"{name:>10}{'x HPS':>7}"
    print(header)
    for t in (3, 3, 10):  # the first T = 3 pass only warms the process up (allocator, kernels)
        warmup_pass = t == 3 and not warmed
        warmed = True
        x = torch.randn(args.bench_batch, 3, 32, 32, device=dev)
        ys = torch.randn(t, args.bench_batch, 1, device=dev)
        base: dict[str, float] = {}
        for mode in ("hps", "mpps-sequential", "mpps-sequential-lean", "mpps-batched"):
            torch.manual_seed(0)
            net, hs = bench_model(t)
            net, hs = net.to(dev), hs.to(dev)
            mpps = MPPS(net, t, scheduler=10, family="bernoulli") if mode != "hps" else None
            params = [*net.parameters(), *hs.parameters(), *(mpps.parameters() if mpps else [])]
            opt = torch.optim.SGD(params, lr=1e-3)
            meter = SavedBytes(params)

            def step(mode=mode, net=net, hs=hs, mpps=mpps, opt=opt, meter=meter, t=t, x=x, ys=ys):
                bench_step(mode, net, hs, mpps, opt, meter, x, ys, t)

            for _ in range(args.bench_warmup):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            meter.peak = 0
            ts, cs = [], []
            for _ in range(args.bench_steps):
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
                cs.append(time.process_time() - c0)
            row = {
                "ms": 1000 * statistics.median(ts),
                "cpu": 1000 * statistics.median(cs),
                "mb": meter.peak / 2**20,
            }
            if dev.type == "cuda":
                row["cuda"] = torch.cuda.max_memory_allocated() / 2**20
            if mode == "hps":
                base = row
            line = f"{t:>3} {mode:<22}"
            for key in ("ms", "cpu", "mb", "cuda"):
                if key in row:
                    line += f"{row[key]:>10.2f}{row[key] / base[key]:>7.2f}"
            if not warmup_pass:
                print(line, flush=True)
            if mpps is not None:
                mpps.remove()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument(
        "--frozen", type=nonnegative_int, default=4,
        help="frozen epochs at each end of the Linear schedule (epochs - 2 * frozen >= 2)"
    )
    p.add_argument("--seeds", type=positive_int, default=3)
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--n-train", type=positive_int, default=2048, help="training points")
    p.add_argument("--n-test", type=positive_int, default=4096, help="test points")
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument(
        "--phi-lr", type=positive_float, default=0.05, help="Adam learning rate of the MPPS logits"
    )
    p.add_argument("--beta", type=positive_float, default=1.0)
    p.add_argument(
        "--aggregator", default="cagrad", help="the other aggregator (any registry name)"
    )
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads")
    p.add_argument("--bench", action="store_true", help="time one step instead of the comparison")
    p.add_argument("--bench-batch", type=positive_int, default=32)
    p.add_argument("--bench-steps", type=positive_int, default=10)
    p.add_argument("--bench-warmup", type=nonnegative_int, default=5)
    p.add_argument("--device", default="cpu")
    add_output_args(p)
    args = p.parse_args()
    if args.epochs - 2 * args.frozen < 2:
        p.error(f"--epochs {args.epochs} with --frozen {args.frozen} leaves "
                f"{args.epochs - 2 * args.frozen} epochs between the frozen ones; the Linear "
                "schedule needs at least 2")
    try:
        aggregators.get(args.aggregator)
    except ValueError as e:
        p.error(f"--aggregator: {e}")
    if args.batch > args.n_train:
        p.error(f"--batch {args.batch} is larger than the {args.n_train} training points (--n-train)")
    if args.batch < 2:
        p.error("--batch must be at least 2 (BatchNorm needs two samples)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    if args.bench:
        bench(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
