"""A Llama-family decoder as Relax functions with an explicit KV cache.

Three entry functions over the same weights (parameters after the model inputs, in
one order):

- `prefill(input_ids[seq], past, k_0[kv, capacity, d], v_0[kv, capacity, d], ...)`: any number of new tokens,
  logits at every position (evaluation, perplexity).
- `decode(input_ids[1], k_0, v_0, ...)`: one token; its kernels have static shapes
  except the attention's past length, so meta-schedule can tune them.
- `prefill_last`: as `prefill`, logits of the last token only (what generation reads): the
  last layer's query, attention output, MLP and the head run on that one row, on the decode
  step's kernels. The head over every row was 0.6 of SmolLM2's 1.36 s prefill of 128 tokens.

All return `(logits[n, vocab], k_0, v_0, ...)` (n = 1 for `prefill_last`). The caches are fixed-capacity
arrays the runtime allocates once (`capacity` rows, its n_ctx); `past` (a shape) says how many rows are
filled. Each layer's new keys (RoPE applied) and values are written in place at rows `past .. past + n - 1`
(`kv_append`, call_tir_inplace), and the attention reads the first `past + n` rows: a decode step writes
one row per layer, where concatenating grown caches copied all of them every step. The returned caches are
the arrays passed in. Positions are `past .. past + n - 1`.
RoPE is a cos/sin table per position computed in float64 the way the reference
executor does (linear and llama3 scaling, GGUF's frequency factors), stored as a
parameter: the TVM result follows the reference's rounding, not a re-derivation.

Structured widths (FFN width, head counts) are read from the weight shapes in one
place (`Widths`). With a pruning table (`--pruning-rates`) each layer's MLP width is a
symbolic variable (`ffn_units_i` panels of 64 channels) in both functions, so one
library runs the model at every rate; the runtime slices the stored MLP arrays to a
rate's widths at load (`pruning_recipe` says which arrays, along which axis).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from tvm import relax, te
from tvm import tirx as tir

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import rope_inv_freq
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.models import llama, names
from edgeq.models.llama import LlamaConfig
from edgeq.targets.tvm.int4_vnni import emit_int4_vnni_fused
from edgeq.targets.tvm.int4_vnni import fits as int4_fits
from edgeq.targets.tvm.int8_vnni import emit_int8_g32_fused
from edgeq.targets.tvm.int8_vnni import fits as int8_fits
from edgeq.targets.tvm.ops import (
    ATTENTION_PREFIX,
    SCORE_KEYS,
    Params,
    emit_embedding,
    emit_linear,
    emit_linear_vars,
    emit_lora_slot,
    int4_value,
    int8_g32_value,
    stored,
    stored_channel_axis,
    sym,
)

R = relax.op
ROPE_COS, ROPE_SIN = "rope.cos", "rope.sin"
ENTRIES = ("prefill", "decode", "prefill_last")
LAST_ONLY = "prefill_last"        # the entry that returns the last position's logits only
PAST = "past"                     # the shape input: rows of the cache already filled
CAPACITY = "capacity"             # the cache's rows, as the runtime allocated them
TOTAL = "total"                   # past + the call's new tokens: the rows attention reads
KV_CACHE = "in_place"             # manifest `tvm.kv_cache`: fixed-capacity caches written in place
WEIGHTS_FROM = "edgeq.weights_from"   # function attribute: the index of the first weight parameter


@dataclass(frozen=True)
class Widths:
    """The structured widths of one layer (pruning turns these into tir vars)."""

    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @classmethod
    def of(cls, graph: Graph, layer: int) -> "Widths":
        cfg: LlamaConfig = graph.config
        p = f"model.layers.{layer}."
        return cls(heads=graph.weights[p + "self_attn.q_proj.weight"].shape[0] // cfg.head_dim,
                   kv_heads=graph.weights[p + "self_attn.k_proj.weight"].shape[0] // cfg.head_dim,
                   head_dim=cfg.head_dim, ffn=graph.weights[p + "mlp.gate_proj.weight"].shape[0])


def pruning_recipe(graph: Graph, params: dict[str, np.ndarray]) -> list[list[dict]]:
    """Per layer, the stored arrays that hold the MLP's channels: name, axis, elements per channel (a fraction)."""
    out = []
    for i in range(graph.config.n_layers):
        items = []
        for name, axis in zip(llama.mlp_weights(i), (0, 0, 1)):
            full = graph.weights[name].shape[axis]
            for suffix in ("", ".scale"):
                if name + suffix not in params:
                    continue
                a = params[name + suffix]
                ax = stored_channel_axis(a, axis)
                per = Fraction(int(a.shape[ax]), full)
                items.append({"param": name + suffix, "axis": ax, "per_channel": [per.numerator, per.denominator]})
        out.append(items)
    return out


