"""int8 matmuls on integer dot products, activations in int8 blocks of 32 as llama.cpp's q8_0 x q8_0: x86 AVX-512
VNNI (`vpdpbusd`) and arm64 with the dot-product extension (`sdot`).

Two weight formats, stored as ops.panels (out/64, in, 64) int8, so the params file is what ops.weight_arrays
writes for them on every target: int8_g32 (ggml's q8_0 codes, an f16 scale per output and block of 32 inputs, in
panels (out/64, in/32, 64): the int8 preset's linears) and int8_wo (an f32 scale per output: the tied head beside
int4 linears). Each step of 4 inputs loads the panel's 4 rows (64 outputs each) and shuffles them into the
instruction's operand order (x86: 16 outputs by 4 inputs, four instructions per step; arm64: 4 by 4, sixteen).
`vpdpbusd` multiplies unsigned by signed bytes: the weights go in as unsigned (w + 128, one xor of the sign bit)
and the activations as signed, and 128 * sum(activations) is taken off each block's sums after; `sdot` is signed
by signed. The rows are quantized per block of 32 inputs (scale max|x|/127, rounded) once per call, before the
parallel loop; each block's integer sums are scaled into a float accumulator (by the block's weight scale too for
int8_g32), int8_wo's per-output scale (and the bias) applied at the end.

Written as plain TIR, as int4_vnni.py (whose row quantization and scratch it shares).
"""

from __future__ import annotations

import functools

from tvm import tirx as tir
from tvm.script import tirx as T

from edgeq.targets.tvm.int4_vnni import DP, INT4_GROUP, ROW_TILE, _intrin, quantize_rows

GROUP = INT4_GROUP          # activation block (q8_0's 32)
INT8_PREFIX = "edgeq_int8_vnni_linear_"
PANEL = 64
SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
KINDS = ("vnni", "sdot")


