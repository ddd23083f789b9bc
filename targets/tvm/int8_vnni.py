"""int8_wo matmuls on AVX-512 VNNI (`vpdpbusd`), activations in int8 blocks of 32 as llama.cpp's q8_0 x q8_0.

int8_wo weights stay as stored (ops.panels: (out/64, in, 64) int8, an f32 scale per output), so the params file
does not change: each step of 4 inputs loads the panel's 4 rows (64 outputs each) and shuffles them into the
instruction's operand order (16 outputs by 4 inputs, one output a 32-bit lane), four `vpdpbusd` per step. The
instruction multiplies unsigned by signed bytes: the weights go in as unsigned (w + 128, one xor of the sign bit)
and the per-group activations as signed, and 128 * sum(activations) is taken off each group's sums after. The
rows are quantized per group of 32 inputs (scale max|x|/127, rounded) once per call, before the parallel loop;
each group's integer sums are scaled into a float accumulator, the weight's scale (and bias) applied at the end.

Written as plain TIR, as int4_vnni.py (whose row quantization and scratch it shares).
"""

from __future__ import annotations

from tvm import tirx as tir
from tvm.script import tirx as T

from edgeq.targets.tvm.int4_vnni import DP, INT4_GROUP, ROW_TILE, _intrin, quantize_rows

GROUP = INT4_GROUP          # activation block (q8_0's 32)
INT8_PREFIX = "edgeq_int8_vnni_linear_"
PANEL = 64
# the 4 rows' bytes (row-major, 4 x 64) in operand order for output block ob: lane n16, byte b <- row b, output n
_ORDER = [[tir.IntImm("int32", b * PANEL + ob * 16 + n16) for n16 in range(16) for b in range(4)] for ob in range(4)]


@T.macro(hygienic=False)
def block(gs, wv, xq, o, R, rb, g, c):  # noqa: N803  one 16-output block's sums, each row of the tile
    for r in T.unroll(R):
        gs[T.ramp((r * 4 + o) * 16, 1, 16)] = _intrin(
            DP, "int32x16", gs.vload([(r * 4 + o) * 16], "int32x16"), wv,
            T.reinterpret(T.broadcast(T.reinterpret(xq.vload(
                [rb * T.int64(R) + T.int64(r), g * 32 + c * 4], "int8x4"), dtype="int32"), 16), dtype="int8x64"))



