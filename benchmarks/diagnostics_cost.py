"""What the per-step diagnostics cost: step time with ``diagnostics=False``, ``True`` (the default)
and ``"full"``, for Gramian methods (MGDA, UPGrad) and a loss-only one (mean).

For a method that builds ``J`` (MGDA, UPGrad; on the CPU the default capture is the per-task
loop), ``diagnostics=True`` adds the gradient diagnostics (task gradient norms, pairwise cosines,
each gradient's angle to the direction): one more ``J J^T`` and ``J d``.  ``"full"`` is the same
there.  For mean (``reads == "losses"``), ``True`` gives only the weights and the losses on the
loss-only route, while ``"full"`` makes the step build ``J`` for the gradient diagnostics.

Rows ``<method>:<setting>`` with ``<setting>`` in ``off`` / ``on`` / ``full``, on
loss_only_speed.py's MLP (256 -> 1024 -> 1024, batch 256, one ``Linear(1024, 10)`` head per task,
cross-entropy), T = 10 by default.  Measured as in loss_only_speed.py: each row built once, primed,
then interleaved rounds (order rotated each round) of one untimed and ``--steps`` timed steps;
median wall-clock and process CPU time.  The cost of a setting is ``(t_setting - t_off) / t_off``
of the same method (the share of the no-diagnostics step the diagnostics add).  Column "rel. diff"
compares the shared gradients with the ``off`` row after the priming steps (diagnostics must not
change the step).

The step difference of two medians is noisy on a shared machine; the report therefore also times
the diagnostics function alone (:func:`torch_mtlgrad.diagnostics.step_diagnostics` on a ``[T, D]``
matrix of the encoder's ``D``) and gives it as a share of the method's ``off`` step.

Usage::

    python benchmarks/diagnostics_cost.py                    # MLP, T = 10, 1 thread
    python benchmarks/diagnostics_cost.py --tasks 3,10 --threads 1,2 --out /tmp/diag.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loss_only_speed as lo  # the sibling script: the MLP, the interleaved measurement
import step_speed as ss

from torch_mtlgrad.diagnostics import step_diagnostics

METHODS = ("mgda", "upgrad", "mean")
SETTINGS: dict[str, bool | str] = {"off": False, "on": True, "full": "full"}
GOAL_GRAMIAN = 0.05  # default diagnostics of a Gramian method: at most 5% of the step


@dataclass(frozen=True)
class Config:
    """What one run measures.

    Example:
        >>> Config().tasks, Config().mlp
        ((10,), (256, 1024, 1024))
    """

    tasks: tuple[int, ...] = (10,)
    threads: tuple[int, ...] = (1,)
    mlp: tuple[int, ...] = (256, 1024, 1024)
    mlp_batch: int = 256
    prime: int = 2
    rounds: int = 6
    steps: int = 3
    isolated: int = 20  # timed calls of step_diagnostics alone
    methods: tuple[str, ...] = METHODS
    seed: int = 0

    def block(self) -> lo.Config:
        return lo.Config(models=("mlp",), mlp=self.mlp, mlp_batch=self.mlp_batch, prime=self.prime,
                         rounds=self.rounds, steps=self.steps, loop_rounds=0, seed=self.seed)


def keys(methods: Sequence[str]) -> list[str]:
    return [f"{m}:{s}" for m in methods for s in SETTINGS]


def build(key: str, setup: ss.Setup) -> lo.Built:
    method, setting = key.split(":")
    return lo.build_row(f"auto:{method}", setup, diagnostics=SETTINGS[setting])


def isolated_ms(T: int, D: int, n: int, seed: int = 0) -> tuple[float, float]:
    """Median (wall, CPU) ms of ``step_diagnostics(J, d, w)`` on a random ``[T, D]`` float32 ``J``."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, D, generator=g)
    w = torch.full((T,), 1.0 / T)
    d = w @ J
    step_diagnostics(J, d, w)
    wall, cpu = [], []
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        step_diagnostics(J, d, w)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


@dataclass
class Result:
    config: Config
    rows: list[lo.Row]
    isolated: dict[tuple[int, int], tuple[float, float]]  # (threads, T) -> (wall, CPU) ms
    meta: dict[str, str]


def run(config: Config, log: Any = None) -> Result:
    """Every method and setting at every thread count and T (the core, used by the tests).

    Example:
        >>> cfg = Config(tasks=(2,), mlp=(4, 8), mlp_batch=4, prime=1, rounds=1, steps=1,
        ...              isolated=1, methods=("mean",))
        >>> [(r.key, r.capture) for r in run(cfg).rows]
        [('mean:off', 'losses'), ('mean:on', 'losses'), ('mean:full', 'loop')]
    """
    block = config.block()
    chosen = keys(config.methods)
    rows: list[lo.Row] = []
    isolated: dict[tuple[int, int], tuple[float, float]] = {}
    before = torch.get_num_threads()
    D = 0
    try:
        for threads in config.threads:
            torch.set_num_threads(threads)
            for T in config.tasks:
                setup = lo.build_setup(block, "mlp", T)
                D = sum(p.numel() for p in setup.shared())
                ss._sum_step(setup)()
                rows += lo.measure_block(
                    chosen, setup, block, threads, "mlp", build=build,
                    reference=lambda k: None if k.endswith(":off") else k.split(":")[0] + ":off",
                    slow=lambda k: False, log=log)
                del setup
                isolated[(threads, T)] = isolated_ms(T, D, config.isolated, config.seed)
    finally:
        torch.set_num_threads(before)
    meta = {
        "device": ss._device_name(torch.device("cpu")),
        "torch_mtlgrad": ss.source_fingerprint(),
        "torch": torch.__version__,
        "threads": ", ".join(str(t) for t in config.threads) + " (torch.set_num_threads)",
        "model": f"{lo.describe_input(block, 'mlp')}, D = {D:,} shared parameters; 10-class "
                 f"linear head per task",
        "timing": f"{config.prime} priming steps per row, then {config.rounds} interleaved rounds of "
                  f"1 untimed + {config.steps} timed steps per row; wall clock and process CPU time; "
                  f"isolated step_diagnostics: median of {config.isolated} calls",
    }
    return Result(config, rows, isolated, meta)


