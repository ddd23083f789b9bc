"""Bidirectional multi-head attention as one CPU kernel: scores, softmax and context per head and block of queries.

The three-kernel form (ops.emit_attention's TE kernels and a legalized softmax) wrote the (heads, seq, seq) score
matrix twice and read it twice, ran the softmax over a symbolic row as scalar loops, and summed each query's context
down one dependent chain of vector FMAs: MiniLM int8-dyn spent more time in attention than in its four q/k/v/out
linears. Here each parallel task is one (batch, head): it copies that head's keys transposed once, in blocks of 16
keys (head_dim x 16 contiguous per block), then per block of QUERY_BLOCK queries

- scores: per query and key vector, the head_dim products as one expression in CHAINS interleaved FMA chains (the
  key vector's loads shared by the block's queries), scaled and biased as written to the block's row buffer;
- softmax over each row in 16-lane vectors (exp as the Cephes polynomial topi's fast_exp uses: within float32
  rounding of exp, no libm call), keys past the sequence (padding to 16) given exactly zero weight;
- context: per key vector, its 16 probabilities times their value rows as one expression per query and 16 output
  lanes, added to the query's sums; scaled by 1/sum as written to (batch, seq, heads*head_dim), the layout the
  output linear reads.

Accumulating in local buffers (as a schedule's cache_write would) left a store per FMA: TVM allocates them from
workspace memory, which LLVM must assume aliases the workspace scratch, so they never stay in registers. The
scratch (transposed keys, one block's probabilities) are therefore extra outputs of the call (noalias arguments),
and the sums are expressions.
Written as plain TIR (no schedule to apply): the loop kinds (parallel, unrolled, vectorized) are the schedule.
"""

from __future__ import annotations

import functools
import math

import tvm
from tvm.script import tirx as T

LANES = 16            # f32 lanes of an AVX-512 vector; keys are padded to whole vectors (never read back)
QUERY_BLOCK = 8       # queries per register block: 8 score vectors, 8 x head_dim/16 context vectors
CHAINS = 4            # independent partial sums per dot product (_sum)

_LOG2E = 1.44269504088896341
_C1, _C2 = 0.693359375, -2.12194440e-4            # ln 2 split in two (Cephes), as topi's fast_exp
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_CLAMP = 88.3762626647949


def fast_exp(x):
    """exp(x) for float32 x as topi's fast_exp computes it: 2^n by exponent bits times a degree-7 polynomial of the
    remainder, x clamped to +-88.38 (exp(-88.38) ~ 4e-39: padding keys masked with -1e9 weigh nothing)."""
    f32 = lambda v: tvm.tirx.const(v, "float32")                                  # noqa: E731
    x = tvm.tirx.max(tvm.tirx.min(x, f32(_CLAMP)), f32(-_CLAMP))
    n = tvm.tirx.floor(x * f32(_LOG2E) + f32(0.5))
    r = x - n * f32(_C1) - n * f32(_C2)
    p = f32(_P[0])
    for c in _P[1:]:
        p = p * r + f32(c)
    p = p * r * r + r + f32(1.0)
    bits = tvm.tirx.shift_left(n.astype("int32") + tvm.tirx.const(127, "int32"), tvm.tirx.const(23, "int32"))
    return p * tvm.tirx.reinterpret("float32", bits)


