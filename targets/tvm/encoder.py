"""A BERT sentence encoder as one Relax function: (input_ids, attention_mask) -> L2-normalised mean-pooled embedding.

Batch and sequence length are symbolic (`batch`, `seq`), so one library serves
every sentence length up to the position table. Padding is masked out of
attention (an additive key bias) and out of the mean, as the ONNX lowering does,
so a padded batch gives each sentence its own embedding.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.models import names
from edgeq.models.bert import BertConfig
from edgeq.targets.tvm.attention import emit_fused_attention
from edgeq.targets.tvm.f32_linear import emit_f32_linear
from edgeq.targets.tvm.layernorm import emit_add_layer_norm
from edgeq.targets.tvm.layernorm import fits as layer_norm_fits
from edgeq.targets.tvm.ops import (Params, emit_attention, emit_embedding, emit_gelu, emit_linear, emit_table_prefix,
                                   fuses_gelu, sym)

R = relax.op


def lower_encoder(graph: Graph, plan: Plan, progress=None, dot: str = "generic",
                  fused_attention: bool = False) -> tuple[relax.BlockBuilder, Params]:
    """`fused_attention` (CPU targets): attention as one hand-written kernel (attention.py) instead of ops.py's
    scores and context kernels around a softmax, which GPU builds keep (dlight schedules them)."""
    cfg: BertConfig = graph.config
    W = lambda n: graph.weights[n].numpy()                                      # noqa: E731
    H, nh, d = cfg.hidden_size, cfg.n_heads, cfg.head_dim
    b, s = sym("batch"), sym("seq")
    ids = relax.Var("input_ids", relax.TensorType((b, s), "int32"))
    mask = relax.Var("attention_mask", relax.TensorType((b, s), "int32"))
    bb = relax.BlockBuilder()
    params = Params(dot=dot)
    with bb.function("main"):
        with bb.dataflow():
            if plan.tensors[names.TOKEN_TYPE_EMBED].format != "f32":
                raise EdgeqError(None, "embeddings.token_type_embeddings.weight must stay f32 on TVM (its row 0 is "
                                       "folded into the position table)")
            we = emit_embedding(bb, params, ids, names.WORD_EMBED,
                                W(names.WORD_EMBED), plan.tensors[names.WORD_EMBED])
            pos_table = (W(names.POSITION_EMBED)
                         + W(names.TOKEN_TYPE_EMBED)[0][None, :])
            pe = emit_table_prefix(bb, params, s, names.POSITION_EMBED, pos_table,
                                   plan.tensors[names.POSITION_EMBED])
            h = _layer_norm(bb, params, bb.emit(R.add(we, pe)), graph, "embeddings.LayerNorm", cfg.ln_eps)

            mask_f = bb.emit(R.astype(mask, "float32"))
            # additive key bias (batch, seq): 0 for tokens, -1e9 for padding
            bias = bb.emit(R.multiply(R.subtract(mask_f, relax.const(1.0)), relax.const(1e9)))
            layers = range(cfg.n_layers)
            for i in (progress(layers, desc="lower tvm", unit="layer") if progress else layers):
                p = f"encoder.layer.{i}."

                def lin(x, n, hint):
                    return _linear(bb, params, x, p + n + ".weight", W(p + n + ".weight"), W(p + n + ".bias"),
                                   plan.tensors[p + n + ".weight"], hint, fused_attention)

                qkv_names = [p + f"attention.self.{n}.weight" for n in ("query", "key", "value")]
                if fused_attention and len({plan.tensors[n].format for n in qkv_names}) == 1:
                    # one linear for q, k and v (their weights stacked: per-output formats quantize the same),
                    # so the input is quantized once and the attention kernel reads the one output
                    qkv = _linear(bb, params, h, p + "attention.self.qkv.weight",
                                  np.concatenate([W(n) for n in qkv_names]),
                                  np.concatenate([W(n.removesuffix(".weight") + ".bias") for n in qkv_names]),
                                  plan.tensors[qkv_names[0]], "qkv", True)
                    ctx = emit_fused_attention(bb, qkv, qkv, qkv, bias, nh, d, b, s, qkv=True)
                else:
                    q = lin(h, "attention.self.query", "q")
                    k = lin(h, "attention.self.key", "k")
                    v = lin(h, "attention.self.value", "v")
                    ctx = (emit_fused_attention(bb, q, k, v, bias, nh, d, b, s) if fused_attention
                           else bb.emit(R.reshape(emit_attention(bb, q, k, v, bias, nh, d), (b, s, H))))
                ao = lin(ctx, "attention.output.dense", "ao")
                h1 = _add_layer_norm(bb, params, ao, h, graph, p + "attention.output.LayerNorm", cfg.ln_eps,
                                     fused_attention)
                inter = p + "intermediate.dense.weight"
                if fuses_gelu(plan.tensors[inter], params):       # GELU inside the rescale: one pass fewer
                    g = emit_linear(bb, params, h1, inter, W(inter), W(p + "intermediate.dense.bias"),
                                    plan.tensors[inter], hint="inter", gelu=True)
                else:
                    g = emit_f32_linear(bb, params, h1, inter, W(inter), W(p + "intermediate.dense.bias"),
                                        plan.tensors[inter], "inter", gelu=True) if fused_attention else None
                    g = g if g is not None else emit_gelu(bb, lin(h1, "intermediate.dense", "inter"))
                o = lin(g, "output.dense", "o")
                h = _add_layer_norm(bb, params, o, h1, graph, p + "output.LayerNorm", cfg.ln_eps, fused_attention)

            m3 = bb.emit(R.expand_dims(mask_f, axis=-1))
            summed = bb.emit(R.sum(R.multiply(h, m3), axis=[1]))
            count = bb.emit(R.maximum(R.sum(m3, axis=[1]), relax.const(1.0)))
            pooled = bb.emit(R.divide(summed, count))
            if cfg.normalize:
                norm = R.sqrt(R.sum(R.multiply(pooled, pooled), axis=[-1], keepdims=True))
                pooled = bb.emit(R.divide(pooled, R.maximum(norm, relax.const(1e-12))))
            out = bb.emit_output(pooled)
        bb.emit_func_output(out, params=[ids, mask, *params.vars])
    return bb, params


def _linear(bb: relax.BlockBuilder, params: Params, x, name: str, w: np.ndarray, bias: np.ndarray, d, hint: str,
            cpu: bool):
    """`cpu` (CPU targets): f32 weights on f32_linear.py's kernel (row blocks' sums in registers), where it fits."""
    y = emit_f32_linear(bb, params, x, name, w, bias, d, hint) if cpu else None
    return y if y is not None else emit_linear(bb, params, x, name, w, bias, d, hint=hint)


def _layer_norm(bb: relax.BlockBuilder, params: Params, x, graph: Graph, prefix: str, eps: float):
    w = params.add(prefix + ".weight", graph.weights[prefix + ".weight"].numpy().astype(np.float32))
    bias = params.add(prefix + ".bias", graph.weights[prefix + ".bias"].numpy().astype(np.float32))
    return bb.emit(R.nn.layer_norm(x, w, bias, axes=[-1], epsilon=float(eps)))


def _add_layer_norm(bb: relax.BlockBuilder, params: Params, x, residual, graph: Graph, prefix: str, eps: float,
                    cpu: bool):
    """LN(x + residual); on CPU targets one kernel with rows in parallel (layernorm.py)."""
    width = graph.weights[prefix + ".weight"].shape[0]
    if not (cpu and layer_norm_fits(width)):
        return _layer_norm(bb, params, bb.emit(R.add(x, residual)), graph, prefix, eps)
    w = params.add(prefix + ".weight", graph.weights[prefix + ".weight"].numpy().astype(np.float32))
    bias = params.add(prefix + ".bias", graph.weights[prefix + ".bias"].numpy().astype(np.float32))
    return emit_add_layer_norm(bb, x, residual, w, bias, width, float(eps))