def rope_tables(graph: Graph, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (n_pos, head_dim/2), float32, exactly as the reference executor rounds them."""
    cfg: LlamaConfig = graph.config
    attrs = {"theta": cfg.rope_theta, "head_dim": cfg.head_dim, "scaling": cfg.rope_scaling}
    factors = graph.weights["rope_freqs.weight"].numpy() if "rope_freqs.weight" in graph.weights else None
    inv = rope_inv_freq(attrs, factors)
    ang = np.arange(n_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def kv_specs(graph: Graph) -> list[dict]:
    """The cache inputs, in call order: name, dtype, shape (the `capacity` the runtime allocates, symbolic)."""
    out = []
    for i in range(graph.config.n_layers):
        w = Widths.of(graph, i)
        for kind in ("k", "v"):
            out.append({"name": f"{kind}_{i}", "dtype": "float32", "shape": [w.kv_heads, CAPACITY, w.head_dim]})
    return out


def lower_decoder(graph: Graph, plan: Plan, progress=None, imatrix: dict[str, np.ndarray] | None = None,
                  branches: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                  params_type: type[Params] = Params,
                  lora_slots: list[str] | tuple[str, ...] = (), dot: str = "generic",
                  cpu_attention: bool = False, gpu: bool = False) -> tuple[relax.BlockBuilder, Params]:
    """`imatrix`: per weight, the importance (E[x²] per input) its format's quantizer weights errors by.
    `branches`: low-rank error branches {weight: (A (r, in), B (out, r))}, y = W_q·x + B·(A·x).
    `params_type`: SizingParams to keep only the stored arrays' sizes (targets/tvm/layout.py).
    `lora_slots`: weights that take users' LoRA adapters at run time (`--adapter-mode separate`): each gets
    factor parameters of a symbolic rank (ops.emit_lora_slot), zeros in the params file.
    `cpu_attention`: the attention's scores in the form the CPU schedule takes (llvm targets; _attention).
    `gpu`: a CUDA build (the cache writes bound to GPU threads; _kv_append_kernel)."""
    cfg: LlamaConfig = graph.config
    if graph.arch != "llama":
        raise EdgeqError(None, f"the TVM decoder lowering knows the llama family, not {graph.arch!r}")
    branches = dict(branches or {})
    if names.EMBED in branches:
        raise EdgeqError(None, f"a low-rank branch on {names.EMBED} is not lowered on TVM (it would apply to the token "
                               "lookup as well as the head); plan it with rank 0")
    if names.EMBED in lora_slots or (cfg.tied_embeddings and names.LM_HEAD in lora_slots):
        raise EdgeqError(None, "a LoRA adapter on the token embedding is not lowered on TVM")
    unknown = sorted((set(branches) | set(lora_slots)) - set(graph.weights))
    if unknown:
        raise EdgeqError(None, f"low-rank branch for {unknown[0]}, which the model does not have")
    n_pos = int(cfg.context_length)
    cos, sin = rope_tables(graph, n_pos)
    cache: dict[str, np.ndarray] = {}
    imatrix = imatrix or {}

    def W(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = graph.weights[name].numpy()
        return cache[name]

    bb = relax.BlockBuilder()
    params = None
    once: dict | None = {} if params_type is Params else None     # each weight quantized once for all entries
    for entry in ENTRIES:
        p = params_type(dot=dot, stored=once)
        seq = 1 if entry == "decode" else sym("seq")
        units = [sym(f"ffn_units_{i}") for i in range(cfg.n_layers)] if plan.pruning else None
        _function(bb, p, graph, plan, W, imatrix, branches, entry, seq, cos, sin,
                  progress if entry == ENTRIES[0] else None, units, frozenset(lora_slots), cpu_attention, gpu)
        if params is not None and list(params.arrays) != list(p.arrays):
            raise AssertionError("prefill and decode must take the same parameters")
        params = p
        cache.clear()
    return bb, params


def _function(bb: relax.BlockBuilder, params: Params, graph: Graph, plan: Plan, W, imatrix: dict, branches: dict,
              entry: str, seq, cos: np.ndarray, sin: np.ndarray, progress, units: list | None = None,
              lora_slots: frozenset = frozenset(), cpu_attention: bool = False, gpu: bool = False) -> None:
    """`units`: per layer, a symbolic count of the MLP's 64-channel panels (pruning), or None for static widths.
    `lora_slots`: weights that take LoRA factors as parameters (ops.emit_lora_slot). `cpu_attention`: _attention."""
    cfg: LlamaConfig = graph.config
    past, cap = sym(PAST), sym(CAPACITY)
    ids = relax.Var("input_ids", relax.TensorType((seq,), "int32"))
    past_in = relax.Var(PAST, relax.ShapeType([past]))
    kv_in = [relax.Var(s["name"], relax.TensorType((s["shape"][0], cap, s["shape"][2]), "float32"))
             for s in kv_specs(graph)]
    d = cfg.head_dim
    # the decode step's only symbolic extent is `past`: bounded, its scratch (scores, probabilities) is planned
    # once instead of allocated every step
    attrs = ({"tir_var_upper_bound": {PAST: int(cfg.context_length), TOTAL: int(cfg.context_length) + 1}}
             if entry == "decode" else {})
    # the parameters after the model's inputs are the stored weights (build.py's DropWeightChecks)
    with bb.function(entry, attrs={**attrs, WEIGHTS_FROM: 2 + len(kv_in)}):
        with bb.dataflow():
            # past + seq as one variable of its own: a kernel whose shapes leave two variables unbound gets them as
            # parameters in a set's order (TVM's emit_te), which differs from process to process (byte identity)
            total = sym(TOTAL)
            bb.match_cast(relax.ShapeExpr([past + seq]), relax.ShapeType([total]))
            d_emb = plan.tensors[names.EMBED]
            if cfg.tied_embeddings:          # stored once, input-major for the head; the lookup reads columns
                table = [params.add(n, a) for n, a in params.weight_arrays(names.EMBED, W(names.EMBED), d_emb,
                                                                            imatrix.get(names.EMBED))]
                h = _lookup_columns(bb, ids, d_emb.format, table)
            else:
                h = emit_embedding(bb, params, ids, names.EMBED, W(names.EMBED), d_emb)
            cos_v = params.add(ROPE_COS, cos)
            sin_v = params.add(ROPE_SIN, sin)
            kv_out = []
            layers = range(cfg.n_layers)
            for i in (progress(layers, desc="lower tvm", unit="layer") if progress else layers):
                pre = f"model.layers.{i}."
                w = Widths.of(graph, i)

                def lin(x, name, hint, bias=False, channels=None):
                    b = W(pre + name + ".bias") if bias else None
                    wn = pre + name + ".weight"
                    y = emit_linear(bb, params, x, wn, W(wn), b, plan.tensors[wn], hint=hint, imatrix=imatrix.get(wn),
                                    branch=branches.get(wn), channels=channels)
                    if wn in lora_slots:
                        y = emit_lora_slot(bb, params, x, y, wn, graph.weights[wn].shape, hint)
                    return y

                def fused(x, projections, hint, swiglu=False):
                    """One call running these projections on x, the input quantized once (q/k/v into one output;
                    gate/up into silu(gate) * up), when they are all int4_g32 or all int8_g32 on the VNNI kernels
                    (no bias, branch or LoRA slot; static 64-output panels), else None (one call each)."""
                    wns = [pre + n + ".weight" for n in projections]
                    fmts = {plan.tensors[wn].format for wn in wns}
                    if params.dot not in ("vnni", "amx") or len(fmts) != 1 or fmts - {"int4_g32", "int8_g32"} or any(
                            wn in branches or wn in lora_slots for wn in wns):
                        return None
                    four = fmts == {"int4_g32"}
                    fits, dtype = (int4_fits, "uint8") if four else (int8_fits, "int8")
                    arrays = [params.weight_arrays(wn, W(wn), plan.tensors[wn], imatrix.get(wn)) for wn in wns]
                    if any(len(a) != 2 or a[0][1].ndim != 3 or a[0][1].shape[2] != 64 for a in arrays) or \
                            not all(fits(x.ty.shape, relax.TensorType(a[0][1].shape, dtype).shape) for a in arrays):
                        return None
                    weights = [[params.add(n, arr) for n, arr in a] for a in arrays]
                    emit = emit_int4_vnni_fused if four else emit_int8_g32_fused
                    return emit(bb, x, weights, hint, swiglu=swiglu)

                xa = _rms_norm(bb, params, h, pre + "input_layernorm.weight", W, cfg.rms_eps)
                bias = cfg.attention_bias
                # the last layer of `prefill_last`: keys and values of every new token (the cache), the rest of
                # the layer on the last token's row only (its query, attention output, MLP; then the head)
                last = entry == LAST_ONLY and i == cfg.n_layers - 1
                nq, xq, q_pos = (1, _last_row(bb, xa), total - 1) if last else (seq, xa, past)
                y = None if last or bias else fused(xa, ("self_attn.q_proj", "self_attn.k_proj",
                                                         "self_attn.v_proj"), "qkv")
                if y is not None:           # one call, the input quantized once; q, k and v read from its columns
                    nqc, nkc = w.heads * d, w.kv_heads * d
                    q = _rope(bb, y, cos_v, sin_v, q_pos, w.heads, d)
                    k_all, v_all = _kv_append(bb, kv_in[2 * i], kv_in[2 * i + 1], y, y, cos_v, sin_v, past, w,
                                              gpu=gpu, k0=nqc, v0=nqc + nkc)
                else:
                    q = _rope(bb, lin(xq, "self_attn.q_proj", "q", bias), cos_v, sin_v, q_pos, w.heads, d)
                    k_all, v_all = _kv_append(bb, kv_in[2 * i], kv_in[2 * i + 1],
                                              lin(xa, "self_attn.k_proj", "k", bias),
                                              lin(xa, "self_attn.v_proj", "v", bias), cos_v, sin_v, past, w,
                                              gpu=gpu)
                kv_out += [k_all, v_all]
                att = _attention(bb, q, k_all, v_all, w, nq, total, cpu_attention)
                h1 = bb.emit(R.add(_last_row(bb, h) if last else h, lin(att, "self_attn.o_proj", "o")))
                xm = _rms_norm(bb, params, h1, pre + "post_attention_layernorm.weight", W, cfg.rms_eps)
                rows, cols = ((0, units[i]), (1, units[i])) if units is not None else (None, None)
                # silu(gate) * up straight from one call
                act = None if units is not None else fused(xm, ("mlp.gate_proj", "mlp.up_proj"), "gate_up", True)
                if act is None:
                    g = lin(xm, "mlp.gate_proj", "gate", channels=rows)
                    u = lin(xm, "mlp.up_proj", "up", channels=rows)
                    act = bb.emit(R.multiply(R.nn.silu(g), u))
                h = bb.emit(R.add(h1, lin(act, "mlp.down_proj", "down", channels=cols)))
            hn = _rms_norm(bb, params, h, names.FINAL_NORM, W, cfg.rms_eps)
            if cfg.tied_embeddings:
                # the head's activations in int8 groups only beside 4-bit linears, whose error dwarfs theirs: with the
                # int8 preset it measured KLD 0.0057 against 0.0039 for llama.cpp's q8_0 (4 windows)
                four_bit = any(t.format == "int4_g32" for n, t in plan.tensors.items() if n.startswith("model.layers."))
                logits = emit_linear_vars(bb, hn, d_emb.format, table, None, hint="head", dot=params.dot,
                                          int8_act=four_bit)
            else:
                logits = emit_linear(bb, params, hn, names.LM_HEAD, W(names.LM_HEAD), None,
                                     plan.tensors[names.LM_HEAD], hint="head", imatrix=imatrix.get(names.LM_HEAD),
                                     branch=branches.get(names.LM_HEAD))
                if names.LM_HEAD in lora_slots:
                    logits = emit_lora_slot(bb, params, hn, logits, names.LM_HEAD, graph.weights[names.LM_HEAD].shape,
                                            "head")
            out = bb.emit_output(relax.Tuple([logits, *kv_out]))
        bb.emit_func_output(out, params=[ids, past_in, *kv_in, *params.vars])


def _lookup_columns(bb, ids, fmt: str, table: list[relax.Var]):
    """Token rows of a table stored as the head's weight (weight_arrays: input-major panels): output `id` of each
    array, decoded as the linear kernel decodes it, so lookup and head read the same stored values."""

    def f(it, *ws):
        w = ws[0]
        hidden = w.shape[1] * (2 if fmt == "int4_g32" else 1)

        def val(i, c):
            t = it[i]
            if fmt == "f32":
                return stored(w, c, t)
            if fmt in ("f16", "int8_wo"):
                x = stored(w, c, t).astype("float32")
                return x * ws[1][t] if fmt == "int8_wo" else x
            if fmt == "int4_g32":
                return int4_value(w, ws[1], c, t)
            if fmt == "int8_g32":
                return int8_g32_value(w, ws[1], c, t)
            raise EdgeqError(None, f"format {fmt} cannot carry the token table on TVM")

        return te.compute((it.shape[0], hidden), val, name="lookup")

    return bb.emit_te(f, ids, *table, primfunc_name_hint="token_lookup")


def _last_row(bb, x):
    """The last row of a 2-D (rows, n) tensor, as (1, n)."""

    def f(xt):
        return te.compute((1, xt.shape[1]), lambda _, j: xt[xt.shape[0] - 1, j], name="last_row")

    return bb.emit_te(f, x, primfunc_name_hint="last_row")


def _rms_norm(bb, params: Params, x, name: str, W, eps: float):
    w = params.add(name, W(name).astype(np.float32))
    return bb.emit(R.nn.rms_norm(x, w, axes=[-1], epsilon=float(eps)))


def _rope(bb, x, cos_t, sin_t, pos0, heads: int, d: int, col0: int = 0):
    """Rotate-half RoPE on the projection's (rows, heads*d) output at positions pos0, pos0+1, ..., as (rows, heads,
    d); cos/sin read from the whole tables (n_pos, d/2) at those rows (no per-call copy of the rows). `col0`: where
    the heads start in x's columns (a fused q/k/v output)."""

    def f(xt, ct, st, p0):
        half = d // 2

        def val(i, h, j):
            lo = j < half
            jj = tir.if_then_else(lo, j, j - half)
            a = xt[i, col0 + h * d + jj]
            b = xt[i, col0 + h * d + jj + half]
            p = p0 + i
            return tir.if_then_else(lo, a * ct[p, jj] - b * st[p, jj], b * ct[p, jj] + a * st[p, jj])

        return te.compute((xt.shape[0], heads, d), val, name="rope")

    return bb.emit_te(f, x, cos_t, sin_t, pos0, primfunc_name_hint="rope")


