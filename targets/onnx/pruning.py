"""What onnxruntime's loader edits to narrow a sorted ONNX decoder's MLPs (runtime/onnx_slice.py reads it).

Per layer, each initializer that holds the MLP's channels, the axis they run along in it, and how many elements one
channel takes there; and each MatMulNBits attribute that states the width (N of gate and up, K of down). It follows
how targets/onnx/linear.py stores each format: float and int8 weights transposed to (in, out), MatMulNBits codes
(out, blocks, bytes), scales (out, blocks) and packed zero points (out, bytes).
"""

from __future__ import annotations

from fractions import Fraction

import onnx

from edgeq.core.errors import EdgeqError
from edgeq.core.formats.nbits import NBITS
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.models import llama


def pruning_recipe(graph: Graph, plan: Plan, model: onnx.ModelProto) -> list[list[dict]]:
    initializers = {t.name: t for t in model.graph.initializer}
    nbits_node = {n.input[1]: n.name for n in model.graph.node if n.op_type == "MatMulNBits"}
    layers = []
    for i in range(graph.config.n_layers):
        items: list[dict] = []
        for name, rows in zip(llama.mlp_weights(i), (True, True, False)):   # gate, up: rows; down: columns
            fmt = plan.tensors[name].format

            def add(init: str, axis: int, per: Fraction = Fraction(1)) -> None:
                if init not in initializers:
                    raise EdgeqError(None, f"the ONNX model has no initializer {init} for {name}")
                items.append({"initializer": init, "axis": axis, "per_channel": [per.numerator, per.denominator]})

            if fmt in NBITS:
                bits, block, asym = NBITS[fmt]
                per = Fraction(1) if rows else Fraction(1, block)
                add(name, 0 if rows else 1, per)
                add(name + "_scale", 0 if rows else 1, per)
                if asym:
                    add(name + "_zero_point", 0 if rows else 1, Fraction(1) if rows else Fraction(bits, 8 * block))
                items.append({"node": nbits_node[name], "attribute": "N" if rows else "K"})
            elif fmt in ("f32", "f16", "int8", "int8_dyn"):
                add(name, 1 if rows else 0)                  # stored (in, out)
                if fmt.startswith("int8") and rows:
                    add(name + "_scale", 0)                  # one scale per output channel
            else:
                raise EdgeqError(None, f"format {fmt} of {name} cannot be narrowed on ONNX")
        layers.append(items)
    return layers
