"""Lower IR + plan to an ONNX file: pick the family's lowering, check the model, save deterministically."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from edgeq.errors import EdgeqError
from edgeq.ir import Graph
from edgeq.plan import Plan




def lower_onnx(graph: Graph, plan: Plan, progress=None, **options) -> onnx.ModelProto:
    missing = [n for n in graph.weights if n not in plan.tensors]
    if missing:
        raise EdgeqError(None, f"plan decides nothing for {missing[0]}")
    if graph.kind == "encoder" and graph.arch == "bert":
        from edgeq.targets.onnx.encoder import lower_encoder

        b = lower_encoder(graph, plan, progress=progress, **options)
    else:
        raise EdgeqError(None, f"the ONNX target does not lower {graph.kind} models of arch {graph.arch!r} yet")
    model = b.model(doc=f"edgeq {graph.arch} {graph.kind}", metadata={"edgeq.preset": plan.preset or ""})
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write the model (and, past 2 GB, one external data file beside it); returns the files written."""
    path = Path(path)
    size = model.ByteSize()
    if size < (2 << 30) - (64 << 20):
        onnx.checker.check_model(model)
        path.write_bytes(model.SerializeToString(deterministic=True))
        return [path]
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    onnx.checker.check_model(str(path))
    return [path, path.parent / data]
