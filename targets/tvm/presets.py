"""What each `--quant` preset means on TVM, tensor by tensor.

`int8-dyn` (opt-in): matmul weights int8 per output channel and each call's activations quantized per row at
run time, the sums in int32 on the CPU's dot-product instructions (targets/tvm/dot.py). The others are
weight-only: the matmul weights of every linear layer are stored in the preset's
format and dequantized inside the matmul kernel; activations, norms, softmax and
GELU stay f32. The word embedding (half an encoder's bytes) is per-row int8 in
both integer presets (a gather, not a matmul: int4 groups would buy little there).
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
MATMUL_FORMAT = {"f32": "f32", "f16": "f16", "int8": "int8_wo", "int8-dyn": "int8_dyn_rows", "int4": "int4_g32"}


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
            fmt = MATMUL_FORMAT[preset]
            if not get_format(fmt).can_carry(t.shape):
                cols = int(np.prod(t.shape[1:]))
                why = (f"{cols} inputs per output channel are not a multiple of the {get_format(fmt).block[1]}-group"
                       if preset == "int4" else f"shape {tuple(t.shape)} is not whole {get_format(fmt).block} blocks")
                out[name] = TensorPlan(format="int8_wo", requested=fmt, reason=f"preset {preset}: {why}; per-channel "
                                       "int8 instead")
            else:
                out[name] = TensorPlan(format=fmt, reason=f"preset {preset}: matmul weight, {fmt}")
        elif name in tables and preset != "f32":
            fmt = "f16" if preset == "f16" else "int8_wo"
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


def _tables(graph: Graph) -> set[str]:
    return {"bert": {names.WORD_EMBED}, "llama": {names.EMBED}}.get(graph.arch, set())
