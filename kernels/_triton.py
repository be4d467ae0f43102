"""Triton source of the fused "GEMM + bias + row reduction" kernels. Imported only when a Triton
backend runs (``sdfm.kernels.reductions`` imports it lazily), so sdfm works without triton installed.

The kernel functions are left undecorated and wrapped by ``compiled`` when launched, in the mode
asked for: ``@triton.jit`` would pick the compiler or the interpreter from TRITON_INTERPRET when this
module is imported, and the compile check in tests/test_kernels.py needs the compiler's version under
the interpreter too. (Triton's own library functions, tl.max and friends, are fixed when triton is
imported; ``reductions.triton_problem`` reports a TRITON_INTERPRET changed after that.) A consequence:
a kernel cannot call a helper function of its own (a compiled kernel needs its helpers to be jit
functions, an interpreted one needs them plain), so the tile loop is written out in both kernels.

Both kernels score a (BLOCK_M, BLOCK_N) tile S = A_tile B_tile^T + h as a sum of ``tl.dot`` over
BLOCK_D-wide slices of d, with fp32 accumulation, and fold it into a per-row running reduction over
the columns [split * cols_per_split, (split + 1) * cols_per_split) of their grid column ``split``.
"""

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))  # a kernel may only read constexpr globals


def lse_kernel(
    a_ptr,
    b_ptr,
    h_ptr,
    out_ptr,
    n,
    m,
    d,
    stride_a,
    stride_b,
    cols_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[split, i] = logsumexp_{j in split} (h_j + <a_i, b_j>), streaming (online) over column tiles.

    a (n, d) and b (m, d) have unit stride along d; h (m,) and out (splits, n) are fp32.
    UPCAST widens 16-bit tiles to fp32 before the dot (interpreter only, see ``reductions``).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    start = tl.program_id(1) * cols_per_split
    stop = tl.minimum(start + cols_per_split, m)
    run_max = tl.full([BLOCK_M], NEG_INF, tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(start, stop, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < stop
        b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_b
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, d, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < d
            a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        # Masked columns get h = -inf, hence a score of -inf and no weight.
        h = tl.load(h_ptr + cols, mask=col_ok, other=NEG_INF)
        s = acc + h[None, :]
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        # A row whose scores are all -inf so far keeps sum 0 instead of exp(-inf - -inf) = NaN.
        shift = tl.where(new_max == NEG_INF, 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        run_max = new_max
    out = run_max + tl.log(run_sum)  # -inf (not NaN) for a row with no finite score
    tl.store(out_ptr + tl.program_id(1) * n + rows, out, mask=row_ok)


def argmax_kernel(
    a_ptr,
    b_ptr,
    h_ptr,
    keys_ptr,
    val_ptr,
    idx_ptr,
    n,
    m,
    d,
    stride_a,
    stride_b,
    cols_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    GUMBEL: tl.constexpr,
):
    """val[split, i], idx[split, i] = max, argmax_{j in split} (h_j + <a_i, b_j> [+ G_ij]).

    Ties go to the smallest j. With GUMBEL, G_ij = -log(-log(u)), u = (hash32(key_i + j) + 0.5) / 2^32
    with keys (n,) the int32 bit patterns of the row keys and hash32 Wellons' lowbias32, in uint32
    arithmetic (wrapping multiplication is exactly the mod-2^32 product of ``sinkhorn._mul32``), and
    the logs in fp64 rounded once to fp32, as ``sdfm.ot.gumbel.gumbel`` does.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    start = tl.program_id(1) * cols_per_split
    stop = tl.minimum(start + cols_per_split, m)
    if GUMBEL:
        keys = tl.load(keys_ptr + rows, mask=row_ok, other=0).to(tl.uint32, bitcast=True)
    best = tl.full([BLOCK_M], NEG_INF, tl.float32)
    arg = tl.zeros([BLOCK_M], tl.int32) + start
    for j0 in range(start, stop, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < stop
        b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_b
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, d, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < d
            a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        h = tl.load(h_ptr + cols, mask=col_ok, other=0.0)
        s = acc + h[None, :]
        if GUMBEL:
            x = keys[:, None] + cols.to(tl.uint32)[None, :]
            x = x ^ (x >> 16)
            x = x * 0x7FEB352D
            x = x ^ (x >> 15)
            x = x * 0x846CA68B
            x = x ^ (x >> 16)
            u = (x.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # 2^-32
            s = s + (-tl.log(-tl.log(u))).to(tl.float32)
        s = tl.where(col_ok[None, :], s, NEG_INF)
        tile_best = tl.max(s, axis=1)
        tile_arg = tl.argmax(s, axis=1, tie_break_left=True)
        better = tile_best > best  # strict: on a tie the earlier tile (smaller j) wins
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg + j0, arg)
    out = tl.program_id(1) * n + rows
    tl.store(val_ptr + out, best, mask=row_ok)
    tl.store(idx_ptr + out, arg.to(tl.int64), mask=row_ok)


_COMPILED: dict[tuple[str, bool], object] = {}


def compiled(name: str, interpret: bool):
    """The kernel ``name`` wrapped for launching: ``kernel[grid](...)``.

    Args:
        name: 'lse_kernel' or 'argmax_kernel'.
        interpret: run through Triton's CPU interpreter instead of compiling for the GPU.
    """
    key = (name, interpret)
    if key not in _COMPILED:
        fn = globals()[name]
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _COMPILED[key] = InterpretedFunction(fn)
        else:
            _COMPILED[key] = triton.runtime.jit.JITFunction(fn)
    return _COMPILED[key]
