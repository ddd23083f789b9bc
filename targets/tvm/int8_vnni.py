"""int8 matmuls on integer dot products, activations in int8 blocks of 32 as llama.cpp's q8_0 x q8_0.

int8_g32 (the int8 preset's linears: ggml's q8_0 codes, an f16 scale per output and block of 32 inputs) on x86
AVX-512 VNNI (`vpdpbusd`, 16 outputs by 4 inputs an instruction) and arm64 with the dot-product extension (`sdot`,
4 by 4). Its codes are stored as ops.panels (out/64, in, 64) int8 with each panel's 4-input chunks (4 rows of 64
bytes) in operand order, output-major and 4 inputs a 32-bit lane (byte o * 4 + b of a chunk is input 4c + b,
output o) — the operand order of both instructions — so a weight operand is one plain load (g32_order,
g32_byte). A task is 32 outputs (2 VNNI blocks, 8 sdot blocks), a register tile ROW_TILE rows on x86 (one on arm64).

int8_wo (an f32 scale per output: the tied head beside int4 linears, x86 only) keeps ops.panels' plain order, which
the token lookup and float kernels read: each step of 4 inputs loads the panel's 4 rows (64 outputs each) and
shuffles them into the operand order, four `vpdpbusd` per step.

`vpdpbusd` multiplies unsigned by signed bytes: the weights go in as unsigned (w + 128, one xor of the sign bit)
and the activations as signed, and 128 * sum(activations) is taken off each block's sums after; `sdot` is signed
by signed. The rows are quantized per block of 32 inputs (scale max|x|/127, rounded) once per call, before the
parallel loop; each block's integer sums are scaled into a float accumulator (by the block's weight scale too for
int8_g32), int8_wo's per-output scale (and the bias) applied at the end.

Written as plain TIR, as int4_vnni.py (whose row quantization and scratch it shares). Kernels are cached: parsing
a script takes ~1.5 s, and a decoder asks for the same few shapes hundreds of times (every layer, every entry).
"""

from __future__ import annotations

import functools

import numpy as np
from tvm import tirx as tir
from tvm.script import tirx as T

from edgeq.targets.tvm.int4_vnni import DP, INT4_GROUP, ROW_TILE, _intrin, padded_rows, quantize_rows

GROUP = INT4_GROUP          # activation block (q8_0's 32)
INT8_PREFIX = "edgeq_int8_vnni_linear_"
PANEL = 64
SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
KINDS = ("vnni", "sdot")
LANES = {"vnni": 16, "sdot": 4}           # outputs per instruction (int32 lanes)
TASK = 32                                 # outputs per parallel task of the int8_g32 kernel
# the 4 rows' bytes (row-major, 4 x 64) in operand order for output block ob: lane n16, byte b <- row b, output n
_ORDER = [[tir.IntImm("int32", b * PANEL + ob * 16 + n16) for n16 in range(16) for b in range(4)] for ob in range(4)]


