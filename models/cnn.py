"""The CNN family: image classifiers that come in through torch.export (edgeq.importers.torch_export).

A CNN graph has one input, `images` (batch, C, H, W) float32 NCHW, and one
output, `logits` (batch, n_classes). Its ops are the ones the contract with the
TVM target fixes: conv2d (batch norm folded in at import), relu, relu6,
max/avg/global pooling, flatten, linear and add. Weight names are the torch
state_dict names of the convs and linears. avg_pool2d counts padding in the
divisor (torch's default count_include_pad=True; ONNX count_include_pad=1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgeq.core.ir import Graph

CNN_OPS = ("conv2d", "relu", "relu6", "max_pool2d", "avg_pool2d", "global_avg_pool", "flatten", "linear", "add")
WEIGHT_OPS = ("conv2d", "linear")
INPUT = "images"
OUTPUT = "logits"


@dataclass(frozen=True)
class CnnConfig:
    in_channels: int
    height: int
    width: int
    n_classes: int
    name: str = "cnn"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.height, self.width)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CnnConfig":
        return cls(**d)


def weight_nodes(graph: Graph) -> dict[str, str]:
    """Weight name -> op, for the weights a conv or linear multiplies (what int8 quantizes)."""
    return {n.inputs[1]: n.op for n in graph.nodes if n.op in WEIGHT_OPS}


FUSED_ACTIVATIONS = ("relu", "relu6")
SAME_RANGE_OPS = ("max_pool2d", "avg_pool2d", "global_avg_pool", "flatten")


def quantized_activations(graph: Graph) -> list[str]:
    """The activations static INT8 gives their own calibrated range by default, in graph order.

    The input and the output of every conv, linear, relu, relu6 and add, except
    a value read only by a relu/relu6 (the activation is applied before
    quantizing, so a conv and its relu become one integer kernel) and the
    logits. Pooling and flatten outputs are left out: they keep their input's
    parameters, as integer pooling kernels want.
    """
    readers: dict[str, list[str]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            readers.setdefault(i, []).append(n.op)
    out = [graph.inputs[0].name]
    for n in graph.nodes:
        v = n.outputs[0]
        if n.op in SAME_RANGE_OPS or v == OUTPUT:
            continue
        r = readers.get(v, [])
        if r and all(op in FUSED_ACTIVATIONS for op in r):
            continue
        out.append(v)
    return out


def activation_names(graph: Graph) -> list[str]:
    """Every activation value of the graph (input and node outputs), in order."""
    return [graph.inputs[0].name] + [n.outputs[0] for n in graph.nodes]