def _sum(terms: list, chains: int = CHAINS):
    """Σ terms as `chains` interleaved running sums added at the end: one long chain of FMAs waits on each
    one's latency (4 cycles) in turn, several keep the FMA units busy."""
    parts = [functools.reduce(lambda x, y: x + y, terms[c::chains]) for c in range(min(chains, len(terms)))]
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def attention_kernel(n_heads: int, head_dim: int, width: int | None = None,
                     offsets: tuple[int, int, int] = (0, 0, 0)) -> tvm.tirx.PrimFunc:
    """out[b, i, h*D + d] = sum_j softmax_j(q_i . k_j / sqrt(D) + bias[b, j]) v[b, j, h*D + d], for symbolic batch and
    sequence. q/k/v are (batch, seq, `width`) inputs read from column `offsets` on: three (batch, seq, heads*D)
    tensors as three linears write them, or one (batch, seq, 3*heads*D) tensor passed three times with offsets
    (0, H, 2H) as the fused q/k/v linear writes it."""
    H, D, QB, L = n_heads * head_dim, head_dim, QUERY_BLOCK, LANES
    W = H if width is None else width
    q0, k0, v0 = offsets
    scale = 1.0 / math.sqrt(head_dim)

    def q_dot_k(Q, kt, b, bh, i, h, jo, l):
        # one query's scores against one key vector, its head_dim products as one expression (no accumulator
        # buffer: TVM puts local buffers in workspace memory, which LLVM cannot keep in registers across a loop)
        return _sum([Q[b, i, T.int64(q0) + h * T.int64(D) + T.int64(d)]
                     * kt[bh, (jo * T.int64(D) + T.int64(d)) * T.int64(L) + l] for d in range(D)])

    def p_dot_v(sc, V, b, bh, row, col, jo, seq):
        # one key vector's 16 probabilities times their value rows (padding keys weigh exactly zero)
        return _sum([sc[bh, row + jo * T.int64(L) + T.int64(l)]
                     * V[b, T.min(jo * T.int64(L) + T.int64(l), seq - T.int64(1)), col] for l in range(L)])

    @T.prim_func(private=True)
    def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, bias_h: T.handle, out_h: T.handle,
                  kt_h: T.handle, sc_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        batch, seq = T.int64(), T.int64()
        Q = T.match_buffer(q_h, (batch, seq, W), "float32")
        K = T.match_buffer(k_h, (batch, seq, W), "float32")
        V = T.match_buffer(v_h, (batch, seq, W), "float32")
        bias = T.match_buffer(bias_h, (batch, seq), "float32")
        out = T.match_buffer(out_h, (batch, seq, H), "float32")
        pad = T.meta_var((seq + T.int64(L - 1)) // T.int64(L))          # key vectors per row
        kt_all = T.match_buffer(kt_h, (batch * T.int64(n_heads), pad * T.int64(D * L)), "float32")
        sc_all = T.match_buffer(sc_h, (batch * T.int64(n_heads), pad * T.int64(QB * L)), "float32")
        for bh in T.parallel(batch * T.int64(n_heads)):
            b = T.meta_var(bh // T.int64(n_heads))
            h = T.meta_var(bh % T.int64(n_heads))
            ctx = T.decl_buffer((QB * D,), "float32", scope="local")
            red = T.decl_buffer((L,), "float32", scope="local")
            stat = T.decl_buffer((QB,), "float32", scope="local")
            for d, j in T.grid(T.int64(D), pad * T.int64(L)):
                kt_all[bh, ((j // T.int64(L)) * T.int64(D) + d) * T.int64(L) + j % T.int64(L)] = K[b, T.min(j, seq - T.int64(1)),
                                                          T.int64(k0) + h * T.int64(D) + d]
            for qb in T.serial((seq + T.int64(QB - 1)) // T.int64(QB)):
                # every local buffer is written before the scores, so their lifetimes overlap and TVM's storage
                # rewrite does not merge them into one buffer of mixed vector widths (LLVM then keeps none in
                # registers: a store per FMA)
                for r in T.unroll(QB):
                    for c in T.vectorized(D):
                        ctx[r * D + c] = T.float32(0)
                for l in T.vectorized(L):
                    red[l] = T.float32(0)
                for jo in T.serial(pad):
                    for r in T.unroll(QB):
                        for l in T.vectorized(L):
                            sc_all[bh, (T.int64(r) * pad + jo) * T.int64(L) + T.int64(l)] = T.Select(
                                jo * T.int64(L) + T.int64(l) < seq,
                                q_dot_k(Q, kt_all, b, bh, T.min(qb * T.int64(QB) + T.int64(r), seq - T.int64(1)), h,
                                        jo, T.int64(l)) * T.float32(scale)
                                + bias[b, T.min(jo * T.int64(L) + T.int64(l), seq - T.int64(1))],
                                T.float32(-3.0e38))
                for r in T.serial(QB):
                    row = T.meta_var(T.int64(r) * pad * T.int64(L))
                    for l in T.vectorized(L):
                        red[l] = sc_all[bh, row + T.int64(l)]
                    for jo in T.serial(pad - T.int64(1)):
                        for l in T.vectorized(L):
                            red[l] = T.max(red[l], sc_all[bh, row + (jo + T.int64(1)) * T.int64(L) + T.int64(l)])
                    stat[r] = red[0]
                    for l in T.unroll(L - 1):
                        stat[r] = T.max(stat[r], red[l + 1])
                    for l in T.vectorized(L):
                        red[l] = T.float32(0)
                    for jo in T.serial(pad):
                        for l in T.vectorized(L):
                            sc_all[bh, row + jo * T.int64(L) + T.int64(l)] = T.Select(
                                jo * T.int64(L) + T.int64(l) < seq,
                                fast_exp(sc_all[bh, row + jo * T.int64(L) + T.int64(l)] - stat[r]), T.float32(0))
                            red[l] = red[l] + sc_all[bh, row + jo * T.int64(L) + T.int64(l)]
                    stat[r] = red[0]
                    for l in T.unroll(L - 1):
                        stat[r] = stat[r] + red[l + 1]
                    stat[r] = T.float32(1) / stat[r]
                for jo in T.serial(pad):
                    for r in T.unroll(QB):
                        for c in T.vectorized(D):
                            ctx[r * D + c] = ctx[r * D + c] + p_dot_v(sc_all, V, b, bh, T.int64(r) * pad * T.int64(L),
                                                                      T.int64(v0) + h * T.int64(D) + T.int64(c), jo, seq)
                for r in T.serial(QB):
                    if qb * T.int64(QB) + T.int64(r) < seq:
                        for c in T.vectorized(D):
                            out[b, qb * T.int64(QB) + T.int64(r), h * T.int64(D) + T.int64(c)] = \
                                ctx[r * D + c] * stat[r]

    return attention


FUSED_NAME = "edgeq_mha"     # not ops.ATTENTION_PREFIX: this kernel carries its own loops, no schedule applies


def emit_fused_attention(bb, q, k, v, mask_bias, n_heads: int, head_dim: int, batch, seq, qkv: bool = False):
    """The fused kernel on (batch, seq, heads*dim) q/k/v and the (batch, seq) additive key bias (`batch`, `seq`:
    their symbolic sizes; `qkv`: q, k and v are one (batch, seq, 3*heads*dim) tensor); returns the context
    in the same layout. Its two scratch outputs (keys transposed, one block's probabilities, per (batch, head))
    are function arguments rather than allocations inside the kernel: TVM puts per-thread scratch in workspace
    memory that LLVM must assume aliases everything."""
    from tvm import relax

    b, s = batch, seq
    H = n_heads * head_dim
    kernel = attention_kernel(n_heads, head_dim, 3 * H, (0, H, 2 * H)) if qkv else attention_kernel(n_heads, head_dim)
    gv = bb.add_func(kernel, FUSED_NAME)
    pad = (s + (LANES - 1)) // LANES
    outs = [relax.TensorType((b, s, n_heads * head_dim), "float32"),
            relax.TensorType((b * n_heads, pad * (head_dim * LANES)), "float32"),
            relax.TensorType((b * n_heads, pad * (QUERY_BLOCK * LANES)), "float32")]
    return bb.emit(relax.TupleGetItem(bb.emit(relax.call_tir(gv, [q, k, v, mask_bias], outs)), 0))
