"""CoNAL and CoNAL-Pro on generated tasks with planted groups: the search finds them.

The data (``torch_mtlgrad.conal.synthetic.grouped_regression``): every group of tasks reads its
own random teacher feature of the input; tasks of a group agree, tasks of different groups need
different features.  The network is a chain of three modules whose last one is a narrow
bottleneck (as wide as one group needs), followed by a linear head per task, so a fully shared
encoder (hard parameter sharing, HPS) cannot serve two groups at once.

What the script does, in order:

1. HPS baseline: the whole chain shared, trained with random loss weighting (RLW), with conflict
   noticing in monitor-only mode (``zero=False``) recording the per-module ratio of task pairs
   whose gradients have a negative cosine (the paper's Table 1 row "HPS").
2. Pre-training (Algorithm 1 starts from pre-trained weights): the HPS network, plain sum, a few
   hundred steps.
3. CoNAL: the search space over the pre-trained chain, the first-order bilevel search with
   conflict noticing (eq. 5), ``derive()``, and retraining the derived network from scratch with
   RLW (the ratio of conflicting pairs on its shared modules is recorded again).
4. CoNAL-Pro from the same pre-trained weights: the groups it finds and its retrained network.
5. Single-task networks (STL) for reference.

Run (about 1 minute per seed on one CPU core)::

    python examples/conal_grouped_tasks.py --seeds 0,1,2,3,4 --out DIR

It writes ``conal.json`` (the numbers) and ``conal.png`` (the first seed's conflict ratios and
``p*``; needs matplotlib) into ``--out`` (default: a new folder under the current directory,
printed); ``--quiet`` hides the progress bars (tqdm).  ``--quick`` runs fewer steps;
``tests/conal/test_grouped.py`` asserts the claims on a smaller run.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import torch
from _common import (  # examples/_common.py
    add_output_args,
    nonnegative_float,
    nonnegative_int,
    output_dir,
    positive_float,
    positive_int,
    progress,
    seed_list,
    table,
)
from torch import Tensor, nn

from torch_mtlgrad import aggregators
from torch_mtlgrad.conal import (
    Architecture,
    BilevelSearch,
    BranchedNetwork,
    ConflictNoticing,
    ProgressiveSearch,
    SearchSpace,
    build_network,
    count_parameters,
    derive,
    reinitialize,
    retrain_optimizer,
)
from torch_mtlgrad.conal.synthetic import GroupedTasks, grouped_regression

K = 3  # modules in the chain


def make_chain(dim: int, width: int, bottleneck: int) -> list[nn.Module]:
    return [
        nn.Sequential(nn.Linear(dim, width), nn.Tanh()),
        nn.Sequential(nn.Linear(width, width), nn.Tanh()),
        nn.Sequential(nn.Linear(width, bottleneck), nn.Tanh()),
    ]


def make_heads(T: int, bottleneck: int) -> list[nn.Module]:
    return [nn.Linear(bottleneck, 1) for _ in range(T)]


def task_losses(outs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    return [nn.functional.mse_loss(o, y) for o, y in zip(outs, ys)]


def evaluate(net: nn.Module, x: Tensor, ys: list[Tensor]) -> list[float]:
    with torch.no_grad():
        return [float(v) for v in task_losses(net(x), ys)]


def level_conflicts(net: BranchedNetwork, noticing: ConflictNoticing | None) -> list[float | None]:
    """Per level 1..K: the conflict ratio of the trunk module there (since the last
    ``reset_counts``), None where no module of that level is shared by two tasks."""
    out: list[float | None] = [None] * K
    if noticing is None:
        return out
    ratio = noticing.conflict_ratio("total").tolist()
    for k, r in zip(range(len(net.trunk)), ratio):
        out[k] = r
    return out


def retrain(net: BranchedNetwork, data: GroupedTasks, steps: int, lr: float, aggregator: str,
            eval_every: int = 20, early: int = 100,
            args: argparse.Namespace | None = None, desc: str = "retrain") -> dict[str, Any]:
    """Train from scratch; report the test losses at the best validation loss (early stopping),
    and the per-module conflict ratios over the first ``early`` steps and over the whole run."""
    reinitialize(net)
    trunk_shared = [f for f, tasks in net.module_tasks()[: len(net.trunk)] if len(tasks) >= 2]
    noticing = ConflictNoticing(trunk_shared, zero=False, window=steps) if trunk_shared else None
    base = torch.optim.Adam(net.parameters(), lr=lr)
    if net.shared_parameters():
        opt: Any = retrain_optimizer(net, base, aggregator, plugins=[noticing] if noticing else ())
    else:
        opt = None
    best = (float("inf"), None, 0)
    conflicts_early: list[float | None] = [None] * K
    for s in progress(range(steps), args or argparse.Namespace(quiet=True), desc=desc):
        if s == early:
            conflicts_early = level_conflicts(net, noticing)
        losses = task_losses(net(data.x_train), data.y_train)
        if opt is not None:
            opt.zero_grad()
            opt.backward(losses)
            opt.step()
        else:
            base.zero_grad()
            sum(losses).backward()
            base.step()
        if (s + 1) % eval_every == 0:
            val = sum(evaluate(net, data.x_val, data.y_val))
            if val < best[0]:
                best = (val, evaluate(net, data.x_test, data.y_test), s + 1)
    assert best[1] is not None
    return {"test": best[1], "test_mean": sum(best[1]) / len(best[1]), "best_step": best[2],
            "params": count_parameters(net), "conflicts": level_conflicts(net, noticing),
            "conflicts_early": conflicts_early}


def pretrain(data: GroupedTasks, args: argparse.Namespace) -> BranchedNetwork:
    torch.manual_seed(args.seed)
    T = data.num_tasks
    net = build_network(Architecture.hard_sharing(T, K), make_chain(args.dim, args.width, args.bottleneck),
                        make_heads(T, args.bottleneck), reinit=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    for _ in progress(range(args.pretrain_steps), args, desc="pre-training"):
        opt.zero_grad()
        sum(task_losses(net(data.x_train), data.y_train)).backward()
        opt.step()
    return net


def alpha_optimizer(params: list[nn.Parameter], args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD keeps the size of an alpha step proportional to the validation-loss gradient, so a
    task that both branches serve equally stays near a tie; Adam (DARTS' default) normalises
    every step and turns noise-level differences into decisions."""
    if args.alpha_opt == "sgd":
        return torch.optim.SGD(params, lr=args.alpha_lr)
    return torch.optim.Adam(params, lr=args.alpha_lr, betas=(0.5, 0.999), weight_decay=1e-3)


