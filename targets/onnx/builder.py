"""A small ONNX graph builder over onnx.helper: fixed names, fixed order, so bytes are deterministic."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
MS_DOMAIN = "com.microsoft"


class Builder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._count = 0
        self.uses_ms_domain = False
        self.memo: dict = {}           # lowering helpers share sub-graphs (one QuantizeLinear per activation)
        self.imatrix: dict = {}        # weight name -> importance (E[x²] per input), for formats that take one
        self.nbits_accuracy_level = 0  # MatMulNBits: 0 computes in float; 4 quantizes activations to int8 (faster)
        self.int8_as_qdq = False       # static int8 as QDQ around a float MatMul (left to ORT's fusion; benchmarks)

    def fresh(self, hint: str) -> str:
        self._count += 1
        name = f"{hint}_{self._count}"
        self._names.add(name)
        return name

    def initializer(self, name: str, arr: np.ndarray) -> str:
        if name in self._names:
            raise ValueError(f"duplicate ONNX name {name}")
        self._names.add(name)
        arr = np.asarray(arr)
        # ascontiguousarray makes 0-d arrays 1-d; QDQ scales and zero points must stay scalars
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr) if arr.ndim else arr, name))
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A small shared constant (scalars, shapes, axes)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        name = self._consts.get(key)
        if name is None:
            name = self.initializer(f"const_{len(self._consts)}", arr)
            self._consts[key] = name
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs: Any):
        if outputs is None:
            outputs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=f"n{len(self.nodes)}_{op_type}",
                                           domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        self._names.add(name)
        return name

    def overridable(self, name: str, elem: int, shape: list, default: np.ndarray) -> str:
        """A graph input with a default: an initializer of the same name, which a run may feed (onnxruntime's
        overridable initializers, the form its adapters and onnxruntime-genai's override by name)."""
        self.initializer(name, default)
        return self.input(name, elem, shape)

    def output(self, name: str, elem: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def model(self, doc: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        m = helper.make_model(graph, opset_imports=opsets, producer_name="edgeq", producer_version="", doc_string=doc)
        m.ir_version = 8
        for k, v in sorted((metadata or {}).items()):
            m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
        return m


F32 = TensorProto.FLOAT
I64 = TensorProto.INT64
