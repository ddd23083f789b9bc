"""A Llama-family decoder as one ONNX graph with a KV cache, for prefill and decode alike.

Inputs and outputs carry the names ORT GenAI and Optimum use:
`input_ids`, `attention_mask` (batch, past + seq), `position_ids`,
`past_key_values.N.key/value` (batch, kv_heads, past, head_dim; past may be 0)
-> `logits` (batch, seq, vocab), `present.N.key/value` (past + seq along axis 2).

The graph follows the IR's semantics (edgeq/core/executor.py): HF rotate-half RoPE
with cos/sin tables computed in float64 (llama3 and linear scaling included),
grouped-query attention without copying K/V per head (queries are grouped
by KV head instead), causal plus padding mask, SwiGLU, RMSNorm in the pattern
onnxruntime fuses into SimplifiedLayerNormalization. Only standard ops, apart
from the weight-only block formats' MatMulNBits / GatherBlockQuantized.
"""

from __future__ import annotations

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import rope_inv_freq
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.models import names
from edgeq.models.llama import LlamaConfig
from edgeq.targets.onnx.builder import F32, I64, Builder
from edgeq.targets.onnx.linear import emit_embedding, emit_linear, emit_lora_slot

NEG = float(np.finfo(np.float32).min)


def rope_tables(graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (context_length, head_dim/2) float32, exactly as the executor computes them per position."""
    cfg: LlamaConfig = graph.config
    rope = next(n for n in graph.nodes if n.op == "rope").attrs
    factors = graph.weights[rope["freq_factors"]].numpy() if rope.get("freq_factors") else None
    inv = rope_inv_freq(rope, factors)
    ang = np.arange(cfg.context_length, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


ACCURACY_LEVEL = 4


def lower_decoder(graph: Graph, plan: Plan, progress=None, accuracy_level: int = ACCURACY_LEVEL,
                  imatrix: dict[str, np.ndarray] | None = None,
                  branches: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                  lora_slots: list[str] | tuple[str, ...] = (),
                  builder: type[Builder] = Builder) -> Builder:
    """`imatrix`: per-weight importance for the formats that take one (int4: ggml's weighted Q4_0 search).
    `branches`: low-rank error branches {weight: (A (r, in), B (out, r))}, extra MatMuls beside the weight's.
    `lora_slots`: weights that take users' LoRA adapters at run time (`--adapter-mode separate`): each gets
    graph inputs `<weight>.lora_A` (in, r) and `<weight>.lora_B` (r, out) and y += (x·A)·B, so adapters are fed
    (r may be 0: the base model) and switched without touching the base weights.
    `builder`: the Builder class (targets/onnx/layout.py sizes a plan with one that keeps no data).

    `accuracy_level` is MatMulNBits': 4 quantizes each activation row to int8 per block, as llama.cpp's q4_0
    kernels do. Measured on SmolLM2 (bench/onnx_decoder.py, 1 thread): decode 14.2 tok/s against 1.3 with
    level 0 (float activations), at KLD 0.133 against 0.131 (GGUF q4_0: 0.126), so 4 is the default;
    0 computes exactly the format's dequantized weights (the tests use it to check the bytes)."""
    cfg: LlamaConfig = graph.config
    W = lambda n: graph.weights[n].numpy()                                      # noqa: E731
    branches = dict(branches or {})
    if names.EMBED in branches:
        raise EdgeqError(None, "a low-rank branch on model.embed_tokens.weight is not lowered on ONNX (it would "
                               "correct the head but not the lookup)")
    if names.EMBED in lora_slots:
        raise EdgeqError(None, "a LoRA adapter on model.embed_tokens.weight is not lowered on ONNX")
    unknown = sorted((set(branches) | set(lora_slots)) - set(graph.weights))
    if unknown:
        raise EdgeqError(None, f"low-rank branch for {unknown[0]}, which the model does not have")
    b = builder(f"edgeq_{graph.arch}")
    b.nbits_accuracy_level = accuracy_level
    b.imatrix = dict(imatrix or {})
    nh, nkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    ids = b.input("input_ids", I64, ["batch", "seq"])
    mask = b.input("attention_mask", I64, ["batch", "total"])
    pos = b.input("position_ids", I64, ["batch", "seq"])
    pasts = []
    for i in range(cfg.n_layers):
        pasts.append((b.input(f"past_key_values.{i}.key", F32, ["batch", nkv, "past", d]),
                      b.input(f"past_key_values.{i}.value", F32, ["batch", nkv, "past", d])))
    i64 = lambda v: b.const(v, np.int64)                                       # noqa: E731

    h = emit_embedding(b, ids, names.EMBED, W(names.EMBED),
                       plan.tensors[names.EMBED])

    # RoPE: cos/sin rows for each position, duplicated to the full head (rotate-half), (B, 1, S, d)
    cos_t, sin_t = rope_tables(graph)
    cs, halves = [], []
    for name, t in (("rope_cos", cos_t), ("rope_sin", sin_t)):
        g = b.op("Gather", [b.initializer(name, t), pos], hint=name, axis=0)          # (B, S, d/2)
        halves.append(g)
        g = b.op("Concat", [g, g], hint=name, axis=-1)
        cs.append(b.op("Unsqueeze", [g, i64([1])], hint=name))
    cos, sin = cs

    # additive mask (B, 1, 1, S, T): key j is visible to query i iff j <= past + i and attention_mask[j] = 1
    shape_ids = b.op("Shape", [ids], hint="ids_shape")
    seq = b.op("Gather", [shape_ids, i64(1)], hint="seq", axis=0)
    total = b.op("Gather", [b.op("Shape", [mask], hint="mask_shape"), i64(1)], hint="total", axis=0)
    past_len = b.op("Sub", [total, seq], hint="past_len")
    kj = b.op("Range", [i64(0), total, i64(1)], hint="kj")                                        # (T,)
    qi = b.op("Unsqueeze", [b.op("Range", [past_len, total, i64(1)], hint="qi"), i64([1])], hint="qi")   # (S, 1)
    causal = b.op("LessOrEqual", [kj, qi], hint="causal")                                        # (S, T)
    keep = b.op("Equal", [mask, i64(1)], hint="pad")                                              # (B, T)
    keep = b.op("And", [b.op("Unsqueeze", [keep, i64([1])], hint="pad"), causal], hint="visible")  # (B, S, T)
    bias = b.op("Where", [keep, b.const(0.0), b.const(NEG)], hint="mask_bias")
    bias = b.op("Unsqueeze", [bias, i64([1, 2])], hint="mask_bias")                            # (B, 1, 1, S, T)

    scale = b.const(1.0 / np.sqrt(d))
    pairs = {int(n.outputs[0][1:].split(".")[0]): n.attrs["pairs"] for n in graph.nodes
             if n.op == "rope" and n.attrs.get("pairs") is not None}
    layers = range(cfg.n_layers)
    for i in (progress(layers, desc="lower onnx", unit="layer") if progress else layers):
        p = f"model.layers.{i}."

        def lin(x, n, hint, has_bias=False):
            wn = p + n + ".weight"
            bias_ = W(p + n + ".bias") if has_bias else None
            y = emit_linear(b, x, wn, W(wn), bias_, plan.tensors[wn], hint=hint, branch=branches.get(wn))
            return emit_lora_slot(b, x, y, wn, graph.weights[wn].shape) if wn in lora_slots else y

        xa = _rms_norm(b, h, p + "input_layernorm.weight", W(p + "input_layernorm.weight"), cfg.rms_eps)
        ab = cfg.attention_bias
        project = lambda n: lin(xa, f"self_attn.{n}_proj", n, ab)             # noqa: E731
        if i in pairs:
            att = _sorted_attention(b, i, project, pairs[i], pasts[i], halves, scale, bias, nh, nkv, d)
        else:
            att = _attention(b, i, project, pasts[i], cos, sin, scale, bias, nh, nkv, d)
        h1 = b.op("Add", [h, lin(att, "self_attn.o_proj", "ao")], hint="h1")
        xm = _rms_norm(b, h1, p + "post_attention_layernorm.weight", W(p + "post_attention_layernorm.weight"),
                       cfg.rms_eps)
        g = lin(xm, "mlp.gate_proj", "gate")
        u = lin(xm, "mlp.up_proj", "up")
        a = b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g], hint="sig")], hint="silu"), u], hint="swiglu")
        h = b.op("Add", [h1, lin(a, "mlp.down_proj", "down")], hint="h2")

    hn = _rms_norm(b, h, names.FINAL_NORM, W(names.FINAL_NORM), cfg.rms_eps)
    head = names.head(cfg.tied_embeddings)
    logits = emit_linear(b, hn, head, W(head), None, plan.tensors[head], hint="logits", branch=branches.get(head))
    if head in lora_slots:
        logits = emit_lora_slot(b, hn, logits, head, graph.weights[head].shape)
    b.op("Identity", [logits], outputs=["logits"])
    b.output("logits", F32, ["batch", "seq", cfg.vocab_size])
    b.outputs.insert(0, b.outputs.pop())          # logits first, then present.N.key/value in layer order
    return b


