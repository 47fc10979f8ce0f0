"""The fused row kernel against the ways PyTorch can build one row of J.

One ResNet-18 row: the 62 gradient tensors of torchvision's ``resnet18`` (11.69 M values,
93.5 MB moved in float32: each value read once and written once) copied into a ``[D]`` row.
Methods:

* ``d2d copy``: one device-to-device copy of the same bytes (the floor; bytes read + written);
* ``torch.cat``: ``torch.cat([g.reshape(-1) ...], out=row)``;
* ``copy_ loop``: one ``row_view.copy_(g)`` per parameter;
* ``foreach_copy_``: ``torch._foreach_copy_(row views, grads)`` (the current ``FlatLayout.fill_row``);
* ``unfused minimal``: ``_foreach_copy_`` + ``torch.isfinite(row).all()`` + ``_foreach_norm``
  (a check and per-parameter norms as separate passes);
* ``twin``: :func:`torch_mtlgrad.capture._kernels.fill_row_reference` (the fallback: per-parameter
  NaN/Inf counts and squared norms, separate passes);
* ``fused``: :func:`torch_mtlgrad.capture._kernels.fill_row_fused` (one Triton launch: copy + cast +
  counts + squared norms), for several launch shapes; ``fused, new addresses`` when every call
  sees gradient tensors at new addresses (the address table is copied host -> device);
* the same for bfloat16 gradients into a float32 row (the cast is part of the pass; the d2d
  reference then moves the same 6 bytes per value), and for a block of 10 rows from batched
  gradients (the batched capture modes).

Timing (CUDA): ``device`` = median of CUDA-event times of single calls with the L2 cache
flushed before each (``triton.testing.do_bench``); ``graph`` = one CUDA graph replaying the call on
three rotating input sets (so launch gaps vanish and no set stays in the 50 MB L2), per call;
``eager`` = back-to-back calls without a sync, wall clock per call (what a Python loop costs,
host overhead included).  Every fused result is checked against the twin first.

Usage::

    python benchmarks/kernel_bench.py                 # prints a markdown table
    python benchmarks/kernel_bench.py --out FILE.md   # also writes it
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from torch_mtlgrad import FlatLayout
from torch_mtlgrad.capture._kernels import (
    KernelConfig,
    RowStats,
    fill_row_fused,
    fill_row_reference,
    fill_rows_fused,
    fill_rows_reference,
)

SETS = 3


def resnet18_params() -> list[torch.nn.Parameter]:
    try:
        import torchvision

        return list(torchvision.models.resnet18(weights=None).cuda().parameters())
    except ImportError:  # pragma: no cover - same shapes by hand is not worth it
        sys.exit("torchvision is needed for the ResNet-18 row")


def timed(fn: Callable[[int], None], sets: int = SETS, *, graph_ok: bool = True,
          eager_n: int = 200) -> dict[str, float]:
    """Median microseconds: device (events, L2 flushed), graph replay, eager back-to-back."""
    import triton.testing as tt

    out: dict[str, float] = {}
    k = [0]

    def one() -> None:
        fn(k[0] % sets)
        k[0] += 1

    out["device"] = 1e3 * tt.do_bench(one, warmup=50, rep=300, return_mode="median")
    if graph_ok:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(sets):
                fn(i)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(sets):
                fn(i)
        for _ in range(3):
            g.replay()
        times = []
        for _ in range(15):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(10):
                g.replay()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / (10 * sets))
        out["graph"] = statistics.median(times)
    for i in range(10):
        fn(i % sets)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(eager_n):
        fn(i % sets)
    torch.cuda.synchronize()
    out["eager"] = (time.perf_counter() - t0) * 1e6 / eager_n
    return out


def check_against_twin(layout: FlatLayout, grads: list[torch.Tensor], R: int | None, cfg: KernelConfig) -> str:
    D = layout.numel
    shape = (D,) if R is None else (R, D)
    rows = torch.full(shape, 1234.5, device="cuda")
    twin = torch.full(shape, -1.0, device="cuda")
    f = fill_row_fused if R is None else fill_rows_fused
    r = fill_row_reference if R is None else fill_rows_reference
    a = f(layout, rows, grads, config=cfg)
    b = r(layout, twin, grads)
    same_rows = torch.equal(rows, twin)
    same_bad = torch.equal(a.nonfinite, b.nonfinite)
    err = float(((a.sq_norms.double() - b.sq_norms.double()).abs() / b.sq_norms.double().clamp_min(1e-30)).max())
    ok = same_rows and same_bad and err < 1e-5
    return f"{'ok' if ok else 'MISMATCH'} (rows equal: {same_rows}, counts equal: {same_bad}, max rel. norm diff {err:.1e})"


def bench_one_row(src_dtype: torch.dtype, layout: FlatLayout, params: list[torch.nn.Parameter],
                  add: Callable[..., dict[str, float]], quick: bool) -> None:
    """One ResNet-18 row from gradients of ``src_dtype``: every method, timed through ``add``."""
    D, P = layout.numel, len(params)
    sz = torch.finfo(src_dtype).bits // 8
    nbytes = D * (sz + 4)
    grads = [[(torch.randn_like(p) * 0.01).to(src_dtype) for p in params] for _ in range(SETS)]
    rows = [torch.empty(D, device="cuda") for _ in range(SETS)]
    views = [layout.views(r) for r in rows]
    n_eq = nbytes // 8  # float32 values whose copy moves the same bytes
    src_flat = [torch.randn(n_eq, device="cuda") for _ in range(SETS)]
    dst_flat = [torch.empty(n_eq, device="cuda") for _ in range(SETS)]
    tag = "fp32" if src_dtype == torch.float32 else "bf16->fp32"
    add(f"[{tag}] d2d copy of the same bytes", lambda i: dst_flat[i].copy_(src_flat[i]), nbytes)
    add(f"[{tag}] torch.cat", lambda i: torch.cat([g.reshape(-1) for g in grads[i]], out=rows[i])
        if src_dtype == torch.float32 else torch.cat([g.reshape(-1).float() for g in grads[i]], out=rows[i]),
        nbytes)
    add(f"[{tag}] copy_ loop", lambda i: [v.copy_(g) for v, g in zip(views[i], grads[i])], nbytes)
    add(f"[{tag}] foreach_copy_", lambda i: torch._foreach_copy_(views[i], grads[i]), nbytes)
    flags = [torch.empty((), dtype=torch.bool, device="cuda") for _ in range(SETS)]

    def unfused(i: int) -> None:
        torch._foreach_copy_(views[i], grads[i])
        flags[i].copy_(torch.isfinite(rows[i]).all())
        torch._foreach_norm(views[i])

    add(f"[{tag}] unfused minimal (copy, isfinite(row).all(), norms)", unfused, nbytes)
    outs = [RowStats.empty(P, None, torch.float32, "cuda") for _ in range(SETS)]
    add(f"[{tag}] twin (copy, per-param counts, norms)",
        lambda i: fill_row_reference(layout, rows[i], grads[i], out=outs[i]), nbytes)
    configs = [KernelConfig(), KernelConfig(8192, 2048, 4), KernelConfig(16384, 4096, 8),
               KernelConfig(32768, 4096, 8), KernelConfig(65536, 8192, 8), KernelConfig(8192, 1024, 4),
               KernelConfig(16384, 2048, 8), KernelConfig(fused_reduce=False)]
    if quick:
        configs = [KernelConfig(), KernelConfig(16384, 2048, 8), KernelConfig(65536, 8192, 8),
                   KernelConfig(fused_reduce=False)]
    for cfg in configs:
        status = check_against_twin(layout, grads[0], None, cfg)
        label = (f"[{tag}] fused chunk={cfg.chunk} block={cfg.block} warps={cfg.num_warps}"
                 f"{'' if cfg.fused_reduce else ' +reduce launch'}")
        print(f"  check {label}: {status}", flush=True)
        add(label + ("" if status.startswith("ok") else " (MISMATCH)"),
            lambda i, cfg=cfg: fill_row_fused(layout, rows[i], grads[i], out=outs[i], config=cfg), nbytes)
    fresh = [[g.clone() for g in grads[0]] for _ in range(16)]
    k = [0]

    def new_addresses(i: int) -> None:
        k[0] += 1
        fill_row_fused(layout, rows[i], fresh[k[0] % 16], out=outs[i])

    add(f"[{tag}] fused, new addresses every call (table H2D)", new_addresses, nbytes, graph_ok=False)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=10, help="rows in the block benchmark")
    ap.add_argument("--quick", action="store_true", help="fewer launch shapes in the sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bench needs a CUDA device")
    torch.manual_seed(0)
    params = resnet18_params()
    layout = FlatLayout(params)
    D = layout.numel
    P = len(params)
    lines = [(f"# Fused row kernel: one ResNet-18 row ({P} tensors, D = {D:,}, "
              f"{8 * D / 1e6:.1f} MB moved in float32)"), "",
             (f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
              f"triton {__import__('triton').__version__}"), ""]
    results: list[tuple[str, dict[str, float], float]] = []  # (label, times, bytes)

    def add(label: str, fn: Callable[[int], None], nbytes: float, graph_ok: bool = True,
            sets: int = SETS) -> dict[str, float]:
        t = timed(fn, sets, graph_ok=graph_ok)
        results.append((label, t, nbytes))
        print(f"{label:55s} " + "  ".join(f"{k} {v:8.1f} us" for k, v in t.items()), flush=True)
        return t

    for src_dtype in (torch.float32, torch.bfloat16):
        bench_one_row(src_dtype, layout, params, add, args.quick)
        torch.cuda.empty_cache()

    # A block of rows from batched gradients (the batched / feature capture modes).
    R = args.rows
    bgrads = [[torch.randn(R, *p.shape, device="cuda") * 0.01 for p in params] for _ in range(2)]
    blocks = [torch.empty(R, D, device="cuda") for _ in range(2)]
    n_eq = R * D
    src_flat = [torch.randn(n_eq, device="cuda") for _ in range(2)]
    dst_flat = [torch.empty(n_eq, device="cuda") for _ in range(2)]
    bouts = [RowStats.empty(P, R, torch.float32, "cuda") for _ in range(2)]
    print("  check block:", check_against_twin(layout, bgrads[0], R, KernelConfig()), flush=True)
    nbytes = 8 * R * D
    add(f"[block R={R}] d2d copy of the same bytes", lambda i: dst_flat[i].copy_(src_flat[i]), nbytes, sets=2)

    def foreach_block(i: int) -> None:
        dst, src = [], []
        for j, g in enumerate(bgrads[i]):
            s, e = layout.param_range(j)
            dst.append(blocks[i][:, s:e])
            src.append(g.reshape(R, e - s))
        torch._foreach_copy_(dst, src)

    add(f"[block R={R}] foreach_copy_ into column blocks (current _write_columns)", foreach_block, nbytes,
        sets=2)
    add(f"[block R={R}] twin", lambda i: fill_rows_reference(layout, blocks[i], bgrads[i], out=bouts[i]),
        nbytes, sets=2)
    add(f"[block R={R}] fused", lambda i: fill_rows_fused(layout, blocks[i], bgrads[i], out=bouts[i]),
        nbytes, sets=2)

    # Table.
    lines += ["| method | device us | graph us | eager us/call | GB/s (device) | device / d2d |",
              "|---|---|---|---|---|---|"]
    ref: dict[str, float] = {}
    for label, t, nb in results:
        group = label.split("]")[0] + "]"
        if "d2d copy" in label:
            ref[group] = t["device"]
        ratio = t["device"] / ref[group] if group in ref else float("nan")
        g = f"{t['graph']:.1f}" if "graph" in t else "n/a"
        lines.append(f"| {label} | {t['device']:.1f} | {g} | {t['eager']:.1f} | {nb / t['device'] / 1e3:.0f} | "
                     f"{ratio:.2f}x |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
