"""The fused row kernel (Triton, CUDA) against its PyTorch twin, and the twin against float64.

CPU tests (always run): the twin and the dispatcher's fallback against an independent float64
brute force on random layouts, dtypes, missing and non-finite gradients, with poisoned output
buffers; the reductions to per-module norms; input errors; and, where Triton is installed, the
kernel itself in Triton's CPU interpreter (a subprocess).  CUDA tests (skipped without CUDA, or
without Triton for the kernel ones): the kernel against the twin on random shapes and dtypes,
several launch shapes, misaligned and non-contiguous inputs, poisoned outputs, run-to-run
determinism, a ResNet-18 row, the address-table cache and CUDA-graph replay.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad import FlatLayout
from torch_mtlgrad.capture._kernels import (
    KernelConfig,
    RowStats,
    acc_dtype,
    backend_for,
    fill_row_fused,
    fill_row_reference,
    fill_rows_fused,
    fill_rows_reference,
    fused_rows,
    param_segment_ids,
    segment_sq_norms,
    triton_available,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
POISON = 1234.5
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_kernel = pytest.mark.skipif(not (CUDA and triton_available()),
                                  reason="needs a CUDA device and Triton (the fused kernel)")


# ----------------------------------------------------------------------------------------------
# Inputs and the float64 brute force
# ----------------------------------------------------------------------------------------------
def make_case(shapes, grad_dtypes, row_dtype, none_mask, bad_spots, R, seed, device="cpu",
              noncontig=False):
    """Layout, poisoned rows ``[R, D]`` (or ``[D]`` when R is None), gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    layout = FlatLayout(params)
    lead = () if R is None else (R,)
    grads = []
    for i, (s, dt) in enumerate(zip(shapes, grad_dtypes)):
        if none_mask[i]:
            grads.append(None)
            continue
        g = (torch.randn(*lead, *s, generator=gen) * 3).to(dt)
        flat = g.view(-1)
        for k, val in bad_spots:
            if flat.numel() and k % 7 == i % 7:
                flat[k % flat.numel()] = val
        g = g.to(device)
        if noncontig and g.dim() >= 2 and g.shape[-1] > 1 and g.shape[-2] > 1:
            g = g.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
        grads.append(g)
    rows = torch.full((*lead, layout.numel), POISON, dtype=row_dtype, device=device)
    return layout, rows, grads


def brute_force(layout, rows_shape, row_dtype, grads, R):
    """Expected rows (in row_dtype), float64 squared norms of the written values, counts."""
    lead = () if R is None else (R,)
    segs = []
    for i, g in enumerate(grads):
        n = layout.numels[i]
        if g is None:
            segs.append(torch.zeros(*lead, n, dtype=row_dtype))
        else:
            segs.append(g.detach().cpu().reshape(*lead, n).to(row_dtype))
    expect = torch.cat(segs, dim=-1) if segs else torch.zeros(rows_shape, dtype=row_dtype)
    sq = torch.stack([s.double().square().sum(-1) for s in segs], dim=-1)
    bad = torch.stack([(~torch.isfinite(s)).sum(-1) for s in segs], dim=-1).to(torch.int32)
    return expect, sq, bad


def check_result(rows, stats, expect, sq, bad, row_dtype):
    got = rows.detach().cpu()
    assert not (got == POISON).any() or (expect == POISON).any(), "an output element was not written"
    assert torch.equal(torch.isnan(got), torch.isnan(expect))
    assert torch.equal(torch.nan_to_num(got, nan=0.0), torch.nan_to_num(expect, nan=0.0))
    assert stats.nonfinite.dtype == torch.int32
    assert torch.equal(stats.nonfinite.cpu(), bad)
    got_sq = stats.sq_norms.cpu()
    assert got_sq.dtype == acc_dtype(row_dtype)
    finite = bad == 0
    rtol = 1e-12 if row_dtype == torch.float64 else 2e-5
    assert torch.allclose(got_sq[finite].double(), sq[finite], rtol=rtol, atol=1e-30)
    assert not torch.isfinite(got_sq[~finite]).any()


shape_st = st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple),
                    min_size=1, max_size=6)


