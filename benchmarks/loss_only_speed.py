"""Speed of the loss-only route: methods whose weights read only the loss values, and GradNorm at
one layer, against ``sum(losses).backward()`` and against the Jacobian route they took before.

Methods whose direction is ``w^T J`` with weights computed from the loss values alone
(``aggregator.reads == "losses"``: sum, mean, constant, RLW, DWA, UW, FAMO) take, under
``capture="auto"``, one backward of ``sum_t w_t L_t`` (plus, when the weights are not all one, a
backward of ``sum_t L_t`` restricted to the task-specific parameters) and never build ``J``.
GradNorm with ``layer=`` takes one small backward per task for that layer's gradient norms, then
the same weighted backward.  ``capture="loop"`` still builds ``J`` task by task (the old route).

Rows (keys, selectable with ``--methods``):

* ``plain``: ``sum(losses).backward()``, the baseline every ratio refers to.
* ``auto:<m>`` for ``<m>`` in sum, mean, constant (weights all 1.0), rlw (seed 0), dwa, uw, famo:
  ``MultiTaskOptimizer(..., aggregator=<m>, diagnostics=False)`` with the default capture.
* ``loop:<m>``: the same with ``capture="loop"``.
* ``auto:gradnorm`` / ``loop:gradnorm``: GradNorm with ``layer=`` the columns of the encoder's last
  layer (the last Linear or Conv2d and the parameters after it: its bias, the BatchNorm that
  follows), taken from the optimizer's flat layout.

Models: ``mlp`` (``Linear(256, 1024)``, ReLU, ``Linear(1024, 1024)``, ReLU; a batch of 256 inputs
of 256 values; ``--mlp`` sets the widths) and ``convnet`` (step_speed.py's built-in ConvNet; by
default step_speed.py's ``--quick`` input, a batch of 32 of 3x32x32, so that the loop rows at
T = 40 fit on a small CPU).  Each task has a ``Linear(features, 10)`` head and a cross-entropy
loss on fixed random labels; train mode.

One timed step: ``zero_grad``, the forward pass and the backward (``opt.backward(losses)`` or
``sum(losses).backward()``).  The parameters are not updated (no ``optimizer.step()``, the same for
every row), so every step sees the same model and batch; stateful methods still advance their
state at every step.

Measurement, for each thread count, model and T: every row is built once and stepped ``--prime``
times (untimed); the shared gradients after those steps are compared (``auto:<m>`` against
``loop:<m>``, which have taken the same steps: column "rel. diff"; ``auto:sum`` against ``plain``,
which must be bit-identical).  Then ``--rounds`` rounds, each running every row in turn (the
order rotated by one each round) for one untimed and ``--steps`` timed steps; the loop rows, whose
steps cost T backward passes, take one timed step in each of the first ``--loop-rounds`` rounds.
Wall-clock (``time.perf_counter``) and process CPU time (``time.process_time``, all threads) per
step; the tables give medians and ratios to ``plain`` of the same block.  On a shared machine the
CPU time with one thread is the steadier figure.

Usage::

    python benchmarks/loss_only_speed.py            # both models, T = 3,10,40, 1 and 2 threads
    python benchmarks/loss_only_speed.py --models mlp --tasks 10 --threads 1
    python benchmarks/loss_only_speed.py --methods plain,auto:mean,loop:mean --out /tmp/lo.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_speed as ss  # the sibling script: ConvNet, Setup, timing, fingerprint

from torch_mtlgrad import FlatLayout, MultiTaskOptimizer
from torch_mtlgrad.aggregators import get as get_aggregator

LOSS_ONLY = ("sum", "mean", "constant", "rlw", "dwa", "uw", "famo")
GOAL_LOSS_ONLY = 1.15  # auto:<m> at most this times plain
GOAL_GRADNORM = 1.5  # auto:gradnorm at most this times plain


# ----------------------------------------------------------------------------------------------
# Configuration and models
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """What one run measures (the defaults are the full comparison).

    Example:
        >>> Config().mlp, Config().conv_batch
        ((256, 1024, 1024), 32)
    """

    models: tuple[str, ...] = ("mlp", "convnet")
    tasks: tuple[int, ...] = (3, 10, 40)
    threads: tuple[int, ...] = (1, 2)
    mlp: tuple[int, ...] = (256, 1024, 1024)
    mlp_batch: int = 256
    conv_batch: int = 32
    conv_size: int = 32
    conv_width: int = 32
    classes: int = 10
    prime: int = 2
    rounds: int = 5
    steps: int = 4
    loop_rounds: int = 3
    methods: tuple[str, ...] | None = None  # None: all
    seed: int = 0


def mlp_encoder(widths: Sequence[int]) -> nn.Sequential:
    """``Linear(widths[0], widths[1])``, ReLU, ... (a ReLU after every layer).

    Example:
        >>> mlp_encoder([4, 8, 8])(torch.randn(2, 4)).shape
        torch.Size([2, 8])
    """
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def build_setup(config: Config, model: str, T: int) -> ss.Setup:
    """One model and batch for ``T`` tasks (step_speed.py's :class:`Setup`)."""
    if model == "convnet":
        cfg = ss.Config(model="convnet", batch=config.conv_batch, size=config.conv_size,
                        width=config.conv_width, classes=config.classes, seed=config.seed)
        return ss.build_setup(cfg, T, torch.device("cpu"))
    if model != "mlp":
        raise ValueError(f"model must be 'mlp' or 'convnet', got {model!r}")
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    enc = mlp_encoder(config.mlp)
    heads = nn.ModuleList(nn.Linear(config.mlp[-1], config.classes) for _ in range(T))
    x = torch.randn(config.mlp_batch, config.mlp[0], generator=gen)
    ys = [torch.randint(config.classes, (config.mlp_batch,), generator=gen) for _ in range(T)]
    enc.train()
    heads.train()
    widths = " -> ".join(str(w) for w in config.mlp)
    return ss.Setup(enc, heads, x, ys, f"MLP {widths} (ReLU), batch {config.mlp_batch}")


def describe_input(config: Config, model: str) -> str:
    if model == "mlp":
        return f"MLP {' -> '.join(str(w) for w in config.mlp)}, batch {config.mlp_batch}"
    return (f"ConvNet(width={config.conv_width}), batch {config.conv_batch} of "
            f"3x{config.conv_size}x{config.conv_size}")


def last_layer_columns(encoder: nn.Module) -> tuple[int, int]:
    """Columns of ``J`` of the encoder's last layer: the last Linear / Conv2d's weight and every
    shared parameter after it (its bias, a BatchNorm that follows), from the flat layout.

    Example:
        >>> last_layer_columns(mlp_encoder([2, 3, 4]))   # 2*3 + 3 columns, then 3*4 + 4
        (9, 25)
    """
    params = [p for p in encoder.parameters() if p.requires_grad]
    layout = FlatLayout(params)
    last = [m for m in encoder.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    index = next(i for i, p in enumerate(params) if p is last.weight)
    return layout.param_range(index)[0], layout.numel


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
@dataclass
class Built:
    """A row's step and the optimizer behind it (``None`` for ``plain``)."""

    step: Callable[[], None]
    opt: MultiTaskOptimizer | None = None


def make_aggregator(name: str, setup: ss.Setup) -> Any:
    if name == "constant":
        return get_aggregator("constant", weights=[1.0] * setup.T)
    if name == "rlw":
        return get_aggregator("rlw", seed=0)
    if name == "gradnorm":
        return get_aggregator("gradnorm", layer=last_layer_columns(setup.encoder))
    return get_aggregator(name)


def build_row(key: str, setup: ss.Setup, diagnostics: bool | str = False) -> Built:
    """The step of row ``key`` (``plain``, ``auto:<m>`` or ``loop:<m>``) on ``setup``."""
    if key == "plain":
        def plain() -> None:
            setup.zero_grad()
            _, losses = setup.forward()
            sum(losses).backward()

        return Built(plain)
    capture, name = key.split(":", 1)
    opt = MultiTaskOptimizer(torch.optim.SGD(setup.parameters(), lr=0.0), shared=setup.encoder,
                             aggregator=make_aggregator(name, setup), capture=capture,
                             diagnostics=diagnostics)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _, losses = setup.forward()
        opt.backward(losses)

    return Built(step, opt)


def row_keys() -> list[str]:
    """Every row, in table order."""
    keys = ["plain"]
    for name in (*LOSS_ONLY, "gradnorm"):
        keys += [f"auto:{name}", f"loop:{name}"]
    return keys


def select(keys: Sequence[str] | None) -> list[str]:
    known = row_keys()
    if keys is None:
        return known
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {known}")
    return [k for k in known if k in set(keys)]


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One row of one block (threads, model, T)."""

    threads: int
    model: str
    T: int
    key: str
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    rel_diff: float | None = None
    capture: str | None = None  # opt.last_capture
    error: str | None = None

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_ms) if self.wall_ms else math.nan

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else math.nan

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.wall_ms)


def shared_grad(setup: ss.Setup) -> Tensor | None:
    grads = [p.grad for p in setup.shared()]
    if any(g is None for g in grads):
        return None
    return torch.cat([g.detach().reshape(-1).double() for g in grads])


def rel(a: Tensor | None, b: Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _reference(key: str) -> str | None:
    if key == "auto:sum":
        return "plain"
    if key.startswith("auto:"):
        return "loop:" + key.split(":", 1)[1]
    return None


def measure_block(keys: Sequence[str], setup: ss.Setup, config: Config, threads: int, model: str,
                  build: Callable[[str, ss.Setup], Built] = build_row,
                  reference: Callable[[str], str | None] = _reference,
                  slow: Callable[[str], bool] = lambda k: k.startswith("loop:"),
                  log: Callable[[str], None] | None = None) -> list[Row]:
    """Prime, check and time the rows ``keys`` on one setup, interleaved round by round."""
    device = torch.device("cpu")
    rows = {k: Row(threads, model, setup.T, k) for k in keys}
    built: dict[str, Built] = {}
    grads: dict[str, Tensor | None] = {}
    for k in keys:
        try:
            b = build(k, setup)
            for _ in range(config.prime):
                b.step()
        except Exception as exc:  # noqa: BLE001 - a failing row says why; the others go on
            rows[k].error = ss._short(exc)
            setup.zero_grad()
            continue
        built[k] = b
        grads[k] = shared_grad(setup)
        setup.zero_grad()
    for k in built:
        ref = reference(k)
        if ref is not None and ref in grads:
            rows[k].rel_diff = rel(grads[k], grads[ref])
    gc.collect()
    order = list(built)
    for r in range(config.rounds):
        shift = r % len(order) if order else 0
        for k in order[shift:] + order[:shift]:
            if slow(k):
                if r >= config.loop_rounds:
                    continue
                wall, cpu = ss.time_steps(built[k].step, 1, device)
            else:
                built[k].step()
                wall, cpu = ss.time_steps(built[k].step, config.steps, device)
            rows[k].wall_ms += wall
            rows[k].cpu_ms += cpu
    for k, b in built.items():
        if b.opt is not None:
            rows[k].capture = b.opt.last_capture
    if log:
        base = rows.get("plain")
        for k in keys:
            row = rows[k]
            extra = ""
            if base is not None and base.ok and row.ok:
                extra = f" ({row.wall / base.wall:.2f}x plain wall, {row.cpu / base.cpu:.2f}x CPU)"
            log(f"threads={threads} {model} T={setup.T} {k}: "
                + (row.error or f"{row.wall:.1f} ms wall, {row.cpu:.1f} ms CPU" + extra))
    setup.zero_grad()
    del built
    gc.collect()
    return [rows[k] for k in keys]


@dataclass
class Result:
    config: Config
    rows: list[Row]
    meta: dict[str, str]


def run(config: Config, log: Callable[[str], None] | None = None) -> Result:
    """Every selected row for every thread count, model and T (the core, used by the tests).

    Example:
        >>> cfg = Config(models=("mlp",), tasks=(2,), threads=(1,), mlp=(4, 8), mlp_batch=4,
        ...              prime=1, rounds=1, steps=1, methods=("plain", "auto:mean"))
        >>> [(r.key, r.capture) for r in run(cfg).rows]
        [('plain', None), ('auto:mean', 'losses')]
    """
    keys = select(config.methods)
    before = torch.get_num_threads()
    rows: list[Row] = []
    try:
        for threads in config.threads:
            torch.set_num_threads(threads)
            for model in config.models:
                for T in config.tasks:
                    setup = build_setup(config, model, T)
                    ss._sum_step(setup)()  # lazy initialisations before anything is timed
                    rows += measure_block(keys, setup, config, threads, model, log=log)
                    del setup
    finally:
        torch.set_num_threads(before)
    meta = {
        "device": ss._device_name(torch.device("cpu")),
        "torch_mtlgrad": ss.source_fingerprint(),
        "torch": torch.__version__,
        "threads": ", ".join(str(t) for t in config.threads) + " (torch.set_num_threads)",
        "models": "; ".join(describe_input(config, m) for m in config.models)
                  + f"; {config.classes}-class linear head per task",
        "timing": f"{config.prime} priming steps per row, then {config.rounds} interleaved rounds of "
                  f"1 untimed + {config.steps} timed steps per row (loop rows: 1 timed step in each "
                  f"of the first {min(config.loop_rounds, config.rounds)} rounds); wall clock and "
                  f"process CPU time",
    }
    return Result(config, rows, meta)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _f(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None or math.isnan(v) else format(v, spec)


def format_tables(result: Result) -> str:
    """One markdown table per (threads, model): every row at every T with its ratios to plain."""
    out = []
    cfg = result.config
    for threads in cfg.threads:
        for model in cfg.models:
            out += [f"{describe_input(cfg, model)}, {threads} thread(s):", "",
                    "| T | method | wall ms | x plain | CPU ms | x plain (CPU) | rel. diff | ran as |",
                    "|---|---|---|---|---|---|---|---|"]
            for T in cfg.tasks:
                block = [r for r in result.rows if (r.threads, r.model, r.T) == (threads, model, T)]
                base = next((r for r in block if r.key == "plain" and r.ok), None)
                for r in block:
                    if not r.ok:
                        out.append(f"| {T} | {r.key} | - | - | - | - | - | {r.error or 'no steps'} |")
                        continue
                    xw = r.wall / base.wall if base else None
                    xc = r.cpu / base.cpu if base else None
                    rd = "-" if r.rel_diff is None else f"{r.rel_diff:.1e}"
                    out.append(f"| {T} | {r.key} | {r.wall:.1f} | {_f(xw, '.2f')} | {r.cpu:.1f} | "
                               f"{_f(xc, '.2f')} | {rd} | {r.capture or '-'} |")
            out.append("")
    return "\n".join(out)


def check_goals(result: Result) -> list[str]:
    """Each ``auto:`` row against its goal (loss-only methods: at most 1.15x plain; GradNorm at one
    layer: at most 1.5x plain), judged on the wall-clock median with the CPU-time ratio beside it,
    and whether it ran the route it should."""
    out = []
    for r in result.rows:
        if not r.key.startswith("auto:"):
            continue
        base = next((b for b in result.rows if (b.threads, b.model, b.T, b.key)
                     == (r.threads, r.model, r.T, "plain") and b.ok), None)
        if base is None or not r.ok:
            continue
        goal = GOAL_GRADNORM if r.key == "auto:gradnorm" else GOAL_LOSS_ONLY
        route = "layer" if r.key == "auto:gradnorm" else "losses"
        xw, xc = r.wall / base.wall, r.cpu / base.cpu
        verdict = "met" if xw <= goal else "not met"
        cpu_verdict = "met" if xc <= goal else "not met"
        out.append(f"- threads={r.threads} {r.model} T={r.T} {r.key}: {xw:.2f}x plain (goal "
                   f"{goal}x): {verdict} [CPU time {xc:.2f}x: {cpu_verdict}]"
                   + ("" if r.capture == route else f"; ran as {r.capture!r}, not {route!r}"))
    return out


def format_report(result: Result, command: str | None = None) -> str:
    head = [f"- {k}: {v}" for k, v in result.meta.items()]
    if command:
        head.insert(0, f"- command: `{command}`")
    head.append(f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}")
    return "\n".join([*head, "", format_tables(result), "Goals:", "", *check_goals(result), ""])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated: mlp, convnet (default both)")
    p.add_argument("--tasks", default=None, help="comma-separated T values (default 3,10,40)")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default 1,2)")
    p.add_argument("--mlp", default=None, help="MLP widths, input first (default 256,1024,1024)")
    p.add_argument("--mlp-batch", type=int, default=None, help="MLP batch (default 256)")
    p.add_argument("--conv-batch", type=int, default=None, help="ConvNet batch (default 32)")
    p.add_argument("--conv-size", type=int, default=None, help="ConvNet input height = width (default 32)")
    p.add_argument("--conv-width", type=int, default=None, help="ConvNet first-block channels (default 32)")
    p.add_argument("--prime", type=int, default=None, help="untimed steps per row first (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row and round (default 4)")
    p.add_argument("--loop-rounds", type=int, default=None,
                   help="rounds in which the loop rows take their one timed step (default 3)")
    p.add_argument("--methods", default=None, help="comma-separated row keys (default all): "
                   + ", ".join(row_keys()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    values: dict[str, Any] = {"seed": args.seed}
    if args.models is not None:
        values["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    for name in ("tasks", "threads", "mlp"):
        if getattr(args, name) is not None:
            values[name] = _ints(getattr(args, name))
    for name in ("mlp_batch", "conv_batch", "conv_size", "conv_width", "prime", "rounds", "steps",
                 "loop_rounds"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.methods is not None:
        values["methods"] = tuple(k.strip() for k in args.methods.split(",") if k.strip())
        select(values["methods"])  # unknown keys fail here, before anything runs
    cfg = replace(Config(), **values)
    if (cfg.steps < 1 or cfg.rounds < 1 or cfg.prime < 1 or cfg.loop_rounds < 0 or not cfg.tasks
            or min(cfg.tasks) < 1 or not cfg.threads or min(cfg.threads) < 1 or len(cfg.mlp) < 2
            or any(m not in ("mlp", "convnet") for m in cfg.models)):
        p.error("steps, rounds and prime must be >= 1, loop-rounds >= 0, every T and thread count "
                ">= 1, --mlp at least two widths, models among mlp and convnet")
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_args(argv)
    return ss.report_main(argv, config, args.out, run, format_report)


if __name__ == "__main__":
    sys.exit(main())
