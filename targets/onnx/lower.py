"""Lower IR + plan to an ONNX file: pick the family's lowering, check the model, save deterministically."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.targets.onnx.cnn import lower_cnn
from edgeq.targets.onnx.decoder import lower_decoder
from edgeq.targets.onnx.encoder import lower_encoder


def lower_onnx(graph: Graph, plan: Plan, progress=None, **options) -> onnx.ModelProto:
    missing = [n for n in graph.weights if n not in plan.tensors]
    if missing:
        raise EdgeqError(None, f"plan decides nothing for {missing[0]}")
    if graph.kind == "encoder" and graph.arch == "bert":
        b = lower_encoder(graph, plan, progress=progress, **options)
    elif graph.kind == "cnn":
        b = lower_cnn(graph, plan, progress=progress, **options)
    elif graph.kind == "decoder" and graph.arch == "llama":
        b = lower_decoder(graph, plan, progress=progress, **options)
    else:
        raise EdgeqError(None, f"the ONNX target does not lower {graph.kind} models of arch {graph.arch!r} yet")
    meta = {"edgeq.preset": plan.preset or ""}
    if graph.kind == "decoder":
        meta["edgeq.matmulnbits_accuracy_level"] = str(b.nbits_accuracy_level)
    model = b.model(doc=f"edgeq {graph.arch} {graph.kind}", metadata=meta)
    return model


INLINE_LIMIT = (2 << 30) - (64 << 20)   # protobuf refuses messages of 2 GB; keep a margin for the graph itself


def save_model(model: onnx.ModelProto, path: str | os.PathLike, inline_limit: int = INLINE_LIMIT) -> list[Path]:
    """Write the model, checked; past `inline_limit` bytes the weights go to one external data file beside it.

    Returns the files written (model first). Both are deterministic: same model, same bytes.
    """
    path = Path(path)
    if model.ByteSize() < inline_limit:
        onnx.checker.check_model(model)
        path.write_bytes(model.SerializeToString(deterministic=True))
        return [path]
    from onnx.external_data_helper import convert_model_to_external_data

    data = path.name + ".data"
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data, size_threshold=1024)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    return [path, path.parent / data]


MULTIPLYING_OPS = frozenset({"MatMul", "MatMulNBits", "Gemm", "MatMulInteger", "FusedMatMul",
                             "MatMulIntegerToFloat", "QAttention"})
PASS_THROUGH_OPS = frozenset({"Cast", "Identity", "DequantizeLinear", "Transpose", "Reshape"})


def kernel_nodes(path: str | os.PathLike, weights: set[str]) -> dict[str, str]:
    """{node name: canonical weight} for every node that multiplies activations with a weight, the weight read
    directly or through casts, dequantizations and reshapes (f16 weights are cast once at load). onnxruntime's
    profiler names the nodes it times this way; a tied head shares the token table's initializers. An
    encoder's QAttention multiplies with the concatenation of q, k and v: it is reported under the query's
    name (the predictor's workload calls that fused kernel so, edgeq/predictor/workload.py)."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}

    def source(value: str, depth: int = 0) -> str | None:
        if value in inits:
            return value if value in weights else None
        node = producer.get(value)
        if node is not None and node.op_type == "Concat" and depth == 0:
            parts = [source(v, depth + 1) for v in node.input]
            return parts[0] if parts and all(parts) else None
        if node is None or depth > 4 or node.op_type not in PASS_THROUGH_OPS:
            return None
        return source(node.input[0], depth + 1)

    out = {}
    for node in model.graph.node:
        if node.op_type in MULTIPLYING_OPS:
            for value in node.input[:2]:
                w = source(value)
                if w is not None:
                    out[node.name] = w
    return out