@st.composite
def cases(draw, max_rows=3):
    shapes = draw(shape_st)
    P = len(shapes)
    grad_dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=P, max_size=P))
    row_dtype = draw(st.sampled_from(DTYPES))
    none_mask = draw(st.lists(st.booleans(), min_size=P, max_size=P))
    bad_spots = draw(st.lists(st.tuples(st.integers(0, 10_000),
                                        st.sampled_from([float("nan"), float("inf"), -float("inf")])),
                              max_size=3))
    R = draw(st.one_of(st.none(), st.integers(1, max_rows)))
    return shapes, grad_dtypes, row_dtype, none_mask, bad_spots, R, draw(st.integers(0, 2**31 - 1))


def run_twin(layout, rows, grads, R, **kw):
    fn = fill_row_reference if R is None else fill_rows_reference
    return fn(layout, rows, grads, **kw)


def run_fused(layout, rows, grads, R, **kw):
    fn = fill_row_fused if R is None else fill_rows_fused
    return fn(layout, rows, grads, **kw)


# ----------------------------------------------------------------------------------------------
# CPU: the twin, the dispatcher's fallback
# ----------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(cases())
def test_twin_matches_float64_brute_force(case) -> None:
    shapes, gdt, rdt, none_mask, bad_spots, R, seed = case
    layout, rows, grads = make_case(shapes, gdt, rdt, none_mask, bad_spots, R, seed)
    stats = run_twin(layout, rows, grads, R)
    expect, sq, bad = brute_force(layout, rows.shape, rdt, grads, R)
    check_result(rows, stats, expect, sq, bad, rdt)


@settings(max_examples=25, deadline=None)
@given(cases())
def test_cpu_dispatch_is_the_twin_bit_for_bit(case) -> None:
    shapes, gdt, rdt, none_mask, bad_spots, R, seed = case
    layout, rows, grads = make_case(shapes, gdt, rdt, none_mask, bad_spots, R, seed)
    rows2 = rows.clone()
    assert backend_for(rows, grads) == "reference"
    a = run_fused(layout, rows, grads, R)
    b = run_twin(layout, rows2, grads, R)
    assert torch.equal(rows.nan_to_num(), rows2.nan_to_num())
    assert torch.equal(a.nonfinite, b.nonfinite)
    assert torch.equal(a.sq_norms.nan_to_num(), b.sq_norms.nan_to_num())


def test_twin_skips_what_is_not_asked_and_fills_out_buffers() -> None:
    layout, row, grads = make_case([(3, 4), (5,)], [torch.float32] * 2, torch.float32, [False, False],
                                   [], None, 0)
    st_none = fill_row_fused(layout, row, grads, norms=False, check=False)
    assert st_none.sq_norms is None and st_none.nonfinite is None
    assert torch.equal(row, torch.cat([g.flatten() for g in grads]))
    out = RowStats.empty(2, None, torch.float32, "cpu")
    out.sq_norms.fill_(-1)
    out.nonfinite.fill_(-1)
    got = fill_row_fused(layout, row, grads, out=out)
    assert got.sq_norms is out.sq_norms and got.nonfinite is out.nonfinite
    assert torch.allclose(out.sq_norms, torch.stack([g.square().sum() for g in grads]))
    assert out.nonfinite.tolist() == [0, 0]
    with pytest.raises(ValueError, match="sq_norms"):
        fill_row_fused(layout, row, grads, out=RowStats(torch.empty(3), None))
    # A block: stats.row(t) views are filled in place.
    block = RowStats.empty(2, 3, torch.float64, "cpu")
    J = torch.empty(3, layout.numel, dtype=torch.float64)
    for t in range(3):
        fill_row_fused(layout, J[t], grads, out=block.row(t))
    assert torch.allclose(block.sq_norm(), torch.full((3,), float(sum(g.double().square().sum() for g in grads)),
                                                      dtype=torch.float64))
    assert block.nonfinite_count().tolist() == [0, 0, 0]