def conal(data: GroupedTasks, pre: BranchedNetwork, args: argparse.Namespace) -> dict[str, Any]:
    import copy

    T = data.num_tasks
    space = SearchSpace(copy.deepcopy(list(pre.trunk)), T, copy.deepcopy(list(pre.heads)))
    search = BilevelSearch(
        space,
        torch.optim.Adam(list(space.weight_parameters()), lr=args.lr),
        alpha_optimizer(space.arch_parameters(), args),
        window=args.search_steps,
    )
    val = lambda: task_losses(space(data.x_val), data.y_val)
    train = lambda: task_losses(space(data.x_train), data.y_train)
    pstar = []
    for s in progress(range(args.search_steps), args, desc="CoNAL search"):
        if s < args.alpha_warmup:
            search.weight_step(train())
        else:
            search.step(val, train)
        pstar.append(int(search.noticing.diagnostics["conflict_pstar"]))
    d = derive(space)
    return {
        "derived": d,
        "branch_weights": space.branch_weights().detach().tolist(),
        "search_conflicts": search.noticing.conflict_ratio("total").tolist(),
        "pstar": pstar,
    }


def conal_pro(data: GroupedTasks, pre: BranchedNetwork, args: argparse.Namespace) -> Any:
    import copy

    T = data.num_tasks
    pro = ProgressiveSearch(
        copy.deepcopy(list(pre.trunk)), T, copy.deepcopy(list(pre.heads)),
        weight_optimizer=lambda ps: torch.optim.Adam(ps, lr=args.lr),
        alpha_optimizer=lambda ps: alpha_optimizer(ps, args),
        notice=args.pro_notice, margin=args.pro_margin,
    )

    def losses(x: Tensor, ys: list[Tensor]) -> list[Tensor]:
        return [nn.functional.mse_loss(o, ys[t]) for t, o in zip(pro.tasks, pro.space(x))]

    while not pro.done:
        for s in progress(range(args.pro_steps), args, desc="CoNAL-Pro stage"):
            if s >= args.alpha_warmup:
                pro.alpha_step(losses(data.x_val, data.y_val))
            pro.weight_step(losses(data.x_train, data.y_train))
        pro.end_stage()
    return pro.result()


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def run_seed(args: argparse.Namespace) -> dict[str, Any]:
    """Everything above for ``args.seed``: prints the tables, returns the numbers."""
    t0 = time.time()
    groups = tuple(args.groups)
    data = grouped_regression(groups, dim=args.dim, features=args.bottleneck, n_train=args.n_train,
                              noise=args.noise, within=0.0, seed=args.seed)
    T = data.num_tasks
    print(f"\n=== seed {args.seed}: {T} tasks, planted groups {data.groups}, noise variance {args.noise ** 2:.3f}")

    def fresh(arch: Architecture) -> BranchedNetwork:
        return build_network(arch, make_chain(args.dim, args.width, args.bottleneck), make_heads(T, args.bottleneck))

    torch.manual_seed(args.seed + 1)
    hps = retrain(fresh(Architecture.hard_sharing(T, K)), data, args.retrain_steps, args.lr, args.aggregator,
                  args=args, desc="HPS")
    torch.manual_seed(args.seed + 1)
    stl = retrain(fresh(Architecture.single_task(T, K)), data, args.retrain_steps, args.lr, args.aggregator,
                  args=args, desc="STL")
    pre = pretrain(data, args)
    c = conal(data, pre, args)
    arch = c["derived"].architecture
    torch.manual_seed(args.seed + 1)
    conal_rt = retrain(c["derived"].network, data, args.retrain_steps, args.lr, args.aggregator,
                       args=args, desc="CoNAL retrain")
    pro = conal_pro(data, pre, args)
    torch.manual_seed(args.seed + 1)
    pro_rt = retrain(pro.network, data, args.retrain_steps, args.lr, args.aggregator,
                     args=args, desc="CoNAL-Pro retrain")
    elapsed = time.time() - t0
    planted = {t: g for g, ts in enumerate(data.groups) for t in ts}

    print("\nTable 1 analogue: % of task pairs with a negative gradient cosine per shared module,")
    print("over the first 100 training steps | over the whole run (- : no module of that level is")
    print("shared by two tasks; a task that does not use a module has a zero gradient there)")
    rows = [[f"{name} (training)", *map(fmt, r["conflicts_early"]), "|", *map(fmt, r["conflicts"])]
            for name, r in (("HPS", hps), ("CoNAL derived", conal_rt), ("CoNAL-Pro derived", pro_rt))]
    rows.append(["CoNAL search (raw, eq. 4)", *[""] * K, "|", *map(fmt, c["search_conflicts"])])
    levels = [f"f_S^{k + 1}" for k in range(K)]
    print(table(["", *levels, "|", *levels], rows))
    ps = c["pstar"]
    print("\nCoNAL search: p* = first conflicting module per step; share of steps with p* = "
          + ", ".join(f"{k}: {ps.count(k) / len(ps):.2f}" for k in range(K + 1)) + f" ({K} = none)")
    print("branch weights softmax(alpha_t):")
    for t, w in enumerate(c["branch_weights"]):
        print(f"  task {t}: " + " ".join(f"{v:.2f}" for v in w))
    print(f"CoNAL derived branch points {arch.branch_points} (P = {K + 1} is fully shared), "
          f"module sharing per level {arch.levels()}")
    print(f"  parameters: search space {c['derived'].params_before}, derived {c['derived'].params_after}")
    print(f"CoNAL-Pro groups {pro.groups} (planted {data.groups}), branch points {pro.architecture.branch_points}")
    for st in pro.stages:
        print(f"  stage {st['stage']} (branch point {st['branch_point']}): tasks {st['tasks']}, "
              f"shared-branch weight {[round(w[0], 2) for w in st['weights']]}, subgroup {st['group']}")
    print("\nHeld-out test MSE (at the best validation step), retrained from scratch with "
          f"{args.aggregator}:")
    print(table(["network", "mean", "params", *(f"task {t}" for t in range(T))],
                [[name, r["test_mean"], r["params"], *(f"{v:.3f}" for v in r["test"])]
                 for name, r in (("HPS", hps), ("STL", stl), ("CoNAL", conal_rt),
                                 ("CoNAL-Pro", pro_rt))]))
    print(f"\ntotal {elapsed:.0f} s")

    result = {
        "args": vars(args), "planted_groups": data.groups, "seconds": elapsed,
        "hps": hps, "stl": stl, "conal": {**conal_rt, "branch_points": arch.branch_points,
                                          "architecture": arch.to_dict(),
                                          "search_conflicts": c["search_conflicts"],
                                          "branch_weights": c["branch_weights"],
                                          "params_search_space": c["derived"].params_before},
        "conal_pro": {**pro_rt, "groups": pro.groups, "architecture": pro.architecture.to_dict()},
        "pstar": c["pstar"],
        "pro_exact": sorted(pro.groups) == sorted(data.groups),
        "conal_separates": all(len({planted[t] for t in block}) == 1 for block in arch.levels()[-1]),
    }
    return result