def _attention(b: Builder, i: int, project, past: tuple[str, str], cos: str, sin: str, scale: str, bias: str,
               nh: int, nkv: int, d: int) -> str:
    """Layer i's attention, (B, S, nh·d), its KV cache in and out (`present.i.*`)."""
    i64 = lambda v: b.const(v, np.int64)                                       # noqa: E731
    rep = nh // nkv
    q = _heads(b, project("q"), nh, d)                                         # (B, nh, S, d)
    k = _heads(b, project("k"), nkv, d)                                        # (B, nkv, S, d)
    v = _heads(b, project("v"), nkv, d)
    q = _rope(b, q, cos, sin, d)
    k = _rope(b, k, cos, sin, d)
    k_all = b.op("Concat", [past[0], k], outputs=[f"present.{i}.key"], axis=2)   # (B, nkv, T, d)
    v_all = b.op("Concat", [past[1], v], outputs=[f"present.{i}.value"], axis=2)
    b.output(f"present.{i}.key", F32, ["batch", nkv, "total", d])
    b.output(f"present.{i}.value", F32, ["batch", nkv, "total", d])
    # GQA: the rep query heads of one KV head share it; (B, nkv, rep, S, d) against (B, nkv, 1, T, d)
    qg = b.op("Reshape", [b.op("Mul", [q, scale], hint="q_scaled"), i64([0, nkv, rep, -1, d])], hint="qg")
    kt = b.op("Unsqueeze", [b.op("Transpose", [k_all], hint="kt", perm=[0, 1, 3, 2]), i64([2])], hint="kt")
    s = b.op("Add", [b.op("MatMul", [qg, kt], hint="scores"), bias], hint="scores")
    pr = b.op("Softmax", [s], hint="probs", axis=-1)
    ctx = b.op("MatMul", [pr, b.op("Unsqueeze", [v_all, i64([2])], hint="vg")], hint="ctx")   # (B, nkv, rep, S, d)
    ctx = b.op("Reshape", [ctx, i64([0, nh, -1, d])], hint="ctx")
    ctx = b.op("Transpose", [ctx], hint="ctx", perm=[0, 2, 1, 3])
    return b.op("Reshape", [ctx, i64([0, 0, nh * d])], hint="att")