def test_input_errors_are_clear() -> None:
    layout, row, grads = make_case([(2, 2), (3,)], [torch.float32] * 2, torch.float32, [False, False],
                                   [], None, 0)
    with pytest.raises(ValueError, match=r"row must have shape \[7\]"):
        fill_row_fused(layout, torch.empty(6), grads)
    with pytest.raises(ValueError, match="got 1 gradients for 2"):
        fill_row_fused(layout, row, grads[:1])
    with pytest.raises(ValueError, match="has shape"):
        fill_row_fused(layout, row, [grads[0], torch.zeros(4)])
    with pytest.raises(TypeError, match="floating-point"):
        fill_row_fused(layout, torch.empty(7, dtype=torch.int64), grads)
    with pytest.raises(ValueError, match="unit stride"):
        fill_row_fused(layout, torch.empty(7, 2)[:, 0], grads)
    with pytest.raises(ValueError, match=r"rows must have shape \[R, 7\]"):
        fill_rows_fused(layout, row, grads)
    with pytest.raises(ValueError, match="block must be a power of two"):
        KernelConfig(block=1000)
    with pytest.raises(ValueError, match="chunk must be a positive multiple"):
        KernelConfig(chunk=3000, block=1024)


def test_per_module_norms_from_per_parameter_norms() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3),
                              torch.nn.Linear(3, 2))
    layout = FlatLayout(list(net.parameters()))
    grads = [torch.randn_like(p) for p in layout.params]
    J = torch.empty(2, layout.numel)
    stats = fill_rows_fused(layout, J, [torch.stack([g, 2 * g]) for g in grads])
    seg = param_segment_ids(layout, [net[2], net[0]])
    assert seg.tolist() == [1, 1, 0, 0, -1, -1]
    per_module = segment_sq_norms(stats.sq_norms, seg, 2)
    for k, m in enumerate([net[2], net[0]]):
        want = sum(float(grads[layout.index_of(p)].double().square().sum()) for p in m.parameters())
        assert per_module[0, k].item() == pytest.approx(want, rel=1e-5)
        assert per_module[1, k].item() == pytest.approx(4 * want, rel=1e-5)
    # Per-task norms are the sums over all parameters.
    assert torch.allclose(stats.sq_norm(), J.double().square().sum(1).float(), rtol=1e-5)
    with pytest.raises(ValueError, match="not shared"):
        param_segment_ids(FlatLayout(list(net[0].parameters())), [net[2]])
    with pytest.raises(ValueError, match="param_segments must have shape"):
        segment_sq_norms(stats.sq_norms, seg[:3], 2)


KERNEL_SCRIPT = textwrap.dedent(r"""
    import os, sys, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from torch_mtlgrad import FlatLayout
    from torch_mtlgrad.capture._kernels import fused_rows as fr, reference as ref
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    DT = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    failures = 0
    for trial in range(6):
        P = int(torch.randint(1, 6, (1,), generator=gen))
        # Sizes: multiples of 8 (vector path) and odd ones (scalar path), some over one tile.
        shapes = [(int(torch.randint(0, 3, (1,), generator=gen)) * 40 + int(torch.randint(0, 2, (1,), generator=gen)) * 3,)
                  for _ in range(P)]
        layout = FlatLayout([torch.nn.Parameter(torch.zeros(s)) for s in shapes])
        rdt = [torch.float16, torch.float32, torch.float64][trial % 3]  # the interpreter truncates to bfloat16
        for R in (1, 2):
            grads = []
            for i, s in enumerate(shapes):
                if int(torch.randint(0, 5, (1,), generator=gen)) == 0:
                    grads.append(None)
                    continue
                g = torch.randn(R, *s, generator=gen).to(DT[(trial + i) % 4])
                if rdt == torch.float16 and g.dtype == torch.bfloat16:
                    g = g.float()  # bfloat16 sources also go through the interpreter's own casts
                if g.numel() and i == 0:
                    g.view(-1)[0] = float("nan")
                grads.append(g)
            for fused in (True, False):
                cfg = fr.KernelConfig(chunk=64, block=16, num_warps=1, fused_reduce=fused)
                rows = torch.full((R, layout.numel), 1234.5, dtype=rdt)
                twin_rows = torch.full((R, layout.numel), -1.0, dtype=rdt)
                acc = ref.acc_dtype(rdt)
                kern = ref.RowStats(torch.full((R, P), -7.0, dtype=acc), torch.full((R, P), -7, dtype=torch.int32))
                assert fr._launch(layout, rows, grads, kern, cfg)
                want = ref.fill_rows_reference(layout, twin_rows, grads)
                ok = (torch.equal(rows.nan_to_num(), twin_rows.nan_to_num())
                      and torch.equal(kern.nonfinite, want.nonfinite)
                      and torch.allclose(kern.sq_norms, want.sq_norms, rtol=1e-5, equal_nan=True))
                if not ok:
                    failures += 1
                    print("MISMATCH", shapes, rdt, R, fused, [None if g is None else g.dtype for g in grads])
    print("failures", failures)
    sys.exit(1 if failures else 0)
""")