def g32_order(panelled: np.ndarray) -> np.ndarray:
    """(n/P, in, P) panels (ops.panels) -> the same shape with each 4-input chunk output-major (operand order)."""
    n_p, k, p = panelled.shape
    return np.ascontiguousarray(panelled.reshape(n_p, k // 4, 4, p).transpose(0, 1, 3, 2).reshape(n_p, k, p))


def g32_byte(panel: int, kk, n) -> tuple:
    """(row, column) of input `kk`, output `n` within its panel's stored bytes (g32_order; panels of `panel`
    outputs: ops.panel_width)."""
    flat = (n % panel) * 4 + kk % 4
    return (kk // 4) * 4 + flat // panel, flat % panel


@T.macro(hygienic=False)
def block(gs, wv, xq, o, R, rb, g, c):  # noqa: N803  one 16-output block's sums, each row of the tile
    for r in T.unroll(R):
        gs[T.ramp((r * 4 + o) * 16, 1, 16)] = _intrin(
            DP, "int32x16", gs.vload([(r * 4 + o) * 16], "int32x16"), wv,
            T.reinterpret(T.broadcast(T.reinterpret(xq.vload(
                [rb * T.int64(R) + T.int64(r), g * 32 + c * 4], "int8x4"), dtype="int32"), 16), dtype="int8x64"))


@functools.lru_cache(maxsize=None)
def int8_vnni_kernel(k_dim: int, n_dim: int, bias: bool, tile: int):
    """y[m, n] = w_scale[n] * Σ_g x_scale[m, g] * Σ_{k in g} w[k, n] * xq[m, k] (+ bias[n]) for rows x (rows, k)
    (symbolic), w in panels (n/64, k, 64) int8. `tile`: rows per register block (1 for decode). Arguments: x, w,
    w_scale[, bias]; output y; the quantized rows are the kernel's own scratch, as in int8_g32_kernel."""
    K, N, G, R = k_dim, n_dim, k_dim // GROUP, tile

    tasks = N // PANEL

    @T.macro(hygienic=False)
    def body(x, w, ws, b, y, G, tasks, R, rows):  # noqa: N803  (a macro sees its arguments only)
        padded = T.meta_var(padded_rows(rows, R))
        xq = T.decl_buffer((padded, K), "int8")
        xs = T.decl_buffer((padded, G), "float32")
        xsum = T.decl_buffer((padded, G), "int32")
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
        def int8_vnni_linear(x_h: T.handle, w_h: T.handle, ws_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            rows = T.int64()
            x = T.match_buffer(x_h, (rows, K), "float32")
            w = T.match_buffer(w_h, (N // PANEL, K, PANEL), "int8")
            ws = T.match_buffer(ws_h, (N,), "float32")
            b = T.match_buffer(b_h, (N,), "float32")
            y = T.match_buffer(y_h, (rows, N), "float32")
            body(x, w, ws, b, y, G, tasks, R, rows)
        return int8_vnni_linear

    @T.prim_func(private=True)
    def int8_vnni_linear_nb(x_h: T.handle, w_h: T.handle, ws_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, K), "float32")
        w = T.match_buffer(w_h, (N // PANEL, K, PANEL), "int8")
        ws = T.match_buffer(ws_h, (N,), "float32")
        y = T.match_buffer(y_h, (rows, N), "float32")
        body(x, w, ws, None, y, G, tasks, R, rows)
    return int8_vnni_linear_nb


def _out(v, b, i):
    return v + b[i] if b is not None else v


@T.macro(hygienic=False)
def g32_sums(w, s, acc, a0, gs, xq, xs, xsum, t, G, R, rb, L, OB, kind, task, TP):  # noqa: N803
    """acc[a0 + r * task + l] = output l of task t of int8_g32 weight (w, s), row r of row tile rb (quantized rows
    xq, xs, xsum): per group of 32 inputs the integer sums gs, then scaled into the float accumulator."""
    for l in T.vectorized(R * task):
        acc[a0 + l] = T.float32(0)
    for g in T.serial(G):
        for l in T.vectorized(R * task):
            gs[l] = 0
        for c in T.unroll(8):
            for o in T.unroll(OB):
                # the task's part of the 256-byte chunk (4 inputs by 64 outputs), L outputs by 4 inputs
                wv = T.meta_var(_weight_operand(w, t, g * 32 + c * 4, o, L, kind, task))
                for r in T.unroll(R):
                    gs[T.ramp((r * OB + o) * L, 1, L)] = _dot(
                        kind, gs.vload([(r * OB + o) * L], f"int32x{L}"), wv,
                        T.reinterpret(T.broadcast(T.reinterpret(xq.vload(
                            [rb * T.int64(R) + T.int64(r), g * 32 + c * 4], "int8x4"), dtype="int32"), L),
                            dtype=f"int8x{4 * L}"))
        for r in T.unroll(R):
            for l in T.vectorized(task):
                acc[a0 + r * task + l] = acc[a0 + r * task + l] + T.Cast("float32", _unsigned_fix(
                    gs[r * task + l], xsum[rb * T.int64(R) + T.int64(r), g], kind)) * (
                    xs[rb * T.int64(R) + T.int64(r), g] * T.Cast("float32", s[t // TP, g, (t % TP) * task + l]))


@T.macro(hygienic=False)
def g32_store(y, acc, b, c0, n0, R, rb, rows, task):  # noqa: N803
    """y's columns c0 + n0 .. of row tile rb's real rows = acc (+ bias b from n0)."""
    for r in T.unroll(R):
        if rb * T.int64(R) + T.int64(r) < rows:
            for l in T.vectorized(task):
                y[rb * T.int64(R) + T.int64(r), c0 + n0 + l] = _out(acc[r * task + l], b, n0 + l)


@functools.lru_cache(maxsize=None)
def int8_g32_kernel(k_dim: int, n_dim: int, bias: bool, tile: int, kind: str = "vnni", task: int | None = None):
    """y[m, n] = Σ_g x_scale[m, g] * w_scale[g, n] * Σ_{k in g} code[k, n] * xq[m, k] (+ bias[n]) for rows x
    (rows, k) (symbolic); codes (n/64, k, 64) int8 in g32_order, scales f16 panels (n/64, k/32, 64). `tile`: rows
    per register block (1 for decode). `kind`: "vnni" or "sdot". `task`: outputs per parallel task (task_width).
    Arguments: x, codes, scales[, bias]; output y. The quantized rows (int4_vnni.quantize_rows; xsum there is
    8 * Σ xq: 16x it here) are the kernel's own scratch, allocated inside it (the runtime's workspace): as call
    outputs they cost the VM three tensor allocations, a tuple and its release per call (~840 of a decode
    step's ~1,100 allocations under the int8 preset)."""
    if kind not in KINDS:
        raise ValueError(f"no int8 integer kernel for {kind!r}")
    K, N, G, R = k_dim, n_dim, k_dim // GROUP, tile
    task = task or task_width(tile, kind)
    tasks = N // task
    L = LANES[kind]                         # noqa: N806
    OB = task // L                          # noqa: N806  instructions per row and step of 4 inputs
    TP = PANEL // task                      # noqa: N806  tasks per panel

    @T.macro(hygienic=False)
    def body(x, w, s, b, y, G, tasks, R, rows, L, OB, kind, task, TP):  # noqa: N803  (sees its arguments only)
        padded = T.meta_var(padded_rows(rows, R))
        xq = T.decl_buffer((padded, K), "int8")
        xs = T.decl_buffer((padded, G), "float32")
        xsum = T.decl_buffer((padded, G), "int32")
        quantize_rows(x, xq, xs, xsum, G, R, rows)
        for t in T.parallel(tasks):
            acc = T.decl_buffer((R * task,), "float32", scope="local")
            gs = T.decl_buffer((R * task,), "int32", scope="local")
            for rb in T.serial((rows + T.int64(R - 1)) // T.int64(R)):
                g32_sums(w, s, acc, 0, gs, xq, xs, xsum, t, G, R, rb, L, OB, kind, task, TP)
                g32_store(y, acc, b, 0, t * task, R, rb, rows, task)

    if bias:
        @T.prim_func(private=True)
        def int8_g32_linear(x_h: T.handle, w_h: T.handle, s_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            rows = T.int64()
            x = T.match_buffer(x_h, (rows, K), "float32")
            w = T.match_buffer(w_h, (N // PANEL, K, PANEL), "int8")
            s = T.match_buffer(s_h, (N // PANEL, G, PANEL), "float16")
            b = T.match_buffer(b_h, (N,), "float32")
            y = T.match_buffer(y_h, (rows, N), "float32")
            body(x, w, s, b, y, G, tasks, R, rows, L, OB, kind, task, TP)
        return int8_g32_linear

    @T.prim_func(private=True)
    def int8_g32_linear_nb(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, K), "float32")
        w = T.match_buffer(w_h, (N // PANEL, K, PANEL), "int8")
        s = T.match_buffer(s_h, (N // PANEL, G, PANEL), "float16")
        y = T.match_buffer(y_h, (rows, N), "float32")
        body(x, w, s, None, y, G, tasks, R, rows, L, OB, kind, task, TP)
    return int8_g32_linear_nb


@functools.lru_cache(maxsize=None)
def int8_g32_fused_kernel(k_dim: int, n_dims: tuple[int, ...], tile: int, kind: str = "vnni", swiglu: bool = False):
    """Several int8_g32 weights over the same input in one call, the input quantized once (as int4_vnni.py's fused
    kernel): (q, k, v) into one (rows, Nq + Nk + Nv) output, the tasks of the three in one parallel loop; or with
    `swiglu`, (gate, up) into silu(gate) * up (rows, N), each task both weights' outputs. No bias. Arguments: x,
    then (codes, scales) per weight; output y. Each output's sums are int8_g32_kernel's, in the same order; one
    call and one parallel loop where there were three (or two and the SiLU-product kernel)."""
    if kind not in KINDS:
        raise ValueError(f"no int8 integer kernel for {kind!r}")
    K, G, R = k_dim, k_dim // GROUP, tile
    task = task_width(tile, kind)
    L = LANES[kind]                         # noqa: N806
    OB = task // L                          # noqa: N806
    TP = PANEL // task                      # noqa: N806
    if swiglu:
        (N,) = set(n_dims)
        tasks = N // task

        @T.prim_func(private=True)
        def int8_g32_swiglu(x_h: T.handle, wg_h: T.handle, sg_h: T.handle, wu_h: T.handle, su_h: T.handle,
                            y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            rows = T.int64()
            x = T.match_buffer(x_h, (rows, K), "float32")
            wg = T.match_buffer(wg_h, (N // PANEL, K, PANEL), "int8")
            sg = T.match_buffer(sg_h, (N // PANEL, G, PANEL), "float16")
            wu = T.match_buffer(wu_h, (N // PANEL, K, PANEL), "int8")
            su = T.match_buffer(su_h, (N // PANEL, G, PANEL), "float16")
            y = T.match_buffer(y_h, (rows, N), "float32")
            xq = T.decl_buffer((padded_rows(rows, R), K), "int8")
            xs = T.decl_buffer((padded_rows(rows, R), G), "float32")
            xsum = T.decl_buffer((padded_rows(rows, R), G), "int32")
            quantize_rows(x, xq, xs, xsum, G, R, rows)
            for t in T.parallel(tasks):
                acc = T.decl_buffer((2 * R * task,), "float32", scope="local")
                gs = T.decl_buffer((R * task,), "int32", scope="local")
                for rb in T.serial((rows + T.int64(R - 1)) // T.int64(R)):
                    g32_sums(wg, sg, acc, 0, gs, xq, xs, xsum, t, G, R, rb, L, OB, kind, task, TP)
                    g32_sums(wu, su, acc, R * task, gs, xq, xs, xsum, t, G, R, rb, L, OB, kind, task, TP)
                    for r in T.unroll(R):
                        if rb * T.int64(R) + T.int64(r) < rows:
                            for l in T.vectorized(task):
                                y[rb * T.int64(R) + T.int64(r), t * task + l] = acc[r * task + l] * T.sigmoid(
                                    acc[r * task + l]) * acc[R * task + r * task + l]

        return int8_g32_swiglu
    N0, N1, N2 = n_dims
    T0, T1, T2 = (n // task for n in n_dims)

    @T.prim_func(private=True)
    def int8_g32_qkv(x_h: T.handle, w0_h: T.handle, s0_h: T.handle, w1_h: T.handle, s1_h: T.handle,
                     w2_h: T.handle, s2_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, K), "float32")
        w0 = T.match_buffer(w0_h, (N0 // PANEL, K, PANEL), "int8")
        s0 = T.match_buffer(s0_h, (N0 // PANEL, G, PANEL), "float16")
        w1 = T.match_buffer(w1_h, (N1 // PANEL, K, PANEL), "int8")
        s1 = T.match_buffer(s1_h, (N1 // PANEL, G, PANEL), "float16")
        w2 = T.match_buffer(w2_h, (N2 // PANEL, K, PANEL), "int8")
        s2 = T.match_buffer(s2_h, (N2 // PANEL, G, PANEL), "float16")
        y = T.match_buffer(y_h, (rows, N0 + N1 + N2), "float32")
        xq = T.decl_buffer((padded_rows(rows, R), K), "int8")
        xs = T.decl_buffer((padded_rows(rows, R), G), "float32")
        xsum = T.decl_buffer((padded_rows(rows, R), G), "int32")
        quantize_rows(x, xq, xs, xsum, G, R, rows)
        for t in T.parallel(T0 + T1 + T2):
            acc = T.decl_buffer((R * task,), "float32", scope="local")
            gs = T.decl_buffer((R * task,), "int32", scope="local")
            for rb in T.serial((rows + T.int64(R - 1)) // T.int64(R)):
                if t < T0:
                    g32_sums(w0, s0, acc, 0, gs, xq, xs, xsum, t, G, R, rb, L, OB, kind, task, TP)
                    g32_store(y, acc, None, 0, t * task, R, rb, rows, task)
                elif t < T0 + T1:
                    g32_sums(w1, s1, acc, 0, gs, xq, xs, xsum, t - T0, G, R, rb, L, OB, kind, task, TP)
                    g32_store(y, acc, None, N0, (t - T0) * task, R, rb, rows, task)
                else:
                    g32_sums(w2, s2, acc, 0, gs, xq, xs, xsum, t - T0 - T1, G, R, rb, L, OB, kind, task, TP)
                    g32_store(y, acc, None, N0 + N1, (t - T0 - T1) * task, R, rb, rows, task)

    return int8_g32_qkv


def emit_int8_g32_fused(bb, x, weights: list[list], hint: str, swiglu: bool = False, kind: str = "vnni"):
    """int8_g32_fused_kernel on (rows, in) `x` and the int8_g32 parameters (codes, scales) of each weight."""
    from tvm import relax

    rows, k_dim = x.ty.shape.values
    n_dims = tuple(int(ws[0].ty.shape.values[0]) * PANEL for ws in weights)
    one = isinstance(rows, tir.IntImm) and int(rows) == 1
    tile = 1 if one or kind == "sdot" else ROW_TILE
    gv = bb.add_func(int8_g32_fused_kernel(int(k_dim), n_dims, tile, kind, swiglu), f"{INT8_PREFIX}g32_{hint}")
    width = n_dims[0] if swiglu else sum(n_dims)
    args = [x] + [a for ws in weights for a in ws]
    return bb.emit(relax.call_tir(gv, args, relax.TensorType((rows, width), "float32")))


def task_width(tile: int, kind: str) -> int:
    """Outputs per parallel task of int8_g32_kernel. A one-row (decode) call on VNNI takes a whole 64-output panel:
    its stored bytes one contiguous stream and four independent accumulator chains (32 outputs read half of each
    256-byte chunk; one decode step's linears and head ran 15-25 % slower that way, measured interleaved, even
    where 64 leaves the two threads 5 and 4 panels). Row tiles (prefill) keep 32 (4 rows x 2 blocks of sums in
    registers), and so does sdot (8 of its 4-lane blocks)."""
    return PANEL if tile == 1 and kind == "vnni" else TASK


def _weight_operand(w, t, k0, o, lanes: int, kind: str, task: int = TASK):
    """Block `o` (of `lanes` outputs) of task `t`'s `task` outputs, inputs k0..k0+3, as the instruction's weight
    operand: one load (g32_order); unsigned for `vpdpbusd` (w + 128, the sign bit flipped)."""
    tp = PANEL // task
    byte = (t % tp) * (task * 4) + o * (lanes * 4)
    v = w.vload([t // tp, k0 + byte // PANEL, byte % PANEL], f"int8x{4 * lanes}")
    if kind == "vnni":
        return T.bitwise_xor(T.reinterpret(v, dtype="uint8x64"), T.broadcast(T.uint8(128), 64))
    return v


def _dot(kind: str, acc, wv, xb):
    return _intrin(DP if kind == "vnni" else SDOT, f"int32x{LANES[kind]}", acc, wv, xb)


def _unsigned_fix(gsv, xsumv, kind: str):
    """`vpdpbusd` summed (w + 128) * x: less 128 * Σ x (xsum holds 8 * Σ x)."""
    return gsv - xsumv * 16 if kind == "vnni" else gsv


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
    """The kernel on (rows, in) or (batch, seq, in) `x` with int8 parameters `ws` (codes, scales: int8_g32 when
    `groups`, on `kind`'s instruction; else int8_wo on VNNI) and an optional `bias`."""
    from tvm import relax

    *lead, k_dim = x.ty.shape.values
    k_dim = int(k_dim)
    rows = lead[0] if len(lead) == 1 else lead[0] * lead[1]
    x2 = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, (rows, k_dim)))
    n_dim = int(ws[0].ty.shape.values[0]) * PANEL
    one = isinstance(rows, tir.IntImm) and int(rows) == 1
    if groups:
        # x86: ROW_TILE rows x 32 outputs of sums (8 zmm, as int4_vnni.py); arm64: one row's 8 blocks of 4
        tile = 1 if one or kind == "sdot" else ROW_TILE
        func = int8_g32_kernel(k_dim, n_dim, bias is not None, tile, kind)
        name = f"{INT8_PREFIX}g32_{'' if kind == 'vnni' else kind + '_'}{hint}"
    else:
        tile = 1 if one else ROW_TILE // 2
        func, name = int8_vnni_kernel(k_dim, n_dim, bias is not None, tile), f"{INT8_PREFIX}{hint}"
    gv = bb.add_func(func, name)
    args = [x2, *ws] + ([bias] if bias is not None else [])
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((rows, n_dim), "float32")))
    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, (*lead, n_dim)))
