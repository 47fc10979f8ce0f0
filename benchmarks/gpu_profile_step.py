"""Where a multi-task step spends its time on the GPU: torch.profiler over a few steps of
``benchmarks/step_speed.py``'s methods (same model, batch and step function).

Prints, per method, the top operators by CUDA time and by CPU time (self), and the share of the
step the GPU is busy (sum of kernel time over the step's wall time: well under 100% means the
step waits on the host: Python, launches, synchronisations).

Usage::

    python benchmarks/gpu_profile_step.py --tasks 40 --methods auto:mgda,torchjd:upgrad
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--methods", default="auto:mgda,auto:mgda+unchecked,torchjd:upgrad")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    cfg = step_speed.Config(tasks=(args.tasks,), device="cuda")
    setup = step_speed.build_setup(cfg, args.tasks, torch.device("cuda"))
    chosen = step_speed.select_methods([k.strip() for k in args.methods.split(",")])
    for m in chosen:
        try:
            step = m.build(setup)
            for _ in range(3):
                step()
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"## {m.key}: cannot run ({type(exc).__name__}: {exc})")
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / args.steps
        ka = prof.key_averages()
        # Kernel rows only (operator rows repeat the time of the kernels they launch).
        gpu_total = sum(e.self_device_time_total for e in ka
                        if str(getattr(e, "device_type", "")).endswith("CUDA")) / 1e3 / args.steps
        print(f"\n## {m.key}, T = {args.tasks}: {wall:.1f} ms/step wall (profiled), GPU busy "
              f"{gpu_total:.1f} ms/step ({100 * gpu_total / wall:.0f}%)")
        print("\n### by CUDA time\n")
        print(ka.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=60))
        print("\n### by CPU time\n")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
        from torch_mtlgrad.capture._kernels import fused_rows

        for plans in list(fused_rows._PLANS.values()):
            for plan in plans.values():
                for g in plan.groups:
                    print(f"fused row kernel, group of {len(g.members)} tensors ({g.src_dtype}): "
                          f"address tables reused {g.hits} times, copied to the device {g.misses} times")
        del step
        setup.zero_grad()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
