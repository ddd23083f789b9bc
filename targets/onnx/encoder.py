"""A BERT sentence encoder as one ONNX graph: token ids + attention mask -> L2-normalised mean-pooled embedding.

Batched and padded: the mask removes padding from attention (as a key padding
mask) and from the mean, so a padded batch gives each sentence's own embedding.
Attention is onnxruntime's fused MultiHeadAttention (float; what its transformer
optimizer would produce), or plain ONNX ops with `attention="standard"`. Where
q, k and v read one quantized input (static int8 over one calibrated range, or
all int8_dyn), the three projections and the attention are one com.microsoft
QAttention: the u8s8 GEMM of all heads in one batch, written straight into the
per-head layout the attention reads (MultiHeadAttention transposes its float
inputs first). GELU is com.microsoft Gelu (exact, erf), the
kernel onnxruntime's own fusion makes of the erf pattern. Add + LayerNormalization
stay apart: onnxruntime's fused SkipLayerNormalization measured slower on x86
(bench/onnx_encoder.py --variants).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan, TensorPlan
from edgeq.models import names
from edgeq.models.bert import BertConfig
from edgeq.targets.onnx.builder import F32, I64, MS_DOMAIN, Builder
from edgeq.targets.onnx.fusion import one_quantized_input
from edgeq.targets.onnx.linear import (
    bias_initializer,
    emit_embedding,
    emit_linear,
    emit_table_prefix,
    int8_weight_initializers,
    quantized_input,
)


def lower_encoder(graph: Graph, plan: Plan, attention: str = "mha", progress=None, qattention: bool = True,
                  skip_layer_norm: bool = False, int8_as_qdq: bool = False) -> Builder:
    """`qattention`, `skip_layer_norm`, `int8_as_qdq`: the fused forms, chosen by measurement
    (bench/onnx_encoder.py --variants builds the others)."""
    cfg: BertConfig = graph.config
    W = lambda n: graph.weights[n].numpy()                                      # noqa: E731
    b = Builder(f"edgeq_{graph.arch}")
    b.int8_as_qdq = int8_as_qdq
    ids = b.input("input_ids", I64, ["batch", "seq"])
    mask = b.input("attention_mask", I64, ["batch", "seq"])
    H, nh, d = cfg.hidden_size, cfg.n_heads, cfg.head_dim

    # embeddings: word (planned format) + position (+ token type 0, folded into the position table)
    we = emit_embedding(b, ids, names.WORD_EMBED, W(names.WORD_EMBED),
                        plan.tensors[names.WORD_EMBED])
    seq = b.op("Slice", [b.op("Shape", [ids], hint="shape"), b.const([1], np.int64), b.const([2], np.int64)],
               hint="seq_len")                                                   # shape (1,)
    if plan.tensors[names.TOKEN_TYPE_EMBED].format != "f32":
        raise EdgeqError(None, "embeddings.token_type_embeddings.weight must stay f32 on ONNX (its row 0 is folded "
                               "into the position table)")
    pos_table = W(names.POSITION_EMBED) + W(names.TOKEN_TYPE_EMBED)[0][None, :]
    pe = emit_table_prefix(b, seq, names.POSITION_EMBED, pos_table,
                           plan.tensors[names.POSITION_EMBED])
    h = b.op("Add", [we, pe], hint="emb_sum")
    h = _layer_norm(b, h, graph, "embeddings.LayerNorm", cfg.ln_eps)

    mask_i32 = b.op("Cast", [mask], hint="mask_i32", to=TensorProto.INT32)
    mask_f = b.op("Cast", [mask], hint="mask_f", to=TensorProto.FLOAT)
    if attention == "standard":
        # additive bias (B, 1, 1, S): 0 for tokens, -1e9 for padding
        bias = b.op("Mul", [b.op("Sub", [mask_f, b.const(1.0)], hint="m1"), b.const(1e9)], hint="mask_bias")
        bias = b.op("Unsqueeze", [bias, b.const([1, 2], np.int64)], hint="mask_bias")

    layers = range(cfg.n_layers)
    for i in (progress(layers, desc="lower onnx", unit="layer") if progress else layers):
        p = f"encoder.layer.{i}."

        def lin(x, n, hint):
            return emit_linear(b, x, p + n + ".weight", W(p + n + ".weight"), W(p + n + ".bias"),
                               plan.tensors[p + n + ".weight"], hint=hint)

        qkv = [p + f"attention.self.{n}.weight" for n in ("query", "key", "value")]
        fused_qkv = qattention and not int8_as_qdq and one_quantized_input([plan.tensors[n] for n in qkv])
        if attention == "mha" and fused_qkv:
            att = _qattention(b, h, qkv, [W(n) for n in qkv], [W(n.removesuffix(".weight") + ".bias") for n in qkv],
                              plan.tensors[qkv[0]], mask_i32, nh)
        else:
            q = lin(h, "attention.self.query", "q")
            k = lin(h, "attention.self.key", "k")
            v = lin(h, "attention.self.value", "v")
            if attention == "mha":
                att = b.op("MultiHeadAttention", [q, k, v, "", mask_i32], hint="att", domain=MS_DOMAIN,
                           num_heads=nh, scale=float(1.0 / np.sqrt(d)))
            else:
                att = _standard_attention(b, q, k, v, bias, nh, d, H)
        ao = lin(att, "attention.output.dense", "ao")
        h1 = _add_norm(b, ao, h, graph, p + "attention.output.LayerNorm", cfg.ln_eps, skip_layer_norm)
        inter = lin(h1, "intermediate.dense", "inter")
        g = _gelu(b, inter)
        o = lin(g, "output.dense", "o")
        h = _add_norm(b, o, h1, graph, p + "output.LayerNorm", cfg.ln_eps, skip_layer_norm)

    # mean over the unpadded tokens, then L2 normalisation
    m3 = b.op("Unsqueeze", [mask_f, b.const([-1], np.int64)], hint="mask3")
    summed = b.op("ReduceSum", [b.op("Mul", [h, m3], hint="masked"), b.const([1], np.int64)], hint="sum", keepdims=0)
    count = b.op("ReduceSum", [m3, b.const([1], np.int64)], hint="count", keepdims=0)
    pooled = b.op("Div", [summed, b.op("Max", [count, b.const(1.0)], hint="count")], hint="pooled")
    if cfg.normalize:
        norm = b.op("ReduceL2", [pooled, b.const([-1], np.int64)], hint="norm", keepdims=1)
        b.op("Div", [pooled, b.op("Max", [norm, b.const(1e-12)], hint="norm")], outputs=["embedding"])
    else:
        b.op("Identity", [pooled], outputs=["embedding"])
    b.output("embedding", F32, ["batch", H])
    return b


def _layer_norm(b: Builder, x: str, graph: Graph, prefix: str, eps: float) -> str:
    w = b.initializer(prefix + ".weight", graph.weights[prefix + ".weight"].numpy())
    bias = b.initializer(prefix + ".bias", graph.weights[prefix + ".bias"].numpy())
    return b.op("LayerNormalization", [x, w, bias], hint="ln", axis=-1, epsilon=float(eps))


def _add_norm(b: Builder, x: str, residual: str, graph: Graph, prefix: str, eps: float, fused: bool) -> str:
    """LayerNorm(x + residual): two ops, or com.microsoft SkipLayerNormalization when `fused`."""
    if not fused:
        return _layer_norm(b, b.op("Add", [x, residual], hint="r"), graph, prefix, eps)
    w = b.initializer(prefix + ".weight", graph.weights[prefix + ".weight"].numpy())
    bias = b.initializer(prefix + ".bias", graph.weights[prefix + ".bias"].numpy())
    return b.op("SkipLayerNormalization", [x, residual, w, bias], hint="ln", domain=MS_DOMAIN, epsilon=float(eps))


def _gelu(b: Builder, x: str) -> str:
    """Exact GELU, x·½·(1 + erf(x/√2)), as the com.microsoft Gelu kernel (what onnxruntime's fusion makes of the
    erf pattern, here whatever optimisation level a session uses)."""
    return b.op("Gelu", [x], hint="gelu", domain=MS_DOMAIN)


def _qattention(b: Builder, h: str, names_: list[str], ws: list[np.ndarray], biases: list[np.ndarray],
                d: TensorPlan, mask_i32: str, nh: int) -> str:
    """q, k, v projections and attention as one QAttention over the uint8 input (static range, or the one
    DynamicQuantizeLinear computes per call for int8_dyn).

    The weights stay three initializers under their own names (a Concat onnxruntime folds when it loads the
    model); per-column scales, so the numbers are those of three MatMulIntegerToFloat."""
    if d.format == "int8_dyn":
        xq, xs, xzp = b.op("DynamicQuantizeLinear", [h], n_out=3, hint="xq")
    else:
        xq, xs, xzp = quantized_input(b, h, names_[0], d)
    pairs = [int8_weight_initializers(b, n, w) for n, w in zip(names_, ws)]
    bias = [bias_initializer(b, n, v) for n, v in zip(names_, biases)]
    w_cat = b.op("Concat", [q for q, _ in pairs], hint="qkv_w", axis=1)
    s_cat = b.op("Concat", [s for _, s in pairs], hint="qkv_scale", axis=0)
    b_cat = b.op("Concat", bias, hint="qkv_bias", axis=0)
    return b.op("QAttention", [xq, w_cat, b_cat, xs, s_cat, mask_i32, xzp], hint="att", domain=MS_DOMAIN,
                num_heads=nh)


def _standard_attention(b: Builder, q: str, k: str, v: str, bias: str, nh: int, d: int, H: int) -> str:
    shape4 = b.const([0, 0, nh, d], np.int64)
    qh = b.op("Transpose", [b.op("Reshape", [q, shape4], hint="qh")], hint="qh", perm=[0, 2, 1, 3])
    kh = b.op("Transpose", [b.op("Reshape", [k, shape4], hint="kh")], hint="kh", perm=[0, 2, 3, 1])
    vh = b.op("Transpose", [b.op("Reshape", [v, shape4], hint="vh")], hint="vh", perm=[0, 2, 1, 3])
    s = b.op("Mul", [b.op("MatMul", [qh, kh], hint="scores"), b.const(1.0 / np.sqrt(d))], hint="scores")
    p = b.op("Softmax", [b.op("Add", [s, bias], hint="scores")], hint="probs", axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [p, vh], hint="ctx")], hint="ctx", perm=[0, 2, 1, 3])
    return b.op("Reshape", [ctx, b.const([0, 0, H], np.int64)], hint="att")


def default_tensor_plan(fmt: str) -> TensorPlan:
    return TensorPlan(format=fmt)
