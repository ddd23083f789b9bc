"""What each `--quant` preset means on TVM, tensor by tensor.

`int8` (encoders and decoders): llama.cpp's q8_0 x q8_0 — matmul weights int8_g32 (ggml's q8_0 codes, an f16 scale
per block of 32 inputs), each call's activations quantized per block of 32 at run time, int32 sums on the CPU's
dot-product instructions (targets/tvm/int8_vnni.py; float kernels where it has none); a decoder's tied token table
(its head) too. CNNs keep int8_wo (per-output-channel, f32 activations: their convolutions are not lowered on
the integer kernels). `int8-dyn` (opt-in): matmul weights int8 per output channel and each call's activations
quantized per row at run time, the sums in int32 on the CPU's dot-product instructions (targets/tvm/dot.py). f32,
f16 and int4 store the matmul weights in the preset's format and dequantize them inside the matmul kernel (int4 on
VNNI runs q4_0 x q8_0: targets/tvm/int4_vnni.py); norms, softmax and GELU stay f32. An encoder's word embedding
(half its bytes) is per-row int8 in the integer presets (a gather, not a matmul: groups would buy little there).
The position table stays f32 (the token-type row is folded into it).
"""

from __future__ import annotations

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.core.ir import Graph
from edgeq.core.plan import TensorPlan
from edgeq.models import names
from edgeq.models.bert import matmul_weights

TVM_PRESETS = ("f32", "f16", "int8", "int4", "int8-dyn")
MATMUL_FORMAT = {"f32": "f32", "f16": "f16", "int8": "int8_g32", "int8-dyn": "int8_dyn_rows", "int4": "int4_g32"}


def preset_formats(graph: Graph, preset: str) -> dict[str, TensorPlan]:
    if preset not in TVM_PRESETS:
        raise EdgeqError(None, f"unknown --quant {preset!r} for backend tvm; presets: {', '.join(TVM_PRESETS)}")
    if preset == "int8-dyn" and graph.kind == "cnn":
        raise EdgeqError(None, "--quant int8-dyn is lowered for encoders and decoders on TVM, not CNNs; use int8")
    matmuls, tables = _matmul_weights(graph), _tables(graph)
    out: dict[str, TensorPlan] = {}
    for name, t in graph.weights.items():
        if len(t.shape) == 1:
            out[name] = TensorPlan(format="f32", reason="1-D (norm, bias) tensors stay f32")
        elif name in matmuls:
            fmt = "int8_wo" if preset == "int8" and graph.kind == "cnn" else MATMUL_FORMAT[preset]
            if not get_format(fmt).can_carry(t.shape):
                cols = int(np.prod(t.shape[1:]))
                why = (f"{cols} inputs per output channel are not a multiple of the {get_format(fmt).block[1]}-group"
                       if fmt in ("int4_g32", "int8_g32")
                       else f"shape {tuple(t.shape)} is not whole {get_format(fmt).block} blocks")
                out[name] = TensorPlan(format="int8_wo", requested=fmt, reason=f"preset {preset}: {why}; per-channel "
                                       "int8 instead")
            else:
                out[name] = TensorPlan(format=fmt, reason=f"preset {preset}: matmul weight, {fmt}")
        elif name in tables and preset != "f32":
            fmt = "f16" if preset == "f16" else "int8_wo"
            if preset == "int8" and _head_table(graph, name) and get_format("int8_g32").can_carry(t.shape):
                fmt = "int8_g32"        # the tied head is a matmul: q8_0 blocks, as llama.cpp's q8_0 file
            out[name] = TensorPlan(format=fmt, reason=f"preset {preset}: embedding table, {fmt} rows")
        else:
            out[name] = TensorPlan(format="f32", reason=f"preset {preset}: small table kept f32")
    return out


def _matmul_weights(graph: Graph) -> set[str]:
    if graph.arch == "bert":
        return set(matmul_weights(graph))
    if graph.arch == "llama":
        # the token table is a gather (and, when tied, the head): it follows the table rule
        return {n for n, t in graph.weights.items() if len(t.shape) == 2 and n != names.EMBED}
    if graph.kind == "cnn":
        # convolutions and linear layers: every weight of rank >= 2
        return {n for n, t in graph.weights.items() if len(t.shape) >= 2}
    raise EdgeqError(None, f"the tvm backend does not lower {graph.arch} {graph.kind}s yet (it lowers BERT encoders "
                           "and CNNs); use --backend gguf")


def _head_table(graph: Graph, name: str) -> bool:
    """Whether the table is also the output head (a decoder's tied embeddings)."""
    return graph.arch == "llama" and name == names.EMBED and bool(getattr(graph.config, "tied_embeddings", False))


def _tables(graph: Graph) -> set[str]:
    return {"bert": {names.WORD_EMBED}, "llama": {names.EMBED}}.get(graph.arch, set())