def _order(lanes: int) -> list[list[tir.IntImm]]:
    """The 4 rows' bytes (row-major, 4 x 64) in operand order per block of `lanes` outputs: lane n, byte b <- row b,
    output ob * lanes + n."""
    return [[tir.IntImm("int32", b * PANEL + ob * lanes + n) for n in range(lanes) for b in range(4)]
            for ob in range(PANEL // lanes)]


_LANES = {"vnni": 16, "sdot": 4}            # outputs per instruction (int32 lanes)
_OB = {k: PANEL // v for k, v in _LANES.items()}     # instructions per step of 4 inputs
_ORDERS = {k: _order(v) for k, v in _LANES.items()}


@T.macro(hygienic=False)
def _block(gs, wv, xq, o, R, rb, g, c, kind):  # noqa: N803  one block of outputs' sums, each row of the tile
    for r in T.unroll(R):
        gs[T.ramp((r * _OB[kind] + o) * _LANES[kind], 1, _LANES[kind])] = _dot(
            kind, gs.vload([(r * _OB[kind] + o) * _LANES[kind]], f"int32x{_LANES[kind]}"), wv,
            T.reinterpret(T.broadcast(T.reinterpret(xq.vload(
                [rb * T.int64(R) + T.int64(r), g * 32 + c * 4], "int8x4"), dtype="int32"), _LANES[kind]),
                dtype=f"int8x{4 * _LANES[kind]}"))


@T.macro(hygienic=False)
def _four(gs, rows4, xq, o0, R, rb, g, c, kind):  # noqa: N803  four blocks (the shuffles need constant indices)
    _block(gs, T.Shuffle(rows4, _ORDERS[kind][o0]), xq, o0, R, rb, g, c, kind)
    _block(gs, T.Shuffle(rows4, _ORDERS[kind][o0 + 1]), xq, o0 + 1, R, rb, g, c, kind)
    _block(gs, T.Shuffle(rows4, _ORDERS[kind][o0 + 2]), xq, o0 + 2, R, rb, g, c, kind)
    _block(gs, T.Shuffle(rows4, _ORDERS[kind][o0 + 3]), xq, o0 + 3, R, rb, g, c, kind)


@T.macro(hygienic=False)
def _steps_vnni(gs, rows4, xq, R, rb, g, c, kind):  # noqa: N803  a step of 4 inputs: 4 blocks of 16 outputs
    _four(gs, rows4, xq, 0, R, rb, g, c, kind)


@T.macro(hygienic=False)
def _steps_sdot(gs, rows4, xq, R, rb, g, c, kind):  # noqa: N803  a step of 4 inputs: 16 blocks of 4 outputs
    _four(gs, rows4, xq, 0, R, rb, g, c, kind)
    _four(gs, rows4, xq, 4, R, rb, g, c, kind)
    _four(gs, rows4, xq, 8, R, rb, g, c, kind)
    _four(gs, rows4, xq, 12, R, rb, g, c, kind)


_STEPS = {"vnni": _steps_vnni, "sdot": _steps_sdot}


@functools.lru_cache(maxsize=None)
def int8_vnni_kernel(k_dim: int, n_dim: int, bias: bool, tile: int, groups: bool = False, kind: str = "vnni"):
    """y[m, n] = Σ_g x_scale[m, g] * w_scale[g, n] * Σ_{k in g} w[k, n] * xq[m, k] (+ bias[n]) for rows x (rows, k)
    (symbolic), w in panels (n/64, k, 64) int8; `groups` (int8_g32): w_scale f16 panels (n/64, k/32, 64), else
    (int8_wo) one f32 w_scale[n] applied after the sum over g. `tile`: rows per register block (1 for decode).
    `kind`: "vnni" or "sdot". Cached: parsing the script takes ~1.5 s, and a decoder asks for the same few shapes
    hundreds of times (every layer, every entry); PrimFuncs are immutable. Arguments: x, w, w_scale[, bias]; outputs y, then the scratch of
    int4_vnni.quantize_rows (xsum there is 8 * Σ xq: 16x it here)."""
    if kind not in KINDS:
        raise ValueError(f"no int8 integer kernel for {kind!r}")
    K, N, G, R = k_dim, n_dim, k_dim // GROUP, tile
    tasks = N // PANEL
    steps = _STEPS[kind]

    @T.macro(hygienic=False)
    def body(x, w, ws, b, y, xq, xs, xsum, G, tasks, R, rows, kind, groups, steps):  # noqa: N803  (sees its arguments)
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
                        rows4 = T.meta_var(_weights4(w, t, g * 32 + c * 4, kind))
                        steps(gs, rows4, xq, R, rb, g, c, kind)
                    for r in T.unroll(R):
                        for l in T.vectorized(64):
                            acc[r * 64 + l] = acc[r * 64 + l] + _block_sum(
                                gs[r * 64 + l], xsum[rb * T.int64(R) + T.int64(r), g],
                                xs[rb * T.int64(R) + T.int64(r), g], ws, t, g, l, kind, groups)
                for r in T.unroll(R):
                    if rb * T.int64(R) + T.int64(r) < rows:
                        for l in T.vectorized(64):
                            y[rb * T.int64(R) + T.int64(r), t * 64 + l] = _out(
                                _row_scale(acc[r * 64 + l], ws, t * 64 + l, groups), b, t * 64 + l)

    scale_shape, scale_dtype = ((N // PANEL, G, PANEL), "float16") if groups else ((N,), "float32")

    if bias:
        @T.prim_func(private=True)
        def int8_vnni_linear(x_h: T.handle, w_h: T.handle, ws_h: T.handle, b_h: T.handle, y_h: T.handle,
                             xq_h: T.handle, xs_h: T.handle, xsum_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            rows = T.int64()
            padded = T.int64()
            x = T.match_buffer(x_h, (rows, K), "float32")
            w = T.match_buffer(w_h, (N // PANEL, K, PANEL), "int8")
            ws = T.match_buffer(ws_h, scale_shape, scale_dtype)
            b = T.match_buffer(b_h, (N,), "float32")
            y = T.match_buffer(y_h, (rows, N), "float32")
            xq = T.match_buffer(xq_h, (padded, K), "int8")
            xs = T.match_buffer(xs_h, (padded, G), "float32")
            xsum = T.match_buffer(xsum_h, (padded, G), "int32")
            body(x, w, ws, b, y, xq, xs, xsum, G, tasks, R, rows, kind, groups, steps)
        return int8_vnni_linear

    @T.prim_func(private=True)
    def int8_vnni_linear_nb(x_h: T.handle, w_h: T.handle, ws_h: T.handle, y_h: T.handle,
                            xq_h: T.handle, xs_h: T.handle, xsum_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        padded = T.int64()
        x = T.match_buffer(x_h, (rows, K), "float32")
        w = T.match_buffer(w_h, (N // PANEL, K, PANEL), "int8")
        ws = T.match_buffer(ws_h, scale_shape, scale_dtype)
        y = T.match_buffer(y_h, (rows, N), "float32")
        xq = T.match_buffer(xq_h, (padded, K), "int8")
        xs = T.match_buffer(xs_h, (padded, G), "float32")
        xsum = T.match_buffer(xsum_h, (padded, G), "int32")
        body(x, w, ws, None, y, xq, xs, xsum, G, tasks, R, rows, kind, groups, steps)
    return int8_vnni_linear_nb


def _dot(kind: str, acc, wv, xb):
    return _intrin(DP if kind == "vnni" else SDOT, f"int32x{_LANES[kind]}", acc, wv, xb)


def _weights4(w, t, k0, kind: str) -> list:
    """The panel's rows k0..k0+3 (64 outputs each) as the instruction's weight operands: unsigned for `vpdpbusd`
    (w + 128, the sign bit flipped), as stored for `sdot`."""
    rows = [w.vload([t, k0 + i, 0], "int8x64") for i in range(4)]
    if kind == "vnni":
        return [T.bitwise_xor(T.reinterpret(r, dtype="uint8x64"), T.broadcast(T.uint8(128), 64)) for r in rows]
    return rows


def _block_sum(gsv, xsumv, xsv, ws, t, g, l, kind: str, groups: bool):
    """One block's integer sums in f32 (less 128 * Σ xq for `vpdpbusd`'s unsigned weights), times the activation's
    block scale (and the weight's, for int8_g32)."""
    isum = gsv - xsumv * 16 if kind == "vnni" else gsv
    scale = xsv * T.Cast("float32", ws[t, g, l]) if groups else xsv
    return T.Cast("float32", isum) * scale


def _row_scale(v, ws, i, groups: bool):
    return v if groups else v * ws[i]


def _out(v, b, i):
    return v + b[i] if b is not None else v


def fits(x_shape, w_shape) -> bool:
    """Rows by whole groups ((seq, hidden) of a decoder, (batch, seq, hidden) of an encoder: static inputs), static
    64-output panels."""
    xs = list(x_shape.values) if x_shape is not None else []
    ws = list(w_shape.values) if w_shape is not None else []
    if len(xs) not in (2, 3) or len(ws) != 3 or not all(isinstance(v, tir.IntImm) for v in xs[-1:] + ws):
        return False
    k_dim = int(xs[-1])
    _, k_w, panel = (int(v) for v in ws)
    return k_w == k_dim and k_dim % GROUP == 0 and panel == PANEL


def emit_int8_vnni_linear(bb, x, ws: list, bias, hint: str, groups: bool = False, kind: str = "vnni"):
    """The kernel on (rows, in) or (batch, seq, in) `x` with int8 parameters `ws` (panels, scales: int8_g32 when
    `groups`, else int8_wo) and an optional `bias`."""
    from tvm import relax

    *lead, k_dim = x.ty.shape.values
    k_dim = int(k_dim)
    rows = lead[0] if len(lead) == 1 else lead[0] * lead[1]
    x2 = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, (rows, k_dim)))
    n_dim = int(ws[0].ty.shape.values[0]) * PANEL
    # x86: 2 rows x 64 outputs of sums (8 zmm); arm64's 32 vector registers hold one row's 16 blocks of 4
    tile = 1 if (isinstance(rows, tir.IntImm) and int(rows) == 1) or kind == "sdot" else ROW_TILE // 2
    name = f"{INT8_PREFIX}{'g32_' if groups else ''}{'' if kind == 'vnni' else kind + '_'}{hint}"
    gv = bb.add_func(int8_vnni_kernel(k_dim, n_dim, bias is not None, tile, groups, kind), name)
    padded = (rows + (tile - 1)) // tile * tile
    g = k_dim // GROUP
    outs = [relax.TensorType((rows, n_dim), "float32"), relax.TensorType((padded, k_dim), "int8"),
            relax.TensorType((padded, g), "float32"), relax.TensorType((padded, g), "int32")]
    args = [x2, *ws] + ([bias] if bias is not None else [])
    y = bb.emit(relax.TupleGetItem(bb.emit(relax.call_tir(gv, args, outs)), 0))
    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, (*lead, n_dim)))
