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

Written as plain TIR (no schedule applies), as amx.py; the quantized row is passed as extra call outputs.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx as tir
from tvm.script import tirx as T

INT4_GROUP = 32
BLOCK = 16                  # outputs per vpdpbusd (one int32 lane each)
VNNI_PREFIX = "edgeq_int4_vnni_linear_"
DP = "llvm.x86.avx512.vpdpbusd.512"


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


def _out(acc, b, i):
    return acc + b[i] if b is not None else acc


def _intrin(name: str, dtype: str, *args):
    return T.call_llvm_pure_intrin(dtype, T.llvm_lookup_intrinsic_id(name), *args)


def int4_vnni_gemv_kernel(k_dim: int, n_dim: int, panel: int, bias: bool):
    """y[0, n] = Σ_g w_scale[g, n] * x_scale[g] * Σ_{k in g} (code[k, n] - 8) * xq[k] (+ bias[n]) for one row x
    (1, k_dim); the weight bytes (n/P, k/2, P) in the VNNI order, the f16 scales in panels (n/P, k/32, P).
    Arguments: x, weights, scales[, bias]; outputs y, then the scratch (xq int8 (k), x_scale f32 (k/32),
    8 * Σ xq int32 (k/32))."""
    K, N, P, G = k_dim, n_dim, panel, k_dim // INT4_GROUP
    OB = 2 if P % (2 * BLOCK) == 0 else 1            # noqa: N806  16-output blocks per task: broadcasts shared
    tasks = N // (OB * BLOCK)

    @T.macro(hygienic=False)
    def body(x, w, s, b, y, xq, xs, xsum, G, tasks, OB, P):  # noqa: N803  (a macro sees its arguments only)
        # the row quantized once per call, serially before the parallel loop (no second parallel region)
        for g in T.serial(G):
            red = T.decl_buffer((16,), "float32", scope="local")
            isum = T.decl_buffer((16,), "int32", scope="local")
            for l in T.vectorized(16):
                red[l] = T.max(T.fabs(x[0, g * 32 + l]), T.fabs(x[0, g * 32 + 16 + l]))
            for l in T.serial(15):
                red[0] = T.max(red[0], red[l + 1])
            xs[g] = T.Select(red[0] > T.float32(0), red[0] / T.float32(127.0), T.float32(1.0))
            for h in T.serial(2):
                for l in T.vectorized(16):
                    xq[g * 32 + h * 16 + l] = T.Cast("int8", T.Cast("int32", T.max(T.min(
                        T.round(x[0, g * 32 + h * 16 + l] / xs[g]), T.float32(127.0)), T.float32(-127.0))))
            for l in T.vectorized(16):
                isum[l] = T.Cast("int32", xq[g * 32 + l]) + T.Cast("int32", xq[g * 32 + 16 + l])
            for l in T.serial(15):
                isum[0] = isum[0] + isum[l + 1]
            xsum[g] = isum[0] * 8
        for t in T.parallel(tasks):
            acc = T.decl_buffer((OB * 16,), "float32", scope="local")
            gs = T.decl_buffer((OB * 16,), "int32", scope="local")
            n0 = T.meta_var(t * (OB * BLOCK))
            p = T.meta_var(n0 // P)
            ob0 = T.meta_var(n0 % P // BLOCK)
            for l in T.vectorized(OB * 16):
                acc[l] = T.float32(0)
            for g in T.serial(G):
                for l in T.vectorized(OB * 16):
                    gs[l] = 0
                for j in T.unroll(4):
                    xlo = T.meta_var(T.reinterpret(T.broadcast(T.reinterpret(
                        xq.vload([g * 32 + j * 8], "int8x4"), dtype="int32"), 16), dtype="int8x64"))
                    xhi = T.meta_var(T.reinterpret(T.broadcast(T.reinterpret(
                        xq.vload([g * 32 + j * 8 + 4], "int8x4"), dtype="int32"), 16), dtype="int8x64"))
                    for o in T.unroll(OB):
                        wv = T.meta_var(w.vload([p, g * 16 + (ob0 + o) * 4 + j, 0], "uint8x64"))
                        gs[T.ramp(o * 16, 1, 16)] = _intrin(DP, "int32x16", _intrin(
                            DP, "int32x16", gs.vload([o * 16], "int32x16"),
                            T.bitwise_and(wv, T.broadcast(T.uint8(15), 64)), xlo),
                            T.shift_right(wv, T.broadcast(T.uint8(4), 64)), xhi)
                for o in T.serial(OB):
                    for l in T.vectorized(16):
                        acc[o * 16 + l] = acc[o * 16 + l] + T.Cast("float32", gs[o * 16 + l] - xsum[g]) * (
                            T.Cast("float32", s[p, g, (ob0 + o) * 16 + l]) * xs[g])
            for l in T.vectorized(OB * 16):
                y[0, n0 + l] = _out(acc[l], b, n0 + l)

    if P != 64:
        raise ValueError(f"the int4 VNNI kernel reads 64-output panels, not {P}")
    if bias:
        @T.prim_func(private=True)
        def int4_vnni_gemv(x_h: T.handle, w_h: T.handle, s_h: T.handle, b_h: T.handle, y_h: T.handle,
                           xq_h: T.handle, xs_h: T.handle, xsum_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            x = T.match_buffer(x_h, (1, K), "float32")
            w = T.match_buffer(w_h, (N // P, K // 2, P), "uint8")
            s = T.match_buffer(s_h, (N // P, G, P), "float16")
            b = T.match_buffer(b_h, (N,), "float32")
            y = T.match_buffer(y_h, (1, N), "float32")
            xq = T.match_buffer(xq_h, (K,), "int8")
            xs = T.match_buffer(xs_h, (G,), "float32")
            xsum = T.match_buffer(xsum_h, (G,), "int32")
            body(x, w, s, b, y, xq, xs, xsum, G, tasks, OB, P)
        return int4_vnni_gemv

    @T.prim_func(private=True)
    def int4_vnni_gemv_nb(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle,
                          xq_h: T.handle, xs_h: T.handle, xsum_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        x = T.match_buffer(x_h, (1, K), "float32")
        w = T.match_buffer(w_h, (N // P, K // 2, P), "uint8")
        s = T.match_buffer(s_h, (N // P, G, P), "float16")
        y = T.match_buffer(y_h, (1, N), "float32")
        xq = T.match_buffer(xq_h, (K,), "int8")
        xs = T.match_buffer(xs_h, (G,), "float32")
        xsum = T.match_buffer(xsum_h, (G,), "int32")
        body(x, w, s, None, y, xq, xs, xsum, G, tasks, OB, P)
    return int4_vnni_gemv_nb


def fits(x_shape, w_shape) -> bool:
    """One static row, whole groups, static 64-output panels (not a pruned MLP's symbolic widths)."""
    xs = list(x_shape.values) if x_shape is not None else []
    ws = list(w_shape.values) if w_shape is not None else []
    if len(xs) != 2 or len(ws) != 3 or not all(isinstance(v, tir.IntImm) for v in xs + ws):
        return False
    rows, k_dim = (int(v) for v in xs)
    _, half, panel = (int(v) for v in ws)
    return rows == 1 and half * 2 == k_dim and k_dim % INT4_GROUP == 0 and panel == 64


def emit_int4_vnni_linear(bb, x, ws: list, bias, hint: str):
    """The kernel on a (1, in) `x` with int4_g32 parameters `ws` (bytes, scales) and an optional `bias`."""
    from tvm import relax

    k_dim = int(x.ty.shape.values[1])
    n_p, _, p = (int(v) for v in ws[0].ty.shape.values)
    n_dim = n_p * p
    gv = bb.add_func(int4_vnni_gemv_kernel(k_dim, n_dim, p, bias is not None), f"{VNNI_PREFIX}{hint}")
    outs = [relax.TensorType((1, n_dim), "float32"), relax.TensorType((k_dim,), "int8"),
            relax.TensorType((k_dim // INT4_GROUP,), "float32"), relax.TensorType((k_dim // INT4_GROUP,), "int32")]
    args = [x, *ws] + ([bias] if bias is not None else [])
    return bb.emit(relax.TupleGetItem(bb.emit(relax.call_tir(gv, args, outs)), 0))