def _kv_append_kernel(kv: int, d: int, gpu: bool, kw: int, k0: int, vw: int, v0: int) -> tir.PrimFunc:
    """k_cache[h, past+i, :] = rope(k[i, h*d:(h+1)*d]) at position past+i, v_cache[h, past+i, :] = v[i, h*d:...],
    written in place (call_tir_inplace: the caches are this call's outputs). Rows before `past` and after
    `past+seq` are not touched: a decode step writes its one row, not a copy of the cache. Plain TIR (no schedule
    applies); on CUDA one block per head, a thread per dimension. k and v are (seq, kw) and (seq, vw) tensors, their
    heads from columns k0 and v0 on (the one output of a fused q/k/v call, or the k and v projections)."""
    from tvm.script import tirx as T

    half = d // 2

    @T.macro
    def body(KC, VC, K, V, C, S, past, seq, h, j):
        for i in T.serial(seq):
            a = T.meta_var(K[i, T.int64(k0) + h * T.int64(d) + j])
            b = T.meta_var(K[i, T.int64(k0) + h * T.int64(d) + j + T.int64(half)])
            c = T.meta_var(C[past + i, j])
            s = T.meta_var(S[past + i, j])
            KC[h, past + i, j] = a * c - b * s
            KC[h, past + i, j + T.int64(half)] = b * c + a * s
            VC[h, past + i, j] = V[i, T.int64(v0) + h * T.int64(d) + j]
            VC[h, past + i, j + T.int64(half)] = V[i, T.int64(v0) + h * T.int64(d) + j + T.int64(half)]

    if gpu:
        @T.prim_func(private=True)
        def kv_append(kc_h: T.handle, vc_h: T.handle, k_h: T.handle, v_h: T.handle, c_h: T.handle, s_h: T.handle,
                      past: T.int64):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            cap, seq, n_pos = T.int64(), T.int64(), T.int64()
            KC = T.match_buffer(kc_h, (kv, cap, d), "float32")
            VC = T.match_buffer(vc_h, (kv, cap, d), "float32")
            K = T.match_buffer(k_h, (seq, kw), "float32")
            V = T.match_buffer(v_h, (seq, vw), "float32")
            C = T.match_buffer(c_h, (n_pos, half), "float32")
            S = T.match_buffer(s_h, (n_pos, half), "float32")
            for h in T.thread_binding(T.int64(kv), thread="blockIdx.x"):
                for j in T.thread_binding(T.int64(half), thread="threadIdx.x"):
                    body(KC, VC, K, V, C, S, past, seq, h, j)

        return kv_append

    @T.prim_func(private=True)
    def kv_append(kc_h: T.handle, vc_h: T.handle, k_h: T.handle, v_h: T.handle, c_h: T.handle, s_h: T.handle,
                  past: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        cap, seq, n_pos = T.int64(), T.int64(), T.int64()
        KC = T.match_buffer(kc_h, (kv, cap, d), "float32")
        VC = T.match_buffer(vc_h, (kv, cap, d), "float32")
        K = T.match_buffer(k_h, (seq, kw), "float32")
        V = T.match_buffer(v_h, (seq, vw), "float32")
        C = T.match_buffer(c_h, (n_pos, half), "float32")
        S = T.match_buffer(s_h, (n_pos, half), "float32")
        for h in T.serial(T.int64(kv)):
            for j in T.vectorized(T.int64(half)):
                body(KC, VC, K, V, C, S, past, seq, h, j)

    return kv_append


def _kv_append(bb, k_cache, v_cache, k, v, cos_t, sin_t, past, w: Widths, gpu: bool, k0: int = 0, v0: int = 0):
    """The new tokens' keys (RoPE applied) and values written into the layer's caches at rows past.. (one kernel,
    in place); returns the caches as written (the same arrays)."""
    kw, vw = (int(t.ty.shape.values[1]) for t in (k, v))
    gv = bb.add_func(_kv_append_kernel(w.kv_heads, w.head_dim, gpu, kw, k0, vw, v0), "kv_append")
    outs = [k_cache.ty, v_cache.ty]
    call = relax.call_tir_inplace(gv, [k_cache, v_cache, k, v, cos_t, sin_t, past], [0, 1], outs)
    res = bb.emit(call)
    return bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))