def int8_vnni_kernel(k_dim: int, n_dim: int, bias: bool, tile: int):
    """y[m, n] = w_scale[n] * Σ_g x_scale[m, g] * Σ_{k in g} w[k, n] * xq[m, k] (+ bias[n]) for rows x (rows, k)
    (symbolic), w in panels (n/64, k, 64) int8. `tile`: rows per register block (1 for decode). Arguments: x, w,
    w_scale[, bias]; outputs y, then the scratch of int4_vnni.quantize_rows (xsum there is 8 * Σ xq: 16x it here)."""
    K, N, G, R = k_dim, n_dim, k_dim // GROUP, tile

    tasks = N // PANEL

    @T.macro(hygienic=False)
    def body(x, w, ws, b, y, xq, xs, xsum, G, tasks, R, rows):  # noqa: N803  (a macro sees its arguments only)
        quantize_rows(x, xq, xs, xsum, G, R, rows)
        for t in T.parallel(tasks):
            acc = T.decl_buffer((R * 64,), "float32", scope="local")
            gs = T.decl_buffer((R * 64,), "int32", scope="local")
            for rb in T.serial((rows + T.int64(R - 1)) // T.int64(R)):
                for l in T.vectorized(R * 64):
                    acc[l] = T.float32(0)
                for g in T.serial(G):
                    for l in T.vectorized(R * 64):
                        gs[l] = 0
                    for c in T.unroll(8):
                        rows4 = T.meta_var([T.bitwise_xor(T.reinterpret(w.vload([t, g * 32 + c * 4 + i, 0], "int8x64"), dtype="uint8x64"),
                                                          T.broadcast(T.uint8(128), 64)) for i in range(4)])
                        block(gs, T.Shuffle(rows4, _ORDER[0]), xq, 0, R, rb, g, c)
                        block(gs, T.Shuffle(rows4, _ORDER[1]), xq, 1, R, rb, g, c)
                        block(gs, T.Shuffle(rows4, _ORDER[2]), xq, 2, R, rb, g, c)
                        block(gs, T.Shuffle(rows4, _ORDER[3]), xq, 3, R, rb, g, c)
                    for r in T.unroll(R):
                        for l in T.vectorized(64):
                            acc[r * 64 + l] = acc[r * 64 + l] + T.Cast(
                                "float32", gs[r * 64 + l] - xsum[rb * T.int64(R) + T.int64(r), g] * 16) * xs[
                                rb * T.int64(R) + T.int64(r), g]
                for r in T.unroll(R):
                    if rb * T.int64(R) + T.int64(r) < rows:
                        for l in T.vectorized(64):
                            y[rb * T.int64(R) + T.int64(r), t * 64 + l] = _out(acc[r * 64 + l] * ws[t * 64 + l], b,
                                                                              t * 64 + l)

    if bias:
        @T.prim_func(private=True)
        def int8_vnni_linear(x_h: T.handle, w_h: T.handle, ws_h: T.handle, b_h: T.handle, y_h: T.handle,
                             xq_h: T.handle, xs_h: T.handle, xsum_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            rows = T.int64()
            padded = T.int64()
            x = T.match_buffer(x_h, (rows, K), "float32")
            w = T.match_buffer(w_h, (N // PANEL, K, PANEL), "int8")
            ws = T.match_buffer(ws_h, (N,), "float32")
            b = T.match_buffer(b_h, (N,), "float32")
            y = T.match_buffer(y_h, (rows, N), "float32")
            xq = T.match_buffer(xq_h, (padded, K), "int8")
            xs = T.match_buffer(xs_h, (padded, G), "float32")
            xsum = T.match_buffer(xsum_h, (padded, G), "int32")
            body(x, w, ws, b, y, xq, xs, xsum, G, tasks, R, rows)
        return int8_vnni_linear

    @T.prim_func(private=True)
    def int8_vnni_linear_nb(x_h: T.handle, w_h: T.handle, ws_h: T.handle, y_h: T.handle,
                            xq_h: T.handle, xs_h: T.handle, xsum_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        padded = T.int64()
        x = T.match_buffer(x_h, (rows, K), "float32")
        w = T.match_buffer(w_h, (N // PANEL, K, PANEL), "int8")
        ws = T.match_buffer(ws_h, (N,), "float32")
        y = T.match_buffer(y_h, (rows, N), "float32")
        xq = T.match_buffer(xq_h, (padded, K), "int8")
        xs = T.match_buffer(xs_h, (padded, G), "float32")
        xsum = T.match_buffer(xsum_h, (padded, G), "int32")
        body(x, w, ws, None, y, xq, xs, xsum, G, tasks, R, rows)
    return int8_vnni_linear_nb


def _out(v, b, i):
    return v + b[i] if b is not None else v


def fits(x_shape, w_shape) -> bool:
    """Rows by whole groups (2-D: a decoder's (seq, hidden)), static 64-output panels."""
    xs = list(x_shape.values) if x_shape is not None else []
    ws = list(w_shape.values) if w_shape is not None else []
    if len(xs) != 2 or len(ws) != 3 or not all(isinstance(v, tir.IntImm) for v in xs[1:] + ws):
        return False
    k_dim = int(xs[1])
    _, k_w, panel = (int(v) for v in ws)
    return k_w == k_dim and k_dim % GROUP == 0 and panel == PANEL


def emit_int8_vnni_linear(bb, x, ws: list, bias, hint: str):
    """The kernel on (rows, in) `x` with int8_wo parameters `ws` (panels, scale) and an optional `bias`."""
    from tvm import relax

    rows, k_dim = x.ty.shape.values
    k_dim = int(k_dim)
    n_dim = int(ws[0].ty.shape.values[0]) * PANEL
    tile = 1 if isinstance(rows, tir.IntImm) and int(rows) == 1 else ROW_TILE // 2
    gv = bb.add_func(int8_vnni_kernel(k_dim, n_dim, bias is not None, tile), f"{INT8_PREFIX}{hint}")
    padded = (rows + (tile - 1)) // tile * tile
    g = k_dim // GROUP
    outs = [relax.TensorType((rows, n_dim), "float32"), relax.TensorType((padded, k_dim), "int8"),
            relax.TensorType((padded, g), "float32"), relax.TensorType((padded, g), "int32")]
    args = [x, *ws] + ([bias] if bias is not None else [])
    return bb.emit(relax.TupleGetItem(bb.emit(relax.call_tir(gv, args, outs)), 0))