def _pct(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b <= 0 else f"{100 * (a - b) / b:+.1f}%"


def _row(result: Result, threads: int, T: int, key: str) -> lo.Row | None:
    return next((r for r in result.rows if (r.threads, r.T, r.key) == (threads, T, key) and r.ok), None)


def format_tables(result: Result) -> str:
    out = []
    cfg = result.config
    for threads in cfg.threads:
        for T in cfg.tasks:
            iw, ic = result.isolated.get((threads, T), (math.nan, math.nan))
            title = (f"T = {T}, {threads} thread(s) (step_diagnostics alone: {iw:.1f} ms wall, "
                     f"{ic:.1f} ms CPU):")
            out += [title, "",
                    "| method | diagnostics | wall ms | cost (wall) | CPU ms | cost (CPU) | rel. diff | ran as |",
                    "|---|---|---|---|---|---|---|---|"]
            for m in cfg.methods:
                off = _row(result, threads, T, f"{m}:off")
                for s, value in SETTINGS.items():
                    r = next(r for r in result.rows if (r.threads, r.T, r.key) == (threads, T, f"{m}:{s}"))
                    if not r.ok:
                        out.append(f"| {m} | {value!r} | - | - | - | - | - | {r.error or 'no steps'} |")
                        continue
                    cw = _pct(r.wall, off.wall) if off and s != "off" else "-"
                    cc = _pct(r.cpu, off.cpu) if off and s != "off" else "-"
                    rd = "-" if r.rel_diff is None else f"{r.rel_diff:.1e}"
                    out.append(f"| {m} | {value!r} | {r.wall:.1f} | {cw} | {r.cpu:.1f} | {cc} | {rd} | "
                               f"{r.capture or '-'} |")
            out.append("")
    return "\n".join(out)


def check_goals(result: Result) -> list[str]:
    """Gramian methods with the default diagnostics: at most 5% of the step.  Judged on the
    wall-clock difference of medians, with the CPU-time difference and the isolated cost beside."""
    out = []
    cfg = result.config
    for threads in cfg.threads:
        for T in cfg.tasks:
            _, ic = result.isolated.get((threads, T), (math.nan, math.nan))
            for m in cfg.methods:
                off, on = _row(result, threads, T, f"{m}:off"), _row(result, threads, T, f"{m}:on")
                if off is None or on is None:
                    continue
                cw, cc = (on.wall - off.wall) / off.wall, (on.cpu - off.cpu) / off.cpu
                line = (f"- threads={threads} T={T} {m}: diagnostics=True costs {100 * cw:+.1f}% of the "
                        f"step (wall), {100 * cc:+.1f}% (CPU time)")
                if m != "mean":
                    line += (f"; step_diagnostics alone {100 * ic / off.cpu:.1f}% of the CPU step; "
                             f"goal <= {100 * GOAL_GRAMIAN:.0f}%: "
                             f"{'met' if cw <= GOAL_GRAMIAN else 'not met'} (wall), "
                             f"{'met' if cc <= GOAL_GRAMIAN else 'not met'} (CPU)")
                out.append(line)
    return out


def format_report(result: Result, command: str | None = None) -> str:
    head = [f"- {k}: {v}" for k, v in result.meta.items()]
    if command:
        head.insert(0, f"- command: `{command}`")
    head.append(f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}")
    return "\n".join([*head, "", format_tables(result), "Goals:", "", *check_goals(result), ""])


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=None, help="comma-separated T values (default 10)")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default 1)")
    p.add_argument("--mlp", default=None, help="MLP widths, input first (default 256,1024,1024)")
    p.add_argument("--mlp-batch", type=int, default=None, help="batch (default 256)")
    p.add_argument("--prime", type=int, default=None, help="untimed steps per row first (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row and round (default 3)")
    p.add_argument("--isolated", type=int, default=None, help="timed calls of step_diagnostics (default 20)")
    p.add_argument("--methods", default=None, help="comma-separated among mgda, upgrad, mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    values: dict[str, Any] = {"seed": args.seed}
    for name in ("tasks", "threads", "mlp"):
        if getattr(args, name) is not None:
            values[name] = lo._ints(getattr(args, name))
    for name in ("mlp_batch", "prime", "rounds", "steps", "isolated"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.methods is not None:
        values["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    cfg = replace(Config(), **values)
    if (cfg.steps < 1 or cfg.rounds < 1 or cfg.prime < 1 or cfg.isolated < 1 or not cfg.tasks
            or min(cfg.tasks) < 1 or not cfg.threads or min(cfg.threads) < 1 or len(cfg.mlp) < 2
            or any(m not in METHODS for m in cfg.methods)):
        p.error("steps, rounds, prime and isolated must be >= 1, every T and thread count >= 1, "
                f"--mlp at least two widths, methods among {METHODS}")
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_args(argv)
    return ss.report_main(argv, config, args.out, run, format_report)


if __name__ == "__main__":
    sys.exit(main())
