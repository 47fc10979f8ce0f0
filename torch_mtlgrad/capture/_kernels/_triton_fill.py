"""The Triton kernels behind :mod:`torch_mtlgrad.capture._kernels.fused_rows` (imported on first use).

``fill_rows_kernel``: program ``(tile, r)`` copies one tile (``CHUNK`` elements) of one
parameter's gradient into row ``r`` of a block of ``J``, casting to the row's dtype, and writes the
tile's partial sum of squares and NaN/Inf count; with ``FUSED`` the last program of each
(row, parameter) -- found with an atomic ticket -- adds the partials in a fixed order into the
per-parameter statistics and resets the ticket.  ``reduce_kernel`` does that last step as a
separate launch (``FUSED=False``).  See ``fused_rows`` for the tables' layout.
"""

import triton
import triton.language as tl


@triton.jit
def _copy_tile(src, dst, start, n, has_src, ACC: tl.constexpr, CHUNK: tl.constexpr,
               BLOCK: tl.constexpr, VEC: tl.constexpr, VIA_F32: tl.constexpr):
    # src/dst: pointers to the parameter's first element in this row; n: its numel.  Alignment
    # is visible through the caller's arguments; VEC keeps the two paths apart as two
    # instantiations (the analysis merges what all call sites of one instantiation pass).
    acc = tl.zeros([BLOCK], dtype=ACC)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for k in tl.static_range(CHUNK // BLOCK):
        idx = start + k * BLOCK + tl.arange(0, BLOCK)
        m = idx < n
        x = tl.load(src + idx, mask=m & has_src, other=0.0)
        if VIA_F32:
            # float64 -> 16-bit goes through float32, as PyTorch's casts do (same bits).
            x = x.to(tl.float32)
        y = x.to(dst.dtype.element_ty)
        tl.store(dst + idx, y, mask=m)
        yf = y.to(ACC)
        acc += yf * yf
        # NaN and +-Inf fail the ordered comparison with +Inf.
        bad += (~(tl.abs(yf) < float("inf"))).to(tl.int32)
    return tl.sum(acc, axis=0), tl.sum(bad, axis=0)

@triton.jit
def _finish_param(partial, partial_bad, base, nt, sq_out, bad_out, MAXT: tl.constexpr):
    j = tl.arange(0, MAXT)
    mj = j < nt
    ps = tl.load(partial + base + j, mask=mj, other=0.0, cache_modifier=".cg")
    pb = tl.load(partial_bad + base + j, mask=mj, other=0, cache_modifier=".cg")
    tl.store(sq_out, tl.sum(ps, axis=0))
    tl.store(bad_out, tl.sum(pb, axis=0))

# Integer arguments are not specialised (Triton would otherwise compile a variant for every
# combination of "== 1" and "divisible by 16" among them).
@triton.jit(do_not_specialize=["dst_stride", "row_vec", "sq_stride", "bad_stride", "n_tiles", "Pg"])
def fill_rows_kernel(
    tab,          # *i64 [2, Pg]: source addresses (0 = None), vector-path flags
    meta,         # *i64 [4, Pg + 1]: numel, column offset, layout index, first tile
    tile_param,   # *i32 [n_tiles]: group-local parameter of each tile
    dst,          # row 0 of the block
    dst_stride,   # elements between rows of the block
    row_vec,      # 1 when the rows allow 16-byte access (base and stride), else 0
    partial,      # *ACC [R, n_tiles]
    partial_bad,  # *i32 [R, n_tiles]
    tickets,      # *i32 [R, Pg], all zero between launches
    sq_out, sq_stride,
    bad_out, bad_stride,
    n_tiles, Pg,
    ACC: tl.constexpr, SRC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    MAXT: tl.constexpr, FUSED: tl.constexpr, VIA_F32: tl.constexpr,
):
    tile = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    q = tl.load(tile_param + tile)
    raw = tl.load(tab + q)
    vec = (tl.load(tab + Pg + q) != 0) & (row_vec != 0)
    n = tl.load(meta + q)
    off = tl.load(meta + (Pg + 1) + q)
    gidx = tl.load(meta + 2 * (Pg + 1) + q)
    first = tl.load(meta + 3 * (Pg + 1) + q)
    nt = tl.load(meta + 3 * (Pg + 1) + q + 1) - first
    start = (tile - first).to(tl.int64) * CHUNK
    has_src = raw != 0
    if vec:
        # Alignment the compiler can see: (x // k) * k == x on this path (the host checked), and
        # Triton infers divisibility by k from it; the source pointer needs an explicit hint on
        # an op of this branch alone (a hint on a shared value would leak into the other path).
        n_v = (n // 8) * 8
        src_v = tl.multiple_of(((raw // 16) * 16).to(tl.pointer_type(SRC)), 16) + r * n_v
        d_v = dst + (r * ((dst_stride // 8) * 8) + (off // 8) * 8)
        s, b = _copy_tile(src_v, d_v, start, n_v, has_src, ACC, CHUNK, BLOCK, True, VIA_F32)
    else:
        src = raw.to(tl.pointer_type(SRC)) + r * n
        d = dst + (r * dst_stride + off)
        s, b = _copy_tile(src, d, start, n, has_src, ACC, CHUNK, BLOCK, False, VIA_F32)
    tl.store(partial + r * n_tiles + tile, s)
    tl.store(partial_bad + r * n_tiles + tile, b)
    if FUSED:
        # Make this CTA's partials visible before taking a ticket (release), and see the
        # other programs' partials after it (acquire).
        tl.debug_barrier()
        done = tl.atomic_add(tickets + r * Pg + q, 1, sem="acq_rel")
        if done == nt - 1:
            _finish_param(partial, partial_bad, r * n_tiles + first, nt,
                          sq_out + r * sq_stride + gidx, bad_out + r * bad_stride + gidx, MAXT)
            tl.store(tickets + r * Pg + q, 0)

@triton.jit(do_not_specialize=["sq_stride", "bad_stride", "n_tiles", "Pg"])
def reduce_kernel(meta, partial, partial_bad, sq_out, sq_stride, bad_out, bad_stride,
                  n_tiles, Pg, MAXT: tl.constexpr):
    q = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    gidx = tl.load(meta + 2 * (Pg + 1) + q)
    first = tl.load(meta + 3 * (Pg + 1) + q)
    nt = tl.load(meta + 3 * (Pg + 1) + q + 1) - first
    _finish_param(partial, partial_bad, r * n_tiles + first, nt,
                  sq_out + r * sq_stride + gidx, bad_out + r * bad_stride + gidx, MAXT)

