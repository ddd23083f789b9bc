"""LayerNorm of a residual sum, y = LN(a + b), as one CPU kernel with rows in parallel.

Legalized R.nn.layer_norm ran as one serial loop nest (MiniLM: ~0.9 ms a call for 12 calls on any thread count, a
tenth of an int8 call), after a separate kernel for the residual add. Here each row (rows in parallel) is summed
once into its output row (the add), its mean and the mean of squared deviations taken in 16-lane vectors (two
passes over a row that stays in L1), then normalized, scaled and shifted.
Written as plain TIR (no schedule applies), as attention.py.
"""

from __future__ import annotations

from tvm.script import tirx as T

LANES = 16
LN_NAME = "edgeq_add_layer_norm"


def fits(width: int) -> bool:
    return width % LANES == 0


def add_layer_norm_kernel(width: int, eps: float):
    """y[b, s, :] = (v - mean(v)) / sqrt(var(v) + eps) * gamma + beta with v = a[b, s, :] + r[b, s, :]."""
    H, L = width, LANES
    inv_h = 1.0 / width

    @T.prim_func(private=True)
    def add_layer_norm(a_h: T.handle, r_h: T.handle, g_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        batch, seq = T.int64(), T.int64()
        a = T.match_buffer(a_h, (batch, seq, H), "float32")
        r = T.match_buffer(r_h, (batch, seq, H), "float32")
        gamma = T.match_buffer(g_h, (H,), "float32")
        beta = T.match_buffer(b_h, (H,), "float32")
        y = T.match_buffer(y_h, (batch, seq, H), "float32")
        for m in T.parallel(batch * seq):
            acc = T.decl_buffer((L,), "float32", scope="local")
            stat = T.decl_buffer((2,), "float32", scope="local")
            bi = T.meta_var(m // seq)
            si = T.meta_var(m % seq)
            for l in T.vectorized(L):
                acc[l] = T.float32(0)
            for jo in T.serial(H // L):
                for l in T.vectorized(L):
                    y[bi, si, jo * L + l] = a[bi, si, jo * L + l] + r[bi, si, jo * L + l]
                    acc[l] = acc[l] + y[bi, si, jo * L + l]
            stat[0] = acc[0]
            for l in T.serial(L - 1):
                stat[0] = stat[0] + acc[l + 1]
            stat[0] = stat[0] * T.float32(inv_h)
            for l in T.vectorized(L):
                acc[l] = T.float32(0)
            for jo in T.serial(H // L):
                for l in T.vectorized(L):
                    acc[l] = acc[l] + (y[bi, si, jo * L + l] - stat[0]) * (y[bi, si, jo * L + l] - stat[0])
            stat[1] = acc[0]
            for l in T.serial(L - 1):
                stat[1] = stat[1] + acc[l + 1]
            stat[1] = T.float32(1) / T.sqrt(stat[1] * T.float32(inv_h) + T.float32(eps))
            for jo in T.serial(H // L):
                for l in T.vectorized(L):
                    y[bi, si, jo * L + l] = ((y[bi, si, jo * L + l] - stat[0]) * stat[1] * gamma[jo * L + l]
                                             + beta[jo * L + l])

    return add_layer_norm


def emit_add_layer_norm(bb, a, r, gamma, beta, width: int, eps: float):
    """LN(a + r) over the last axis of (batch, seq, width) tensors, gamma and beta parameters already added."""
    from tvm import relax

    b, s, _ = a.ty.shape.values
    gv = bb.add_func(add_layer_norm_kernel(width, eps), LN_NAME)
    return bb.emit(relax.call_tir(gv, [a, r, gamma, beta], relax.TensorType((b, s, width), "float32")))
