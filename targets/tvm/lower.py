"""Lower IR + plan to a Relax module whose weights are parameters, plus the arrays stored for them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.targets.tvm.cnn import lower_cnn
from edgeq.targets.tvm.decoder import PAST, kv_specs, lower_decoder
from edgeq.targets.tvm.encoder import lower_encoder
from edgeq.targets.tvm.ops import Params, SizingParams

ENTRY = "main"


@dataclass
class Lowered:
    """A Relax module (entry `main`: the model inputs, then the weights in `param_names` order) and its weights."""

    mod: tvm.IRModule
    inputs: list[dict]                   # name, dtype, shape (symbolic dims as strings)
    outputs: list[dict]
    params: dict[str, np.ndarray]        # in parameter order

    @property
    def param_names(self) -> list[str]:
        return list(self.params)


def lower_tvm(graph: Graph, plan: Plan, progress=None, imatrix: dict[str, np.ndarray] | None = None,
              branches: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, sizing: bool = False,
              lora_slots: list[str] | tuple[str, ...] = (), dot: str = "generic",
              fused_attention: bool = False, gpu: bool = False) -> Lowered:
    """`imatrix`: weight name -> importance (E[x²] per input) for the formats that take one (decoders);
    `branches`: low-rank error branches {weight: (A, B)} (decoders); `sizing`: keep only each stored array's
    dtype and shape (ops.ArraySpec) in `params`, not its data (targets/tvm/layout.py); `lora_slots`: decoder
    weights that take LoRA adapters at run time (decoder.lower_decoder); `dot`: the integer kernel int8_dyn_rows
    linears get on the build's target (dot.dot_kind); `fused_attention`: encoders' attention as one CPU kernel
    (attention.py), decoders' attention scores in the CPU schedule's form (CPU targets only); `gpu`: a CUDA build
    (decoders' cache writes bound to GPU threads)."""
    if branches and graph.kind != "decoder":
        raise EdgeqError(None, f"low-rank branches are lowered for decoders on TVM, not {graph.kind}s")
    if lora_slots and graph.kind != "decoder":
        raise EdgeqError(None, f"LoRA adapters apply to decoders, not {graph.kind}s")
    if sizing and graph.kind != "decoder":
        raise EdgeqError(None, f"TVM plans are sized for decoders only, not {graph.kind}s")
    missing = [n for n in graph.weights if n not in plan.tensors]
    if missing:
        raise EdgeqError(None, f"plan decides nothing for {missing[0]}")
    if graph.kind == "encoder" and graph.arch == "bert":
        bb, params = lower_encoder(graph, plan, progress=progress, dot=dot, fused_attention=fused_attention)
        inputs = [{"name": "input_ids", "dtype": "int32", "shape": ["batch", "seq"]},
                  {"name": "attention_mask", "dtype": "int32", "shape": ["batch", "seq"]}]
        outputs = [{"name": "embedding", "dtype": "float32", "shape": ["batch", graph.config.hidden_size]}]
    elif graph.kind == "decoder" and graph.arch == "llama":
        bb, params = lower_decoder(graph, plan, progress=progress, imatrix=imatrix, branches=branches,
                                   params_type=SizingParams if sizing else Params, lora_slots=lora_slots,
                                   dot=dot, cpu_attention=fused_attention, gpu=gpu)
        kv = kv_specs(graph)
        # `past`: a shape (the cache rows already filled); the caches come back as written (the same arrays)
        inputs = [{"name": "input_ids", "dtype": "int32", "shape": ["seq"]},
                  {"name": PAST, "dtype": "shape", "shape": [1]}, *kv]
        outputs = [{"name": "logits", "dtype": "float32", "shape": ["seq", graph.config.vocab_size]}, *kv]
    elif graph.kind == "cnn":
        bb, params = lower_cnn(graph, plan)
        inputs = [{"name": v.name, "dtype": "float32", "shape": list(v.shape)} for v in graph.inputs]
        outputs = [{"name": v.name, "dtype": "float32", "shape": list(v.shape)} for v in graph.outputs]
    else:
        raise EdgeqError(None, f"the TVM target does not lower {graph.kind} models of arch {graph.arch!r} yet")
    return Lowered(mod=bb.get(), inputs=inputs, outputs=outputs, params=params.arrays)
