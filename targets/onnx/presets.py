"""What each `--quant` preset means on ONNX, tensor by tensor.

INT8 (the whitepaper's scheme) goes where onnxruntime has integer kernels and
the error is small: the weights of every linear layer and the word embedding
(half an encoder's bytes); in a CNN every conv and linear weight. Everything that is not a matrix multiply (norms,
softmax, residual adds, GELU) stays float in the graph, and the position
table (tiny, added to the embedding sum) stays f32.
"""

from __future__ import annotations

from edgeq.errors import EdgeqError
from edgeq.ir import Graph
from edgeq.plan import TensorPlan

ONNX_PRESETS = ("f32", "f16", "int8", "int8-dyn")


def preset_formats(graph: Graph, preset: str) -> dict[str, TensorPlan]:
    if preset not in ONNX_PRESETS:
        raise EdgeqError(None, f"unknown --quant {preset!r} for backend onnx; presets: {', '.join(ONNX_PRESETS)}")
    out: dict[str, TensorPlan] = {}
    quantized = set(_quantizable(graph))
    for name, t in graph.weights.items():
        if len(t.shape) == 1 and graph.kind == "cnn" and preset == "int8":
            out[name] = TensorPlan(format="f32", reason="bias: written int32 with scale Δw·Δx (as many bytes as f32) "
                                                        "where its conv/linear is static int8, else f32")
        elif len(t.shape) == 1:
            out[name] = TensorPlan(format="f32", reason="1-D (norm, bias) tensors stay f32")
        elif name == "embeddings.token_type_embeddings.weight":
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
        from edgeq.models.bert import matmul_weights

        return matmul_weights(graph) + ["embeddings.word_embeddings.weight"]
    if graph.kind == "cnn":
        from edgeq.models.cnn import weight_nodes

        return list(weight_nodes(graph))
    raise EdgeqError(None, f"the onnx backend does not lower {graph.arch} {graph.kind}s yet (it lowers BERT encoders); "
                           "use --backend gguf")
