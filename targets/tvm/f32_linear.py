"""f32 linears of CPU encoders as one hand-written kernel: row blocks' sums in registers down the reduction.

schedule.py keeps a row block's sums in registers for one row dimension only; an encoder's (batch, seq) rows left
every sum in memory (MiniLM f32's linears ran at ~9 G multiply-adds/s a core, onnxruntime's at ~40). Here each
parallel task is one stored weight panel (ops.panels: 64 outputs, contiguous down the inputs); per block of ROWS
rows it keeps ROWS x 64 sums in ROWS separate local vectors (each under LLVM's alloca limit, so they become
registers: ROWS x 4 AVX-512 vectors), and per input multiplies one broadcast activation per row by the panel's
64 weights. The sums run over the inputs in order, as the TE kernel's; the bias (and a fused GELU) is applied
in one pass over the panel after.
Written as plain TIR (no schedule applies), as attention.py and amx.py.
"""

from __future__ import annotations

from tvm.script import tirx as T

ROWS = 4             # rows per register block (4 x 64 sums: 16 AVX-512 vectors)
PANEL_OUT = 64       # outputs per task: one stored panel
KC = 64              # inputs per pass over the row blocks: the panel's 64 x 64 weights stay in L1
F32_PREFIX = "edgeq_f32_linear_"


def fits(k_dim: int, n_dim: int, panel: int) -> bool:
    return panel == PANEL_OUT and n_dim % PANEL_OUT == 0 and k_dim % KC == 0


def f32_linear_kernel(k_dim: int, n_dim: int, gelu: bool = False):
    """y[b, s, n] = Σ_k x[b, s, k] W[k, n] + bias[n] for symbolic batch and sequence, W in panels (n/64, k, 64)."""
    from edgeq.targets.tvm.gelu import gelu_expr

    K, N, P = k_dim, n_dim, PANEL_OUT

    def out(v):
        return gelu_expr(v) if gelu else v

    @T.prim_func(private=True)
    def f32_linear(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        batch, seq = T.int64(), T.int64()
        x = T.match_buffer(x_h, (batch, seq, K), "float32")
        w = T.match_buffer(w_h, (N // P, K, P), "float32")
        bias = T.match_buffer(b_h, (N,), "float32")
        y = T.match_buffer(y_h, (batch, seq, N), "float32")
        rows = T.meta_var(batch * seq)
        blocks = T.meta_var((batch * seq + T.int64(ROWS - 1)) // T.int64(ROWS))
        for p in T.parallel(T.int64(N // P)):
            a0 = T.decl_buffer((P,), "float32", scope="local")
            a1 = T.decl_buffer((P,), "float32", scope="local")
            a2 = T.decl_buffer((P,), "float32", scope="local")
            a3 = T.decl_buffer((P,), "float32", scope="local")
            for kc in T.serial(K // KC):
                for rb in T.serial(blocks):
                    m0 = T.meta_var(rb * T.int64(ROWS))
                    r0 = T.meta_var(m0)
                    r1 = T.meta_var(T.min(m0 + T.int64(1), rows - T.int64(1)))
                    r2 = T.meta_var(T.min(m0 + T.int64(2), rows - T.int64(1)))
                    r3 = T.meta_var(T.min(m0 + T.int64(3), rows - T.int64(1)))
                    for l in T.vectorized(P):
                        a0[l] = T.Select(kc == 0, T.float32(0), y[r0 // seq, r0 % seq, p * T.int64(P) + l])
                        a1[l] = T.Select(kc == 0, T.float32(0), y[r1 // seq, r1 % seq, p * T.int64(P) + l])
                        a2[l] = T.Select(kc == 0, T.float32(0), y[r2 // seq, r2 % seq, p * T.int64(P) + l])
                        a3[l] = T.Select(kc == 0, T.float32(0), y[r3 // seq, r3 % seq, p * T.int64(P) + l])
                    for kk in T.serial(KC):
                        for l in T.vectorized(P):
                            a0[l] = a0[l] + x[r0 // seq, r0 % seq, kc * KC + kk] * w[p, kc * KC + kk, l]
                            a1[l] = a1[l] + x[r1 // seq, r1 % seq, kc * KC + kk] * w[p, kc * KC + kk, l]
                            a2[l] = a2[l] + x[r2 // seq, r2 % seq, kc * KC + kk] * w[p, kc * KC + kk, l]
                            a3[l] = a3[l] + x[r3 // seq, r3 % seq, kc * KC + kk] * w[p, kc * KC + kk, l]
                    for l in T.vectorized(P):
                        y[r0 // seq, r0 % seq, p * T.int64(P) + l] = a0[l]
                    if m0 + T.int64(1) < rows:
                        for l in T.vectorized(P):
                            y[r1 // seq, r1 % seq, p * T.int64(P) + l] = a1[l]
                    if m0 + T.int64(2) < rows:
                        for l in T.vectorized(P):
                            y[r2 // seq, r2 % seq, p * T.int64(P) + l] = a2[l]
                    if m0 + T.int64(3) < rows:
                        for l in T.vectorized(P):
                            y[r3 // seq, r3 % seq, p * T.int64(P) + l] = a3[l]
            # the bias (and GELU: ops.gelu_expr, as emit_gelu's kernel) over the panel's sums, still in cache
            for m in T.serial(rows):
                for l in T.vectorized(P):
                    y[m // seq, m % seq, p * T.int64(P) + l] = out(y[m // seq, m % seq, p * T.int64(P) + l]
                                                                   + bias[p * T.int64(P) + l])

    return f32_linear


def emit_f32_linear(bb, params, x, name: str, w, bias, d, hint: str, gelu: bool = False):
    """The kernel on (batch, seq, in) `x` for an f32 weight `w` (out, in) and its bias (GELU after when `gelu`), when
    its shape fits (else None): the parameters are emit_linear's (same names and panels), so the params file does not
    change."""
    from tvm import relax

    from edgeq.targets.tvm.ops import weight_arrays
    from edgeq.targets.tvm.panel import panel_width

    n_dim, k_dim = w.shape
    shape = x.ty.shape
    if (d.format != "f32" or bias is None or shape is None or len(shape.values) != 3
            or not fits(k_dim, n_dim, panel_width(n_dim))):
        return None
    (wn, wa), = weight_arrays(name, w, d)
    wv = params.add(wn, wa)
    bv = params.add(name.removesuffix(".weight") + ".bias", bias.astype("float32"))
    b, s, _ = shape.values
    gv = bb.add_func(f32_linear_kernel(k_dim, n_dim, gelu), f"{F32_PREFIX}{hint}")
    return bb.emit(relax.call_tir(gv, [x, wv, bv], relax.TensorType((b, s, n_dim), "float32")))