def _sorted_attention(b: Builder, i: int, project, pairs: list[list[int]], past: tuple[str, str], halves: list[str],
                      scale: str, bias: str, nh: int, nkv: int, d: int) -> str:
    """Layer i's attention after uniql_attention (--prune-attention): every width is read from the tensors, so the
    loader can narrow the heads by editing initializers and the KV inputs' declared widths (runtime/onnx_slice.py).
    Each KV group's RoPE pairs are a permutation of the source's: `model.layers.i.self_attn.rope_pairs` (n_kv, d/2)
    picks the cos/sin columns of each stored pair (a narrowed head keeps a prefix of them). The scale stays the
    source's 1/√d: the narrowed scores approximate the full ones."""
    i64 = lambda v: b.const(v, np.int64)                                       # noqa: E731
    rep = nh // nkv
    idx = b.initializer(f"model.layers.{i}.self_attn.rope_pairs", np.asarray(pairs, dtype=np.int64))
    tables = []
    for half in halves:                                       # (B, S, d/2) -> (B, nkv, S, 2k): each group's pairs
        t = b.op("Transpose", [b.op("Gather", [half, idx], hint="rope_pairs", axis=2)], hint="rope_pairs",
                 perm=[0, 2, 1, 3])
        tables.append(b.op("Concat", [t, t], hint="rope_pairs", axis=-1))
    cos, sin = tables
    # (B, S, nh·dk) -> (B, nkv, rep, S, dk): the query heads grouped by the KV head they read
    q = b.op("Transpose", [b.op("Reshape", [project("q"), i64([0, 0, nkv, rep, -1])], hint="qg")], hint="qg",
             perm=[0, 2, 3, 1, 4])
    k = _heads(b, project("k"), nkv, -1)                                        # (B, nkv, S, dk)
    v = _heads(b, project("v"), nkv, -1)                                        # (B, nkv, S, dv)
    q = _rope(b, q, *(b.op("Unsqueeze", [t, i64([2])], hint="rope_q") for t in tables))
    k = _rope(b, k, cos, sin)
    k_all = b.op("Concat", [past[0], k], outputs=[f"present.{i}.key"], axis=2)   # (B, nkv, T, dk)
    v_all = b.op("Concat", [past[1], v], outputs=[f"present.{i}.value"], axis=2)
    b.output(f"present.{i}.key", F32, ["batch", nkv, "total", d])
    b.output(f"present.{i}.value", F32, ["batch", nkv, "total", d])
    kt = b.op("Unsqueeze", [b.op("Transpose", [k_all], hint="kt", perm=[0, 1, 3, 2]), i64([2])], hint="kt")
    s = b.op("Add", [b.op("MatMul", [b.op("Mul", [q, scale], hint="q_scaled"), kt], hint="scores"), bias],
             hint="scores")
    pr = b.op("Softmax", [s], hint="probs", axis=-1)
    ctx = b.op("MatMul", [pr, b.op("Unsqueeze", [v_all, i64([2])], hint="vg")], hint="ctx")   # (B, nkv, rep, S, dv)
    ctx = b.op("Transpose", [ctx], hint="ctx", perm=[0, 3, 1, 2, 4])                         # (B, S, nkv, rep, dv)
    return b.op("Reshape", [ctx, i64([0, 0, -1])], hint="att")


