"""int4_g32 decode matmuls on AVX-512 VNNI (`vpdpbusd`), the way llama.cpp runs q4_0: activations in int8 blocks.

A decode step's int4 matmul as a float kernel (ops.py's group sums) spends ~5 vector instructions per 16 weights
(widen, shift, mask, convert, multiply-add): SmolLM2's int4 decode ran at ~0.5x llama.cpp's q4_0. Here, as in
ggml's q4_0 x q8_0 dot product, the one input row is quantized per group of 32 to int8 (scale max|x|/127, rounded),
and each group's sums are integer: one `vpdpbusd` multiplies 16 outputs by 4 inputs (the weights' unsigned codes
0..15 by the signed activations), 8 * sum(activations) is taken off after (code - 8 is the weight), then the sum
is scaled by the weight's and the activation's group scales into a float accumulator.

Stored layout (the same bytes per panel as before, reordered within each group): a panel's 32 inputs by P outputs
(16 byte rows of P bytes) hold, for each block of 16 outputs `ob` and each 8 inputs `j`, 64 contiguous bytes:
output-major, 4 inputs a byte lane, the low nibble the inputs 8j..8j+3 and the high nibble 8j+4..8j+7 — one
64-byte load is two instructions' weight operands. Panels narrower than 16 keep the plain order (int4_code reads
both). The layout is the format's on every target; only x86 VNNI builds run this kernel, the others read the codes
through int4_code in ops.py's float kernels.

Written as plain TIR (no schedule applies), as amx.py; the quantized rows are the kernel's own scratch.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx as tir
from tvm.script import tirx as T

INT4_GROUP = 32
BLOCK = 16                  # outputs per vpdpbusd (one int32 lane each)
ROW_TILE = 4                # rows per register block of a many-row call (prefill): 4 x 32 outputs of sums
VNNI_PREFIX = "edgeq_int4_vnni_linear_"
DP = "llvm.x86.avx512.vpdpbusd.512"
PREFETCH_GROUPS = 2         # decode: weight bytes prefetched 2 groups (2 KB) ahead of the loads


def vnni_layout(panel: int) -> bool:
    """Whether panels of this width are stored in the VNNI order (whole 16-output blocks)."""
    return panel % BLOCK == 0


def vnni_order(packed_panels: np.ndarray) -> np.ndarray:
    """(n/P, in/2, P) bytes in the plain order (low nibble the even input) -> the same shape in the VNNI order."""
    n_p, half, p = packed_panels.shape
    if not vnni_layout(p):
        return packed_panels
    codes = np.empty((n_p, half * 2, p), np.uint8)                     # (panel, input, output)
    codes[:, 0::2] = packed_panels & 15
    codes[:, 1::2] = packed_panels >> 4
    g = codes.reshape(n_p, half * 2 // INT4_GROUP, 4, 2, 4, p // BLOCK, BLOCK)    # panel, group, j, nibble, b, ob, n16
    lo, hi = g[:, :, :, 0], g[:, :, :, 1]                              # (panel, group, j, b, ob, n16)
    byte = (lo | (hi << 4)).astype(np.uint8)
    out = byte.transpose(0, 1, 4, 2, 5, 3)                             # panel, group, ob, j, n16, b
    return np.ascontiguousarray(out.reshape(n_p, half, p))


def plain_order(vnni_panels: np.ndarray) -> np.ndarray:
    """The inverse of vnni_order()."""
    n_p, half, p = vnni_panels.shape
    if not vnni_layout(p):
        return vnni_panels
    byte = vnni_panels.reshape(n_p, half * 2 // INT4_GROUP, p // BLOCK, 4, BLOCK, 4).transpose(0, 1, 3, 5, 2, 4)
    codes = np.stack([byte & 15, byte >> 4], axis=3).reshape(n_p, half * 2, p)      # (panel, input, output)
    return np.ascontiguousarray((codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8))


def vnni_byte(panel: int, kk, n) -> tuple:
    """(row, column, shift) of input `kk`, output `n` within its panel's stored bytes (VNNI order)."""
    nn = n % panel
    r = kk % INT4_GROUP
    flat = (nn // BLOCK) * 256 + (r // 8) * 64 + (nn % BLOCK) * 4 + r % 4
    return (kk // INT4_GROUP) * (INT4_GROUP // 2) + flat // panel, flat % panel, ((r % 8) // 4) * 4


def panel_blocks(tile: int, weights: int) -> int:
    """16-output blocks per task. One row (decode): the whole 64-output panel, so each thread streams its panels'
    bytes in address order (1 KB a group) and 4 (8 for a gate/up pair) vpdpbusd chains run side by side; a task of
    16 or 32 outputs read 256 or 512 bytes of each 1 KB, and the weights streamed from memory at ~5 GB/s. Row tiles
    (prefill): 2 blocks of one weight (1 of a pair), so R * 2 * 16 * 2 sums stay in registers."""
    return 4 if tile == 1 else 2 // weights


@T.macro(hygienic=False)
def prefetch_ahead(w, p, row, R):  # noqa: N803  (a macro sees its arguments only)
    """Decode: prefetch the 64 bytes PREFETCH_GROUPS groups (1 KB each) past row `row` of panel p (into the next
    panel at the end; a prefetch does not fault past the array). One row's sums take ~1/4 of the time its weights
    take to arrive from memory; with the hardware prefetchers alone a thread read ~11.7 GB/s, with this ~13.7
    (SmolLM2's gate/up, 1 thread, 120 copies of the weights cycled, load 4)."""
    if R == 1 and PREFETCH_GROUPS > 0:
        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
            w[p, row + PREFETCH_GROUPS * 16, 0]), 0, 3, 1))


