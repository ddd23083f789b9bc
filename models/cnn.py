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

import numpy as np

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


@dataclass(frozen=True)
class StageLayer:
    """A conv or linear of a supernet whose channels are sliced by stage: its weight (the IR / state_dict name),
    the stage that sets its output and input channels (None: fixed, `fixed_out` / `fixed_in`, e.g. the classes or
    the image's channels), its weights per (output channel x input channel) pair (the kernel area; for a linear
    after a flatten, the pixels each channel spreads over) and its output pixels. Once-for-all's elastic depth and
    kernel size ride on the same widths tuple as extra stages: a depth stage (0 = the layer is skipped) and a
    kernel stage (the kernel size)."""

    weight: str
    out_stage: int | None
    in_stage: int | None
    weights_per_pair: int
    pixels: int = 1
    fixed_out: int = 0
    fixed_in: int = 0
    depth_stage: int | None = None       # elastic depth: the layer exists only where widths[depth_stage] > 0
    kernel_stage: int | None = None      # elastic kernel: widths[kernel_stage] is its (square) kernel size

    def present(self, widths: tuple[int, ...] | list[int]) -> bool:
        return self.depth_stage is None or int(widths[self.depth_stage]) > 0

    def params(self, widths: tuple[int, ...] | list[int]) -> int:
        if not self.present(widths):
            return 0
        o = self.fixed_out if self.out_stage is None else widths[self.out_stage]
        i = self.fixed_in if self.in_stage is None else widths[self.in_stage]
        per_pair = self.weights_per_pair if self.kernel_stage is None else int(widths[self.kernel_stage]) ** 2
        return int(o) * int(i) * per_pair

    def macs(self, widths: tuple[int, ...] | list[int]) -> int:
        return self.params(widths) * self.pixels


def mixed_activations(graph: Graph, int8_weights: set[str]) -> list[str]:
    """The activations a mixed int8/float plan quantizes (in quantized_activations' order): the input and the
    output of every int8 conv/linear (through pooling and flatten back to the value that carries the range, and
    through a fused relu forward), and an add's output when all its inputs are quantized (onnxruntime then adds
    in uint8). The rest stays float, so a float layer reads and writes float without a Q/DQ round trip."""
    producer = {n.outputs[0]: n for n in graph.nodes}
    readers: dict[str, list] = {}
    for n in graph.nodes:
        for i in n.inputs:
            readers.setdefault(i, []).append(n)
    wanted: set[str] = set()

    def source(v: str) -> str:
        while v in producer and producer[v].op in SAME_RANGE_OPS:
            v = producer[v].inputs[0]
        return v

    for n in graph.nodes:
        if n.op in WEIGHT_OPS and n.inputs[1] in int8_weights:
            wanted.add(source(n.inputs[0]))
            out = n.outputs[0]
            r = readers.get(out, [])
            if r and all(x.op in FUSED_ACTIVATIONS for x in r):
                out = r[0].outputs[0]
            wanted.add(out)
    for n in graph.nodes:
        if n.op == "add" and all(source(i) in wanted for i in n.inputs):
            out = n.outputs[0]
            r = readers.get(out, [])
            if r and all(x.op in FUSED_ACTIVATIONS for x in r):
                out = r[0].outputs[0]
            wanted.add(out)
    return [a for a in quantized_activations(graph) if a in wanted]


def spatial_shapes(graph: Graph) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of every 4-D activation, propagated from the input's shape."""
    x = graph.inputs[0]
    out = {x.name: tuple(int(v) for v in x.shape[1:])}
    for n in graph.nodes:
        src = out.get(n.inputs[0])
        if src is None or n.op in ("flatten", "linear"):
            continue
        c, h, w = src
        a = n.attrs
        if n.op == "conv2d":
            k = graph.weights[n.inputs[1]].shape
            (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a.get("dilation", (1, 1))
            out[n.outputs[0]] = (int(k[0]), (h + 2 * ph - dh * (k[2] - 1) - 1) // sh + 1,
                                 (w + 2 * pw - dw * (k[3] - 1) - 1) // sw + 1)
        elif n.op in ("max_pool2d", "avg_pool2d"):
            (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
            out[n.outputs[0]] = (c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
        elif n.op == "global_avg_pool":
            out[n.outputs[0]] = (c, 1, 1)
        else:
            out[n.outputs[0]] = src
    return out


FOLD_POOL_AREA = 4          # largest average-pool window folded into the linear after it


def folded_pools(graph: Graph) -> dict[str, tuple[str, np.ndarray]]:
    """Average pools a lowering can fold into the linear that reads them (pool -> flatten -> linear, each the
    only reader): pool output -> (the linear's weight name, its weight over the un-pooled pixels). The pool is
    linear, so linear(flatten(avg_pool(x))) = linear'(flatten(x)) with each pooled weight spread over its
    window divided by the window's area: one kernel fewer. Why: at batch 1 a kernel's call costs about as much
    as its arithmetic on small CNNs; onnxruntime's integer average pool is a NCHW contrib op that also needs a
    layout transpose before it (the digits CNN's full int8 model measured 0.90x as long without it, batch 1, one
    thread, interleaved). Only unpadded, non-overlapping windows of at most FOLD_POOL_AREA pixels (the linear grows
    by that factor)."""
    readers: dict[str, list] = {}
    for n in graph.nodes:
        for i in n.inputs:
            readers.setdefault(i, []).append(n)
    shapes = spatial_shapes(graph)
    out = {}
    for n in graph.nodes:
        a = n.attrs
        if n.op != "avg_pool2d" or tuple(a["padding"]) != (0, 0) or tuple(a["kernel"]) != tuple(a["stride"]):
            continue
        kh, kw = a["kernel"]
        r = readers.get(n.outputs[0], [])
        if kh * kw > FOLD_POOL_AREA or len(r) != 1 or r[0].op != "flatten":
            continue
        r2 = readers.get(r[0].outputs[0], [])
        if len(r2) != 1 or r2[0].op != "linear" or n.inputs[0] not in shapes:
            continue
        c, h, w = shapes[n.inputs[0]]
        _, ho, wo = shapes[n.outputs[0]]
        wt = graph.weights[r2[0].inputs[1]].numpy()
        pooled = wt.reshape(wt.shape[0], c, ho, wo) / np.float32(kh * kw)
        spread = np.zeros((wt.shape[0], c, h, w), np.float32)
        spread[:, :, :ho * kh, :wo * kw] = np.repeat(np.repeat(pooled, kh, axis=2), kw, axis=3)
        out[n.outputs[0]] = (r2[0].inputs[1], spread.reshape(wt.shape[0], c * h * w))
    return out