def _attention(bb, q, k_all, v_all, w: Widths, seq, total, cpu: bool = False):
    """Causal GQA attention of the new queries over the whole cache: (seq, heads*d). `cpu`: the scores in the
    form the CPU schedule takes (schedule.schedule_attention); else a plain reduction, which dlight schedules for
    CUDA with a symbolic cache length.

    Scores and the weighted sum read the caches' first `total` rows in place ((kv, capacity, d): the rows after
    are not read); query head h uses key/value head h // (heads / kv_heads), as the reference does."""
    d, nkv = w.head_dim, w.kv_heads
    rep = w.heads // nkv
    qg = bb.emit(R.reshape(q, (seq, nkv, rep, d)))    # (rows, heads, d) from _rope
    scale = tir.const(float(np.float32(1.0 / np.sqrt(d))), "float32")

    def scores(qt, kt, t):
        n = qt.shape[0]
        kk = te.reduce_axis((0, d), "kk")
        return te.compute((nkv, rep, n, t), lambda g, r, i, j: te.sum(qt[i, g, r, kk] * kt[g, j, kk], axis=kk),
                          name="scores")

    def scores_cpu(qt, kt_in, t):
        """The encoder's scores kernel (ops.emit_attention), whose CPU schedule it takes: the keys transposed per
        group and padded to whole SCORE_KEYS blocks, a block of one query's scores in registers down the head
        dimension; the same sums in the same order as `scores`. Plain loops were 0.07 of a 128-token prefill."""
        n = qt.shape[0]
        padded = ((t - 1) // SCORE_KEYS + 1) * SCORE_KEYS
        kt = te.compute((nkv, d, padded), lambda g, dd, j: kt_in[g, tir.min(j, t - 1), dd], name="kt")
        kk = te.reduce_axis((0, d), "kk")
        raw = te.compute((nkv, rep, n, padded), lambda g, r, i, j: te.sum(qt[i, g, r, kk] * kt[g, kk, j], axis=kk),
                         name="scores")
        return te.compute((nkv, rep, n, t), lambda g, r, i, j: raw[g, r, i, j], name="scores_epi")

    def masked_softmax(st):
        """softmax over keys of scale * scores, keys after the query's position excluded (the reference's order:
        scale, mask, subtract the max, exp, normalise). One kernel with the mask inside keeps the scores
        kernel a plain reduction, which dlight schedules for CUDA with a symbolic cache length."""
        n, t = st.shape[2], st.shape[3]
        ok = lambda i, j: j <= i + (t - n)                                                # noqa: E731
        j1, j2 = te.reduce_axis((0, t), "j1"), te.reduce_axis((0, t), "j2")
        val = lambda g, r, i, j: st[g, r, i, j] * scale                                   # noqa: E731
        mx = te.compute((nkv, rep, n), lambda g, r, i: te.max(
            tir.if_then_else(ok(i, j1), val(g, r, i, j1), tir.min_value("float32")), axis=j1), name="row_max")
        ex = te.compute(st.shape, lambda g, r, i, j: tir.if_then_else(
            ok(i, j), te.exp(val(g, r, i, j) - mx[g, r, i]), tir.const(0.0, "float32")), name="row_exp")
        sm = te.compute((nkv, rep, n), lambda g, r, i: te.sum(ex[g, r, i, j2], axis=j2), name="row_sum")
        return te.compute(st.shape, lambda g, r, i, j: ex[g, r, i, j] / sm[g, r, i], name="probs")

    st = (bb.emit_te(scores_cpu, qg, k_all, total, primfunc_name_hint=ATTENTION_PREFIX + "scores") if cpu else
          bb.emit_te(scores, qg, k_all, total, primfunc_name_hint="attn_scores"))
    probs = bb.emit_te(masked_softmax, st,
                       primfunc_name_hint="attn_softmax")

    def weighted(pt, vt, t):
        """Named as the encoder's context kernel, whose CPU schedule (schedule.schedule_attention) it takes: (query,
        group, head) in parallel, then the keys, the head dimension innermost in registers. Left as plain loops
        it was 0.3 of SmolLM2's prefill of 128 tokens (the value rows strided under a reduction over keys)."""
        n = pt.shape[2]
        j = te.reduce_axis((0, t), "j")
        return te.compute((n, nkv, rep, d), lambda i, g, r, k: te.sum(pt[g, r, i, j] * vt[g, j, k], axis=j),
                          name="context")

    ctx = bb.emit_te(weighted, probs, v_all, total, primfunc_name_hint=ATTENTION_PREFIX + "values")
    return bb.emit(R.reshape(ctx, (seq, w.heads * d)))
