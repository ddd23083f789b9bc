"""What each `--quant` preset means on ONNX, tensor by tensor.

INT8 (the whitepaper's scheme) goes where onnxruntime has integer kernels and
the error is small: the weights of every linear layer and the word embedding
(half an encoder's bytes); in a CNN every conv and linear weight. Everything that is not a matrix multiply (norms,
softmax, residual adds, GELU) stays float in the graph, and the position
table (tiny, added to the embedding sum) stays f32.

Decoders (Llama family) follow the same rule with the LLM forms:
- `int4` / `int4-asym`: every linear layer weight-only 4-bit (MatMulNBits,
  blocks of 32, symmetric or with zero points); the LM head, and the word
  embedding when it is tied to it, stay 8-bit weight-only (`int8_b32`), as
  llama.cpp's Q4_0 keeps them at Q8_0; an untied word embedding is 4-bit too
  (GatherBlockQuantized).
- `int8` / `int8-dyn`: per-tensor activation quantization (the whitepaper's
  scheme) only where measurement says it costs little (DECODER_PER_TENSOR:
  nowhere on SmolLM2); the linears, the head and a tied embedding are
  `int8_b32` (8-bit weights in blocks of 32, Q8_0's grid; MatMulNBits
  quantizes activations per block of 32 at run time); an untied embedding is
  int8 rows.
"""

from __future__ import annotations

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import TensorPlan
from edgeq.models import llama, names
from edgeq.models.bert import matmul_weights
from edgeq.models.cnn import weight_nodes

ONNX_PRESETS = ("f32", "f16", "int8", "int8-dyn", "int4", "int4-asym")


def preset_formats(graph: Graph, preset: str) -> dict[str, TensorPlan]:
    if preset not in ONNX_PRESETS:
        raise EdgeqError(None, f"unknown --quant {preset!r} for backend onnx; presets: {', '.join(ONNX_PRESETS)}")
    if graph.kind == "decoder":
        return _decoder_formats(graph, preset)
    if preset.startswith("int4"):
        raise EdgeqError(None, f"--quant {preset} is for decoders (weight-only 4-bit); use int8 for {graph.kind}s")
    out: dict[str, TensorPlan] = {}
    quantized = set(_quantizable(graph))
    for name, t in graph.weights.items():
        if len(t.shape) == 1 and graph.kind == "cnn" and preset == "int8":
            out[name] = TensorPlan(format="f32", reason="bias: written int32 with scale Δw·Δx (as many bytes as f32) "
                                                        "where its conv/linear is static int8, else f32")
        elif len(t.shape) == 1:
            out[name] = TensorPlan(format="f32", reason="1-D (norm, bias) tensors stay f32")
        elif name == names.TOKEN_TYPE_EMBED:
            out[name] = TensorPlan(format="f32", reason="row 0 is folded into the position table in f32")
        elif preset == "f32":
            out[name] = TensorPlan(format="f32", reason="preset f32")
        elif preset == "f16":
            out[name] = TensorPlan(format="f16", reason="preset f16: stored half size, computed in f32")
        elif name in quantized:
            fmt = "int8" if preset == "int8" else "int8_dyn"
            why = ("static activation range calibrated on real inputs" if fmt == "int8"
                   else "activation range computed per call")
            kind = ("embedding table" if "embedding" in name else "conv weight" if len(t.shape) == 4
                    else "linear weight")
            out[name] = TensorPlan(format=fmt, reason=f"preset {preset}: {kind}, per-channel int8; {why}")
        else:
            out[name] = TensorPlan(format="f32", reason=f"preset {preset}: small table kept f32")
    return out


def _quantizable(graph: Graph) -> list[str]:
    if graph.arch == "bert":
        return matmul_weights(graph) + [names.WORD_EMBED]
    if graph.kind == "cnn":
        return list(weight_nodes(graph))
    raise EdgeqError(None, f"the onnx backend does not lower {graph.arch} {graph.kind}s yet (it lowers BERT encoders); "
                           "use --backend gguf")


def _decoder_formats(graph: Graph, preset: str) -> dict[str, TensorPlan]:
    cfg = graph.config
    head = names.head(cfg.tied_embeddings)
    linear_fmt = {"int4": "int4", "int4-asym": "int4_asym", "int8": "int8", "int8-dyn": "int8_dyn"}
    out: dict[str, TensorPlan] = {}
    for name in graph.weights:
        t = graph.weights[name]
        if len(t.shape) == 1:
            out[name] = TensorPlan(format="f32", reason="1-D (norm, bias) tensors stay f32")
        elif preset in ("f32", "f16"):
            out[name] = TensorPlan(format=preset, reason=f"preset {preset}" + (": stored half size, computed in f32"
                                                                             if preset == "f16" else ""))
        elif name == head:
            out[name] = TensorPlan(format="int8_b32", reason=f"preset {preset}: LM head{' (tied embedding)' if cfg.tied_embeddings else ''}"
                                                              " 8-bit weight-only, blocks of 32, input float")
        elif name == names.EMBED:
            fmt = linear_fmt[preset] if preset.startswith("int4") else "int8"
            out[name] = TensorPlan(format=fmt, reason=f"preset {preset}: untied word embedding ({fmt} rows)")
        elif name in llama.linear_weights(graph):
            fmt = linear_fmt[preset]
            if fmt in ("int8", "int8_dyn") and not any(name.endswith(s) for s in DECODER_PER_TENSOR):
                fmt = "int8_b32"
            why = {"int4": "4-bit weight-only, blocks of 32, symmetric", "int4_asym": "4-bit weight-only, blocks of "
                   "32, zero points", "int8": "per-channel int8, static activation range",
                   "int8_dyn": "per-channel int8, activation range per call",
                   "int8_b32": "8-bit blocks of 32 (a per-tensor activation range costs too much here)"}[fmt]
            out[name] = TensorPlan(format=fmt, reason=f"preset {preset}: {why}")
        else:
            out[name] = TensorPlan(format="f32", reason=f"preset {preset}: kept f32")
    return out


# Which decoder linears take one activation range per tensor under `int8` (static, calibrated) and `int8-dyn`:
# none. Measured on SmolLM2 (numpy simulation, 30 tokens, dynamic per-tensor uint8 inputs on one kind of linear in
# all 30 layers, per-channel int8 weights), KLD added: k_proj 0.0021, o_proj 0.0025, q_proj 0.0061, gate 0.012,
# up 0.035, v 0.045, down 0.84 (its input reaches 477 while the median is 0.2); all at once 0.68. In onnxruntime on
# the bundle's reference prompts, static ranges on just k_proj and o_proj (the rest int8_b32) gave KLD 0.020 against
# 0.0062 with every linear on int8_b32 (GGUF q8_0: 0.0050). So decoders keep 8-bit blocks of 32 everywhere; a plan
# can still put `int8` (ranges calibrated into the plan) or `int8_dyn` on any linear.
DECODER_PER_TENSOR: tuple[str, ...] = ()