def _rms_norm(b: Builder, x: str, name: str, w: np.ndarray, eps: float) -> str:
    """x / sqrt(mean(x²) + eps) · w, in the Pow/ReduceMean/Add/Sqrt/Div/Mul form onnxruntime fuses."""
    ms = b.op("ReduceMean", [b.op("Pow", [x, b.const(2.0)], hint="sq"), b.const([-1], np.int64)], hint="ms",
              keepdims=1)
    r = b.op("Sqrt", [b.op("Add", [ms, b.const(np.float32(eps))], hint="ms_eps")], hint="rms")
    return b.op("Mul", [b.op("Div", [x, r], hint="normed"), b.initializer(name, w.astype(np.float32))], hint="norm")


def _heads(b: Builder, x: str, n: int, d: int) -> str:
    """(B, S, n·d) -> (B, n, S, d)."""
    return b.op("Transpose", [b.op("Reshape", [x, b.const([0, 0, n, d], np.int64)], hint="heads")], hint="heads",
                perm=[0, 2, 1, 3])


def _rope(b: Builder, x: str, cos: str, sin: str, d: int | None = None) -> str:
    """HF rotate-half: x·cos + [-x2, x1]·sin on (..., d); `d` None: halves of whatever width x has."""
    sizes = [] if d is None else [b.const([d // 2, d // 2], np.int64)]
    x1, x2 = b.op("Split", [x, *sizes], hint="half", n_out=2, axis=-1, **({} if d else {"num_outputs": 2}))
    rot = b.op("Concat", [b.op("Neg", [x2], hint="neg"), x1], hint="rot", axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos], hint="xc"), b.op("Mul", [rot, sin], hint="xs")], hint="roped")