def test_kernel_in_the_triton_interpreter() -> None:
    """The kernel's logic (tiles, tickets, vector and scalar paths, casts, counts) on the CPU."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("Triton is not installed (the kernel is checked on CUDA instead)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT, "0"], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "failures 0" in res.stdout


# ----------------------------------------------------------------------------------------------
# CUDA: the kernel against the twin
# ----------------------------------------------------------------------------------------------
CONFIGS = [None, KernelConfig(chunk=1024, block=256, num_warps=4),
           KernelConfig(chunk=4096, block=1024, num_warps=4, fused_reduce=False)]


def kernel_vs_twin(layout, rows, grads, R, config, poison_stats=True):
    twin_rows = rows.clone()
    P = len(layout.params)
    out = None
    if poison_stats:
        out = RowStats.empty(P, R, rows.dtype, rows.device)
        out.sq_norms.fill_(float("nan"))
        out.nonfinite.fill_(-99)
    got = run_fused(layout, rows, grads, R, out=out, config=config)
    want = run_twin(layout, twin_rows, grads, R)
    assert torch.equal(torch.isnan(rows), torch.isnan(twin_rows))
    assert torch.equal(rows.nan_to_num(), twin_rows.nan_to_num()), "rows differ from the twin"
    assert torch.equal(got.nonfinite, want.nonfinite)
    fin = want.nonfinite == 0
    rtol = 1e-12 if rows.dtype == torch.float64 else 2e-5
    assert torch.allclose(got.sq_norms[fin], want.sq_norms[fin], rtol=rtol, atol=1e-30)
    assert not torch.isfinite(got.sq_norms[~fin]).any()
    return got


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(cases(max_rows=4), st.booleans())
def test_kernel_matches_twin_on_random_layouts(case, noncontig) -> None:
    shapes, gdt, rdt, none_mask, bad_spots, R, seed = case
    layout, rows, grads = make_case(shapes, gdt, rdt, none_mask, bad_spots, R, seed, device="cuda",
                                    noncontig=noncontig)
    assert backend_for(rows, grads) == "triton"
    kernel_vs_twin(layout, rows, grads, R, CONFIGS[seed % 2])  # default and small tiles
    expect, _, _ = brute_force(layout, rows.shape, rdt, grads, R)
    got_rows = rows.cpu()
    assert torch.equal(got_rows.nan_to_num(), expect.nan_to_num())


@needs_kernel
@pytest.mark.parametrize("row_dtype", DTYPES, ids=lambda d: "row_" + str(d).split(".")[-1])
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=lambda d: "grad_" + str(d).split(".")[-1])
def test_kernel_large_params_many_tiles(row_dtype, grad_dtype) -> None:
    # Sizes around and over a tile, aligned (vector path) and not (scalar path), a None, an
    # empty parameter, and parameters after a misaligned offset.
    shapes = [(3, 3, 3), (64, 64, 3, 3), (1,), (70001,), (0,), (40000,), (17, 33), (256,)]
    none = [False, False, False, False, False, True, False, False]
    configs = CONFIGS if grad_dtype in (torch.float32, torch.bfloat16) else CONFIGS[:1]
    for config in configs:  # default, small tiles, separate reduction
        layout, rows, grads = make_case(shapes, [grad_dtype] * len(shapes), row_dtype, none,
                                        [(5, float("nan")), (12, float("inf"))], None, 1, device="cuda")
        kernel_vs_twin(layout, rows, grads, None, config)
        layout, rows, grads = make_case(shapes, [grad_dtype] * len(shapes), row_dtype, none, [], 3, 2,
                                        device="cuda")
        kernel_vs_twin(layout, rows, grads, 3, config)


@needs_kernel
def test_kernel_is_deterministic_and_reusable() -> None:
    """Same inputs, same bits, launch after launch (the tickets reset themselves)."""
    shapes = [(512, 256, 3, 3), (512,), (1000, 512), (7,)]
    layout, rows, grads = make_case(shapes, [torch.float32] * 4, torch.float32, [False] * 4, [], None, 3,
                                    device="cuda")
    first = fill_row_fused(layout, rows, grads)
    ref_sq, ref_bad, ref_row = first.sq_norms.clone(), first.nonfinite.clone(), rows.clone()
    for _ in range(50):
        rows.fill_(POISON)
        again = fill_row_fused(layout, rows, grads)
        assert torch.equal(again.sq_norms, ref_sq)
        assert torch.equal(again.nonfinite, ref_bad)
        assert torch.equal(rows, ref_row)
    # Mixed dtypes: one launch per dtype group, same statistics.
    mixed = [g.to(dt) for g, dt in zip(grads, [torch.bfloat16, torch.float32, torch.float16, torch.float32])]
    kernel_vs_twin(layout, rows, mixed, None, None)


@needs_kernel
def test_kernel_on_a_resnet18_row() -> None:
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(weights=None).cuda()
    layout = FlatLayout(list(net.parameters()))
    x = torch.randn(4, 3, 64, 64, device="cuda")
    net(x).square().mean().backward()
    grads = [p.grad for p in layout.params]
    rows = torch.full((layout.numel,), POISON, device="cuda")
    got = kernel_vs_twin(layout, rows, grads, None, None)
    assert torch.allclose(got.sq_norm(), torch.stack([g.double().square().sum() for g in grads]).sum().float(),
                          rtol=1e-5)
    half = [g.to(torch.bfloat16) for g in grads]
    kernel_vs_twin(layout, rows, half, None, None)


@needs_kernel
def test_address_tables_are_cached_and_bounded() -> None:
    layout, rows, grads = make_case([(300,), (5, 5)], [torch.float32] * 2, torch.float32, [False] * 2, [],
                                    None, 4, device="cuda")
    fill_row_fused(layout, rows, grads)
    plan = next(iter(fused_rows._PLANS[layout].values()))
    (group,) = plan.groups
    n = len(group.tables)
    fill_row_fused(layout, rows, grads)
    assert len(group.tables) == n  # same addresses: no new table, no host -> device copy
    for _ in range(fused_rows._TABLE_CACHE + 3):
        fill_row_fused(layout, rows, [g.clone() for g in grads])
    assert len(group.tables) <= fused_rows._TABLE_CACHE


@needs_kernel
def test_kernel_replays_in_a_cuda_graph() -> None:
    """Static gradient buffers: the fill is captured once and replayed on new values."""
    layout, rows, grads = make_case([(64, 3, 3, 3), (64,), (129, 7)], [torch.float32, torch.bfloat16,
                                    torch.float32], torch.float32, [False] * 3, [], None, 5, device="cuda")
    out = RowStats.empty(3, None, torch.float32, "cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fill_row_fused(layout, rows, grads, out=out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fill_row_fused(layout, rows, grads, out=out)
    for k in range(3):
        for g in grads:
            g.copy_(torch.randn_like(g, dtype=torch.float32) * (k + 1))
        grads[0].view(-1)[k] = float("nan")
        rows.fill_(POISON)
        graph.replay()
        twin_rows = torch.empty_like(rows)
        want = fill_row_reference(layout, twin_rows, grads)
        assert torch.equal(rows.nan_to_num(), twin_rows.nan_to_num())
        assert torch.equal(out.nonfinite, want.nonfinite)
        assert out.nonfinite.tolist() == [1, 0, 0]
        assert torch.allclose(out.sq_norms[1:], want.sq_norms[1:], rtol=2e-5)


@needs_cuda
def test_cuda_fallback_without_triton_is_the_twin(monkeypatch) -> None:
    monkeypatch.setenv("TORCH_MTLGRAD_TRITON", "0")
    layout, rows, grads = make_case([(33,), (4, 4)], [torch.float16, torch.float32], torch.float32,
                                    [False, False], [(1, float("inf"))], None, 6, device="cuda")
    assert backend_for(rows, grads) == "reference"
    twin_rows = rows.clone()
    a = fill_row_fused(layout, rows, grads)
    b = fill_row_reference(layout, twin_rows, grads)
    assert torch.equal(rows.nan_to_num(), twin_rows.nan_to_num())
    assert torch.equal(a.nonfinite, b.nonfinite)