def group_sizes(text: str) -> list[int]:
    """argparse ``type=``: comma-separated group sizes, each >= 1, at least two groups."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 4,2, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"need at least two groups of at least one task, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=group_sizes, default=[4, 2], help="tasks per planted group, e.g. 4,2")
    ap.add_argument("--dim", type=positive_int, default=16)
    ap.add_argument("--width", type=positive_int, default=32)
    ap.add_argument("--bottleneck", type=positive_int, default=1, help="width of the last module = teacher features per group")
    ap.add_argument("--n-train", type=positive_int, default=256)
    ap.add_argument("--noise", type=nonnegative_float, default=0.2)
    ap.add_argument("--lr", type=positive_float, default=1e-2)
    ap.add_argument("--alpha-opt", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--alpha-lr", type=positive_float, default=1.0)
    ap.add_argument("--pro-notice", choices=["path", "chain", "decision"], default="path")
    ap.add_argument("--pro-margin", type=nonnegative_float, default=0.1)
    ap.add_argument("--alpha-warmup", type=nonnegative_int, default=100, help="weight-only steps before alpha moves")
    ap.add_argument("--pretrain-steps", type=nonnegative_int, default=600)
    ap.add_argument("--search-steps", type=positive_int, default=400)
    ap.add_argument("--pro-steps", type=positive_int, default=300, help="steps per CoNAL-Pro stage")
    ap.add_argument("--retrain-steps", type=positive_int, default=600)
    ap.add_argument("--aggregator", default="rlw", help="retraining aggregator (eq. 3: rlw)")
    ap.add_argument("--seed", type=nonnegative_int, default=0)
    ap.add_argument("--seeds", type=seed_list, default=None, help="comma-separated seeds to run one after the other, e.g. 0,1,2")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--quick", action="store_true", help="a smaller run (fewer steps)")
    ap.add_argument("--no-plot", action="store_true", help="no figure")
    add_output_args(ap)
    args = ap.parse_args(argv)
    try:
        aggregators.get(args.aggregator)
    except ValueError as e:
        ap.error(f"--aggregator: {e}")
    if args.quick:
        args.search_steps, args.pro_steps, args.retrain_steps = 250, 200, 300
    torch.set_num_threads(args.threads)
    # in a derived network some tasks use no shared module at all: their zero row is expected
    warnings.filterwarnings("ignore", message=".*does not depend on the shared parameters.*")
    seeds = args.seeds or [args.seed]
    results = []
    for seed in seeds:
        args.seed = seed
        results.append(run_seed(args))
    if len(results) > 1:
        n = len(results)
        print(f"\n=== summary over seeds {seeds}")
        print(f"  CoNAL-Pro recovers the planted groups exactly: {sum(r['pro_exact'] for r in results)}/{n}")
        print(f"  CoNAL's derived network shares no last-level module across planted groups: "
              f"{sum(r['conal_separates'] for r in results)}/{n}")
        for key, name in (("hps", "HPS"), ("stl", "STL"), ("conal", "CoNAL"), ("conal_pro", "CoNAL-Pro")):
            vals = [r[key]["test_mean"] for r in results]
            print(f"  test MSE {name:10s} mean {sum(vals) / n:.4f}  per seed " + " ".join(f"{v:.4f}" for v in vals))
        print(f"  total {sum(r['seconds'] for r in results):.0f} s")
    out = results[0] if len(results) == 1 else {"seeds": seeds, "runs": results}
    folder = output_dir(args, "conal")
    with open(folder / "conal.json", "w") as f:
        json.dump(out, f, indent=1, default=list)
    print(f"wrote {folder / 'conal.json'}")
    if not args.no_plot:
        try:
            plot(results[0], results[0]["pstar"], str(folder / "conal.png"))
            print(f"wrote {folder / 'conal.png'}")
        except ImportError:
            print("matplotlib is not installed (pip install matplotlib): no figure")
    return out


def plot(result: dict[str, Any], pstar: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    rows = [("HPS", result["hps"]["conflicts"]), ("CoNAL search", result["conal"]["search_conflicts"]),
            ("CoNAL derived", result["conal"]["conflicts"]), ("CoNAL-Pro", result["conal_pro"]["conflicts"])]
    width = 0.2
    for i, (name, vals) in enumerate(rows):
        a.bar([k + i * width for k in range(K)], [100 * (v or 0.0) for v in vals], width, label=name)
    a.set_xticks([k + 1.5 * width for k in range(K)], [f"f_S^{k + 1}" for k in range(K)])
    a.set_ylabel("conflicting pairs (%)")
    a.legend(fontsize=7)
    b.plot(pstar, ".", ms=2)
    b.set_xlabel("search step")
    b.set_ylabel(f"p* (first conflicting module, {K} = none)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
