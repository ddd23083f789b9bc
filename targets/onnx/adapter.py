"""A user's LoRA adapter for an ONNX decoder bundle, in onnxruntime's adapter format (`.onnx_adapter`).

The decoder graph has, for each weight an adapter of the bundle changes, overridable initializers
`<weight>.lora_A` (in, r) and `<weight>.lora_B` (r, out), rank 0 by default (targets/onnx/linear.py
`emit_lora_slot`). The adapter file holds exactly those tensors by those names in onnxruntime's own
format, written with `onnxruntime.AdapterFormat`: what onnxruntime's `RunOptions.add_active_adapter` and
onnxruntime-genai's `Adapters` load (they feed a file's tensors to the inputs of the same names), so one
adapter at weight 1 runs in stock onnxruntime (tests/test_adapters_separate.py checks it). edgeq's runtime
reads the file the same way but feeds the inputs itself, so that several adapters at once (concatenated
along r) and any weight work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.core.adapter import LoraAdapter
from edgeq.core.ir import Graph
from edgeq.targets.onnx.linear import lora_input_names

ADAPTER_VERSION = 1
MODEL_VERSION = 1


def lora_file(name: str) -> str:
    return f"lora-{name}.onnx_adapter"


def write_adapter(graph: Graph, adapter: LoraAdapter, path: Path) -> None:
    """The adapter's factors as onnxruntime parameters, in graph order (the file's bytes follow the order)."""
    import onnxruntime as ort

    params = {}
    factors = adapter.factors()
    for name in graph.weights:                      # graph order: byte-identical files
        if name in factors:
            a, b = factors[name]
            a_name, b_name = lora_input_names(name)
            params[a_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a.T, dtype=np.float32))
            params[b_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b.T, dtype=np.float32))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(MODEL_VERSION)
    fmt.set_parameters(params)
    fmt.export_adapter(str(path))