def padded_rows(rows, tile: int):
    """Rows of the quantized-input scratch: whole tiles."""
    return (rows + (tile - 1)) // tile * tile


def _out(acc, b, i):
    return acc + b[i] if b is not None else acc


def _intrin(name: str, dtype: str, *args):
    return T.call_llvm_pure_intrin(dtype, T.llvm_lookup_intrinsic_id(name), *args)


@T.macro(hygienic=False)
def quantize_rows(x, xq, xs, xsum, G, R, rows):  # noqa: N803  (a macro sees its arguments only)
    """Rows of x (padded to whole tiles of R, a padding row repeating the last) quantized per group of 32 inputs
    into xq (scale max|x|/127 into xs, rounded half to even), and 8 * Σ xq per group into xsum."""
    # the rows quantized once per call, serially before the parallel loop (no second parallel region)
    for m in T.serial((rows + T.int64(R - 1)) // T.int64(R) * T.int64(R)):
        red = T.decl_buffer((16,), "float32", scope="local")
        isum = T.decl_buffer((16,), "int32", scope="local")
        src = T.meta_var(T.min(m, rows - T.int64(1)))
        for g in T.serial(G):
            for l in T.vectorized(16):
                red[l] = T.max(T.fabs(x[src, g * 32 + l]), T.fabs(x[src, g * 32 + 16 + l]))
            for l in T.serial(15):
                red[0] = T.max(red[0], red[l + 1])
            xs[m, g] = T.Select(red[0] > T.float32(0), red[0] / T.float32(127.0), T.float32(1.0))
            for h in T.serial(2):
                for l in T.vectorized(16):
                    xq[m, g * 32 + h * 16 + l] = T.Cast("int8", T.Cast("int32", T.max(T.min(
                        T.round(x[src, g * 32 + h * 16 + l] / xs[m, g]), T.float32(127.0)), T.float32(-127.0))))
            for l in T.vectorized(16):
                isum[l] = T.Cast("int32", xq[m, g * 32 + l]) + T.Cast("int32", xq[m, g * 32 + 16 + l])
            for l in T.serial(15):
                isum[0] = isum[0] + isum[l + 1]
            xsum[m, g] = isum[0] * 8


@T.macro(hygienic=False)
def task(w, s, b, y, xq, xs, xsum, G, OB, P, R, rows, t, col0):  # noqa: N803  (a macro sees its arguments only)
    """Task t of one weight: OB blocks of 16 outputs from output t*OB*16 on, for every row, into y's columns from
    col0 + t*OB*16 (col0: where this weight's outputs start in a fused call's output)."""
    acc = T.decl_buffer((R * OB * 16,), "float32", scope="local")
    gs = T.decl_buffer((R * OB * 16,), "int32", scope="local")
    n0 = T.meta_var(t * (OB * BLOCK))
    p = T.meta_var(n0 // P)
    ob0 = T.meta_var(n0 % P // BLOCK)
    for rb in T.serial((rows + T.int64(R - 1)) // T.int64(R)):
        for l in T.vectorized(R * OB * 16):
            acc[l] = T.float32(0)
        for g in T.serial(G):
            for l in T.vectorized(R * OB * 16):
                gs[l] = 0
            for j in T.unroll(4):
                for o in T.unroll(OB):
                    wv = T.meta_var(w.vload([p, g * 16 + (ob0 + o) * 4 + j, 0], "uint8x64"))
                    prefetch_ahead(w, p, g * 16 + (ob0 + o) * 4 + j, R)
                    for r in T.unroll(R):
                        gs[T.ramp((r * OB + o) * 16, 1, 16)] = _intrin(DP, "int32x16", _intrin(
                            DP, "int32x16", gs.vload([(r * OB + o) * 16], "int32x16"),
                            T.bitwise_and(wv, T.broadcast(T.uint8(15), 64)),
                            T.reinterpret(T.broadcast(T.reinterpret(xq.vload(
                                [rb * T.int64(R) + T.int64(r), g * 32 + j * 8], "int8x4"), dtype="int32"), 16),
                                dtype="int8x64")),
                            T.shift_right(wv, T.broadcast(T.uint8(4), 64)),
                            T.reinterpret(T.broadcast(T.reinterpret(xq.vload(
                                [rb * T.int64(R) + T.int64(r), g * 32 + j * 8 + 4], "int8x4"), dtype="int32"),
                                16), dtype="int8x64"))
            for r in T.unroll(R):
                for o in T.unroll(OB):
                    for l in T.vectorized(16):
                        acc[(r * OB + o) * 16 + l] = acc[(r * OB + o) * 16 + l] + T.Cast(
                            "float32", gs[(r * OB + o) * 16 + l] - xsum[rb * T.int64(R) + T.int64(r), g]) * (
                            T.Cast("float32", s[p, g, (ob0 + o) * 16 + l]) * xs[rb * T.int64(R) + T.int64(r), g])
        for r in T.unroll(R):
            if rb * T.int64(R) + T.int64(r) < rows:
                for l in T.vectorized(OB * 16):
                    y[rb * T.int64(R) + T.int64(r), col0 + n0 + l] = _out(acc[r * OB * 16 + l], b, n0 + l)


def int4_vnni_kernel(k_dim: int, n_dim: int, panel: int, bias: bool, tile: int):
    """y[m, n] = Σ_g w_scale[g, n] * x_scale[m, g] * Σ_{k in g} (code[k, n] - 8) * xq[m, k] (+ bias[n]) for rows x
    (rows, k_dim), `rows` symbolic; the weight bytes (n/P, k/2, P) in the VNNI order, the f16 scales in panels
    (n/P, k/32, P). `tile`: rows per register block (1 for decode's one row; more rows share each weight load).
    Arguments: x, weights, scales[, bias]; output y. The quantized input is the kernel's own scratch (rows padded
    to whole tiles, a padding row repeating the last row: xq int8 (rows, k), x_scale f32 (rows, k/32), 8 * Σ xq
    int32 (rows, k/32)); as call outputs they cost the VM three tensor allocations a call (360 a SmolLM2 decode
    step)."""
    K, N, P, G, R = k_dim, n_dim, panel, k_dim // INT4_GROUP, tile
    if P != 64:
        raise ValueError(f"the int4 VNNI kernel reads 64-output panels, not {P}")
    OB = panel_blocks(R, 1)                 # noqa: N806
    tasks = N // (OB * BLOCK)

    @T.macro(hygienic=False)
    def body(x, w, s, b, y, xq, xs, xsum, G, tasks, OB, P, R, rows):  # noqa: N803  (a macro sees its arguments only)
        quantize_rows(x, xq, xs, xsum, G, R, rows)
        for t in T.parallel(tasks):
            task(w, s, b, y, xq, xs, xsum, G, OB, P, R, rows, t, 0)

    if bias:
        @T.prim_func(private=True)
        def int4_vnni_linear(x_h: T.handle, w_h: T.handle, s_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            rows = T.int64()
            x = T.match_buffer(x_h, (rows, K), "float32")
            w = T.match_buffer(w_h, (N // P, K // 2, P), "uint8")
            s = T.match_buffer(s_h, (N // P, G, P), "float16")
            b = T.match_buffer(b_h, (N,), "float32")
            y = T.match_buffer(y_h, (rows, N), "float32")
            xq = T.decl_buffer((padded_rows(rows, R), K), "int8")
            xs = T.decl_buffer((padded_rows(rows, R), G), "float32")
            xsum = T.decl_buffer((padded_rows(rows, R), G), "int32")
            body(x, w, s, b, y, xq, xs, xsum, G, tasks, OB, P, R, rows)
        return int4_vnni_linear

    @T.prim_func(private=True)
    def int4_vnni_linear_nb(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, K), "float32")
        w = T.match_buffer(w_h, (N // P, K // 2, P), "uint8")
        s = T.match_buffer(s_h, (N // P, G, P), "float16")
        y = T.match_buffer(y_h, (rows, N), "float32")
        xq = T.decl_buffer((padded_rows(rows, R), K), "int8")
        xs = T.decl_buffer((padded_rows(rows, R), G), "float32")
        xsum = T.decl_buffer((padded_rows(rows, R), G), "int32")
        body(x, w, s, None, y, xq, xs, xsum, G, tasks, OB, P, R, rows)
    return int4_vnni_linear_nb


@T.macro(hygienic=False)
def dp_rows(w, gs, xq, g, j, p, ob, o, OB, R, rb):  # noqa: N803  (a macro sees its arguments only)
    """gs[(r*OB + o)*16 ..] += the 4 inputs j*8.. (both nibbles) of group g times 16 outputs (block ob of panel p)."""
    for r in T.unroll(R):
        gs[T.ramp((r * OB + o) * 16, 1, 16)] = _intrin(DP, "int32x16", _intrin(
            DP, "int32x16", gs.vload([(r * OB + o) * 16], "int32x16"),
            T.bitwise_and(w.vload([p, g * 16 + ob * 4 + j, 0], "uint8x64"), T.broadcast(T.uint8(15), 64)),
            T.reinterpret(T.broadcast(T.reinterpret(xq.vload(
                [rb * T.int64(R) + T.int64(r), g * 32 + j * 8], "int8x4"), dtype="int32"), 16), dtype="int8x64")),
            T.shift_right(w.vload([p, g * 16 + ob * 4 + j, 0], "uint8x64"), T.broadcast(T.uint8(4), 64)),
            T.reinterpret(T.broadcast(T.reinterpret(xq.vload(
                [rb * T.int64(R) + T.int64(r), g * 32 + j * 8 + 4], "int8x4"), dtype="int32"), 16), dtype="int8x64"))


@T.macro(hygienic=False)
def scale_rows(s, acc, gs, xs, xsum, g, p, ob, r, o, OB, R, rb):  # noqa: N803  (a macro sees its arguments only)
    """acc of row r, block o += group g's integer sums, less 8 * Σ xq, times the weight's and the row's scales."""
    for l in T.vectorized(16):
        acc[(r * OB + o) * 16 + l] = acc[(r * OB + o) * 16 + l] + T.Cast(
            "float32", gs[(r * OB + o) * 16 + l] - xsum[rb * T.int64(R) + T.int64(r), g]) * (
            T.Cast("float32", s[p, g, ob * 16 + l]) * xs[rb * T.int64(R) + T.int64(r), g])


@T.macro(hygienic=False)
def pair_task(wg, sg, wu, su, y, xq, xs, xsum, G, OB, P, R, rows, t):  # noqa: N803  (a macro sees its arguments only)
    """Task t of a gate/up pair: outputs t*OB*16.. of both weights (one broadcast of the activations serves the
    2*OB blocks), written as silu(gate) * up (the SwiGLU product: no gate or up tensor, no third kernel)."""
    acc = T.decl_buffer((R * 2 * OB * 16,), "float32", scope="local")
    gs = T.decl_buffer((R * 2 * OB * 16,), "int32", scope="local")
    n0 = T.meta_var(t * (OB * BLOCK))
    p = T.meta_var(n0 // P)
    ob0 = T.meta_var(n0 % P // BLOCK)
    for rb in T.serial((rows + T.int64(R - 1)) // T.int64(R)):
        for l in T.vectorized(R * 2 * OB * 16):
            acc[l] = T.float32(0)
        for g in T.serial(G):
            for l in T.vectorized(R * 2 * OB * 16):
                gs[l] = 0
            for j in T.unroll(4):
                for o in T.unroll(OB):
                    prefetch_ahead(wg, p, g * 16 + (ob0 + o) * 4 + j, R)
                    prefetch_ahead(wu, p, g * 16 + (ob0 + o) * 4 + j, R)
                    dp_rows(wg, gs, xq, g, j, p, ob0 + o, o, 2 * OB, R, rb)
                    dp_rows(wu, gs, xq, g, j, p, ob0 + o, OB + o, 2 * OB, R, rb)
            for r in T.unroll(R):
                for o in T.unroll(OB):
                    scale_rows(sg, acc, gs, xs, xsum, g, p, ob0 + o, r, o, 2 * OB, R, rb)
                    scale_rows(su, acc, gs, xs, xsum, g, p, ob0 + o, r, OB + o, 2 * OB, R, rb)
        for r in T.unroll(R):
            if rb * T.int64(R) + T.int64(r) < rows:
                for o in T.unroll(OB):
                    for l in T.vectorized(16):
                        y[rb * T.int64(R) + T.int64(r), n0 + o * 16 + l] = \
                            acc[(r * 2 * OB + o) * 16 + l] * T.sigmoid(acc[(r * 2 * OB + o) * 16 + l]) \
                            * acc[(r * 2 * OB + OB + o) * 16 + l]


def int4_vnni_fused_kernel(k_dim: int, n_dims: tuple[int, ...], panel: int, tile: int, swiglu: bool = False):
    """Several int4_g32 weights over the same input in one call, the input quantized once: (q, k, v) into one
    (rows, Nq + Nk + Nv) output, the tasks of the three in one parallel loop; or with `swiglu`, (gate, up) into
    silu(gate) * up (rows, N). No bias. Arguments: x, then (weights, scales) per weight; output y (the scratch
    is the kernel's own, as int4_vnni_kernel's). Each output's sums are the single-weight kernel's, in the same order."""
    K, P, G, R = k_dim, panel, k_dim // INT4_GROUP, tile
    if P != 64:
        raise ValueError(f"the int4 VNNI kernel reads 64-output panels, not {P}")
    OB = panel_blocks(R, 1)                 # noqa: N806
    if swiglu:
        (N,) = set(n_dims)
        OBP = panel_blocks(R, 2)                # noqa: N806
        tasks = N // (OBP * BLOCK)

        @T.prim_func(private=True)
        def int4_vnni_swiglu(x_h: T.handle, wg_h: T.handle, sg_h: T.handle, wu_h: T.handle, su_h: T.handle,
                             y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            rows = T.int64()
            x = T.match_buffer(x_h, (rows, K), "float32")
            wg = T.match_buffer(wg_h, (N // P, K // 2, P), "uint8")
            sg = T.match_buffer(sg_h, (N // P, G, P), "float16")
            wu = T.match_buffer(wu_h, (N // P, K // 2, P), "uint8")
            su = T.match_buffer(su_h, (N // P, G, P), "float16")
            y = T.match_buffer(y_h, (rows, N), "float32")
            xq = T.decl_buffer((padded_rows(rows, R), K), "int8")
            xs = T.decl_buffer((padded_rows(rows, R), G), "float32")
            xsum = T.decl_buffer((padded_rows(rows, R), G), "int32")
            quantize_rows(x, xq, xs, xsum, G, R, rows)
            for t in T.parallel(tasks):
                pair_task(wg, sg, wu, su, y, xq, xs, xsum, G, OBP, P, R, rows, t)

        return int4_vnni_swiglu
    N0, N1, N2 = n_dims
    T0, T1, T2 = (n // (OB * BLOCK) for n in n_dims)

    @T.prim_func(private=True)
    def int4_vnni_qkv(x_h: T.handle, w0_h: T.handle, s0_h: T.handle, w1_h: T.handle, s1_h: T.handle,
                      w2_h: T.handle, s2_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, K), "float32")
        w0 = T.match_buffer(w0_h, (N0 // P, K // 2, P), "uint8")
        s0 = T.match_buffer(s0_h, (N0 // P, G, P), "float16")
        w1 = T.match_buffer(w1_h, (N1 // P, K // 2, P), "uint8")
        s1 = T.match_buffer(s1_h, (N1 // P, G, P), "float16")
        w2 = T.match_buffer(w2_h, (N2 // P, K // 2, P), "uint8")
        s2 = T.match_buffer(s2_h, (N2 // P, G, P), "float16")
        y = T.match_buffer(y_h, (rows, N0 + N1 + N2), "float32")
        xq = T.decl_buffer((padded_rows(rows, R), K), "int8")
        xs = T.decl_buffer((padded_rows(rows, R), G), "float32")
        xsum = T.decl_buffer((padded_rows(rows, R), G), "int32")
        quantize_rows(x, xq, xs, xsum, G, R, rows)
        for t in T.parallel(T0 + T1 + T2):
            if t < T0:
                task(w0, s0, None, y, xq, xs, xsum, G, OB, P, R, rows, t, 0)
            elif t < T0 + T1:
                task(w1, s1, None, y, xq, xs, xsum, G, OB, P, R, rows, t - T0, N0)
            else:
                task(w2, s2, None, y, xq, xs, xsum, G, OB, P, R, rows, t - T0 - T1, N0 + N1)

    return int4_vnni_qkv


def emit_int4_vnni_fused(bb, x, weights: list[list], hint: str, swiglu: bool = False):
    """int4_vnni_fused_kernel on (rows, in) `x` and the int4_g32 parameters (bytes, scales) of each weight."""
    from tvm import relax

    rows, k_dim = x.ty.shape.values
    k_dim = int(k_dim)
    n_dims = tuple(int(ws[0].ty.shape.values[0]) * int(ws[0].ty.shape.values[2]) for ws in weights)
    tile = row_tile(rows)
    gv = bb.add_func(int4_vnni_fused_kernel(k_dim, n_dims, 64, tile, swiglu), f"{VNNI_PREFIX}{hint}")
    width = n_dims[0] if swiglu else sum(n_dims)
    args = [x] + [a for ws in weights for a in ws]
    return bb.emit(relax.call_tir(gv, args, relax.TensorType((rows, width), "float32")))


def fits(x_shape, w_shape) -> bool:
    """Rows by whole groups ((seq, hidden) of a decoder, (batch, seq, hidden) of an encoder: static inputs), static
    64-output panels (not a pruned MLP's symbolic widths)."""
    xs = list(x_shape.values) if x_shape is not None else []
    ws = list(w_shape.values) if w_shape is not None else []
    if len(xs) not in (2, 3) or len(ws) != 3 or not all(isinstance(v, tir.IntImm) for v in xs[-1:] + ws):
        return False
    k_dim = int(xs[-1])
    _, half, panel = (int(v) for v in ws)
    return half * 2 == k_dim and k_dim % INT4_GROUP == 0 and panel == 64


def row_tile(rows) -> int:
    """One row (decode) as it is; more rows, or a symbolic count, in register blocks of ROW_TILE."""
    return 1 if isinstance(rows, tir.IntImm) and int(rows) == 1 else ROW_TILE


def emit_int4_vnni_linear(bb, x, ws: list, bias, hint: str):
    """The kernel on (rows, in) or (batch, seq, in) `x` with int4_g32 parameters `ws` (bytes, scales) and an
    optional `bias`."""
    from tvm import relax

    *lead, k_dim = x.ty.shape.values
    k_dim = int(k_dim)
    rows = lead[0] if len(lead) == 1 else lead[0] * lead[1]
    x2 = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, (rows, k_dim)))
    n_p, _, p = (int(v) for v in ws[0].ty.shape.values)
    n_dim, tile = n_p * p, row_tile(rows)
    gv = bb.add_func(int4_vnni_kernel(k_dim, n_dim, p, bias is not None, tile), f"{VNNI_PREFIX}{hint}")
    args = [x2, *ws] + ([bias] if bias is not None else [])
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((rows, n_dim), "float32")))
    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, (*lead, n_dim)))
