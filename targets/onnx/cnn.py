"""A CNN (edgeq.models.cnn) as one ONNX graph: images (batch, C, H, W) -> logits (batch, classes).

Standard ops only (Conv, Relu, Clip, MaxPool, AveragePool, GlobalAveragePool,
Flatten, Gemm, Add; Transpose before an int8 Flatten). Formats per weight, from the plan:

- f32 / f16: float Conv/Gemm (f16 weights stored half size, cast once at load).
- int8 (static, the whitepaper's scheme): weights symmetric per output channel
  (int8, zero point 0, f32 scale per channel), bias int32 with scale
  Δw·Δx, activations uint8 per tensor with the ranges of the plan's
  `activations`. Every quantized activation is written once as a
  QuantizeLinear/DequantizeLinear pair right after the op (or the relu/relu6)
  that makes it, so onnxruntime's QDQ transformer turns DQ -> Conv -> (Relu) -> Q
  into QLinearConv, DQ -> Add -> Q into QLinearAdd, DQ -> Gemm into QGemm, and
  runs pooling and flatten on the uint8 tensor (their outputs keep their input's
  parameters). An activation the plan gives no range stays float there.
- int8_dyn: the same weights; activations quantized per call
  (DynamicQuantizeLinear + ConvInteger / MatMulInteger, rescaled in float).

A small average pool read only through a flatten by a linear is folded into that linear's weight
(models.cnn.folded_pools): one kernel fewer, exact in float.

A static int8 conv flattened into a static int8 linear (through relu/relu6, max pooling or a folded average pool)
is flattened in NHWC order: a Transpose to NHWC before the Flatten and the linear's weight columns permuted to
match (nhwc_flattens). onnxruntime runs integer convs in NHWC and would otherwise transpose back to NCHW for the
Flatten; its transpose optimizer cancels the two transposes, so the int8 graph runs one kernel fewer, and the
integer sums are the same sums in another order (exact).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgeq.core.errors import EdgeqError
from edgeq.core.formats.int8 import activation_qparams, int8_quantize_rows
from edgeq.core.ir import Graph, Node
from edgeq.core.plan import Plan
from edgeq.models.cnn import CNN_OPS, FUSED_ACTIVATIONS, OUTPUT, SAME_RANGE_OPS, folded_pools, spatial_shapes
from edgeq.targets.onnx.builder import F32, Builder


def lower_cnn(graph: Graph, plan: Plan, progress=None) -> Builder:
    return _Lowering(graph, plan).run(progress)


def activation_params(graph: Graph, plan: Plan) -> dict[str, tuple[np.float32, np.uint8]]:
    """(scale, zero point) of every activation quantized in the graph: the plan's ranges, passed through pooling."""
    acts = plan.activations or {}
    known = {graph.inputs[0].name} | {n.outputs[0] for n in graph.nodes}
    for name in acts:
        if name not in known:
            raise EdgeqError(None, f"plan names activation {name!r}, which the model does not have "
                                   f"(activations: {', '.join(sorted(known))})")
    qp = {name: activation_qparams(*r) for name, r in acts.items()}
    for n in graph.nodes:
        if n.op in SAME_RANGE_OPS and n.outputs[0] not in qp and n.inputs[0] in qp:
            qp[n.outputs[0]] = qp[n.inputs[0]]
    return qp


def nhwc_flattens(graph: Graph, plan: Plan, folded: set[str]) -> dict[str, tuple[int, int, int]]:
    """Flatten outputs to write in NHWC order -> (channels, height, width) of what they flatten: those read only by
    a linear with static int8 weights whose input comes from a static int8 conv through relu/relu6, max pooling and
    folded average pools only (what onnxruntime keeps in NHWC), with more than one channel and one pixel."""
    producer = {n.outputs[0]: n for n in graph.nodes}
    readers: dict[str, list[Node]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            readers.setdefault(i, []).append(n)
    fmt = lambda w: plan.tensors[w].format if w in plan.tensors else None  # noqa: E731
    shapes = spatial_shapes(graph)
    out = {}
    for n in graph.nodes:
        r = readers.get(n.outputs[0], [])
        if n.op != "flatten" or len(r) != 1 or r[0].op != "linear" or fmt(r[0].inputs[1]) != "int8":
            continue
        v = n.inputs[0]
        while v in folded:
            v = producer[v].inputs[0]
        chw = shapes.get(v)
        p = producer.get(v)
        while p is not None and (p.op in FUSED_ACTIVATIONS or p.op == "max_pool2d" or p.outputs[0] in folded):
            p = producer.get(p.inputs[0])
        if chw and chw[0] > 1 and chw[1] * chw[2] > 1 and p is not None and p.op == "conv2d" \
                and fmt(p.inputs[1]) == "int8":
            out[n.outputs[0]] = chw
    return out


class _Lowering:
    def __init__(self, graph: Graph, plan: Plan):
        self.graph = graph
        self.plan = plan
        self.b = Builder(f"edgeq_{graph.arch}")
        self.qp = activation_params(graph, plan)
        self.env: dict[str, str] = {}          # IR value -> ONNX float tensor
        folds = folded_pools(graph)
        self.folded = set(folds)               # average pools folded into the linear after them
        self.weight_override = dict(folds.values())
        self.nhwc = nhwc_flattens(graph, plan, self.folded)
        for n in graph.nodes:
            if n.op == "linear" and n.inputs[0] in self.nhwc:
                c, h, w = self.nhwc[n.inputs[0]]
                wt = self.weight_override.get(n.inputs[1])
                wt = graph.weights[n.inputs[1]].numpy() if wt is None else wt
                self.weight_override[n.inputs[1]] = np.ascontiguousarray(
                    wt.reshape(wt.shape[0], c, h, w).transpose(0, 2, 3, 1).reshape(wt.shape[0], c * h * w))
        self.readers: dict[str, list[str]] = {}
        for n in graph.nodes:
            for i in n.inputs:
                self.readers.setdefault(i, []).append(n.op)

    def run(self, progress) -> Builder:
        g, b = self.graph, self.b
        x = g.inputs[0]
        name = b.input(x.name, F32, ["batch", *x.shape[1:]])
        self.env[x.name] = self.requantize(x.name, name)
        nodes = g.nodes if progress is None else progress(g.nodes, desc="lower onnx", unit="op")
        for n in nodes:
            if n.op not in CNN_OPS:
                raise EdgeqError(None, f"the ONNX CNN lowering has no op {n.op!r} (node {n.outputs[0]})")
            if n.outputs[0] in self.folded:
                self.env[n.outputs[0]] = self.env[n.inputs[0]]
                continue
            y = getattr(self, "op_" + n.op)(n, [self.env[i] for i in n.inputs if i not in g.weights])
            self.env[n.outputs[0]] = self.requantize(n.outputs[0], y)
        b.op("Identity", [self.env[OUTPUT]], outputs=[OUTPUT])
        b.output(OUTPUT, F32, ["batch", g.config.n_classes])
        return b

    def requantize(self, value: str, y: str) -> str:
        """A Q/DQ pair after the op that makes a quantized activation (after its relu, when one reads it alone)."""
        if value not in self.qp or value == OUTPUT:
            return y
        readers = self.readers.get(value, [])
        if readers and all(op in FUSED_ACTIVATIONS for op in readers):
            return y
        s, z = self.scale_zp(value)
        return self.b.op("DequantizeLinear", [self.b.op("QuantizeLinear", [y, s, z], hint="q"), s, z], hint="dq")

    def scale_zp(self, value: str) -> tuple[str, str]:
        s, z = self.qp[value]
        return self.b.const(s, np.float32), self.b.const(z, np.uint8)

    def input_scale(self, n: Node) -> np.float32:
        src = n.inputs[0]
        if src not in self.qp:
            raise EdgeqError(None, f"{n.inputs[1]}: static int8 needs its input {src!r} quantized (a range in the "
                                   "plan's activations)")
        return self.qp[src][0]

    # --- weights -------------------------------------------------------------

    def weight(self, n: Node) -> tuple[str, str | None, str]:
        """(float or dequantized weight, bias, format) for a conv/linear in its planned format."""
        g, b = self.graph, self.b
        wname = n.inputs[1]
        fmt = self.plan.tensors[wname].format
        w = self.weight_override[wname] if wname in self.weight_override else g.weights[wname].numpy()
        bias = g.weights[n.inputs[2]].numpy() if len(n.inputs) > 2 else None
        bname = n.inputs[2] if len(n.inputs) > 2 else None
        if fmt == "f32":
            return b.initializer(wname, w), self.float_bias(bname, bias), fmt
        if fmt == "f16":
            half = b.initializer(wname, w.astype(np.float16))
            return b.op("Cast", [half], hint="w_f32", to=TensorProto.FLOAT), self.float_bias(bname, bias), fmt
        if fmt == "int8":
            x_scale = self.input_scale(n)
            q, scale = int8_quantize_rows(w.reshape(w.shape[0], -1))
            wq = b.initializer(wname, q.reshape(w.shape))
            ws = b.initializer(wname + "_scale", scale)
            wd = b.op("DequantizeLinear", [wq, ws, b.const(np.zeros(scale.shape, np.int8), np.int8)], hint="wdq", axis=0)
            if bias is None:
                return wd, None, fmt
            bs = (scale * x_scale).astype(np.float32)
            bq = np.clip(np.rint(bias.astype(np.float64) / bs), -2**31, 2**31 - 1).astype(np.int32)
            bd = b.op("DequantizeLinear", [b.initializer(bname, bq), b.initializer(bname + "_scale", bs),
                                           b.const(np.zeros(bs.shape, np.int32), np.int32)], hint="bdq", axis=0)
            return wd, bd, fmt
        if fmt == "int8_dyn":
            return "", self.float_bias(bname, bias), fmt
        raise EdgeqError(None, f"format {fmt} (for {wname}) is not carried by the ONNX target")

    def float_bias(self, name: str | None, bias: np.ndarray | None) -> str | None:
        return None if bias is None else self.b.initializer(name, bias.astype(np.float32))

    def dynamic(self, n: Node, x: str, op: str, **attrs) -> str:
        """DynamicQuantizeLinear(x) -> ConvInteger/MatMulInteger -> float, times Δx·Δw per output channel."""
        b, g = self.b, self.graph
        w = self.weight_override.get(n.inputs[1])
        w = g.weights[n.inputs[1]].numpy() if w is None else w
        q, scale = int8_quantize_rows(w.reshape(w.shape[0], -1))
        xq, xs, xz = b.op("DynamicQuantizeLinear", [x], n_out=3, hint="xq")
        if op == "ConvInteger":
            wq = b.initializer(n.inputs[1], q.reshape(w.shape))
            acc = b.op("ConvInteger", [xq, wq, xz, b.const(0, np.int8)], hint="acc", **attrs)
            ws = b.initializer(n.inputs[1] + "_scale", scale.reshape(1, -1, 1, 1))
        else:
            wq = b.initializer(n.inputs[1], np.ascontiguousarray(q.T))
            acc = b.op("MatMulInteger", [xq, wq, xz, b.const(0, np.int8)], hint="acc")
            ws = b.initializer(n.inputs[1] + "_scale", scale)
        accf = b.op("Cast", [acc], hint="accf", to=TensorProto.FLOAT)
        return b.op("Mul", [accf, b.op("Mul", [xs, ws], hint="s")], hint="y")

    # --- ops -----------------------------------------------------------------

    def op_conv2d(self, n: Node, xs: list[str]) -> str:
        a = n.attrs
        (ph, pw) = a["padding"]
        attrs = dict(strides=list(a["stride"]), pads=[ph, pw, ph, pw], dilations=list(a.get("dilation", (1, 1))),
                     group=int(a.get("groups", 1)),
                     kernel_shape=list(self.graph.weights[n.inputs[1]].shape[2:]))
        w, bias, fmt = self.weight(n)
        if fmt == "int8_dyn":
            y = self.dynamic(n, xs[0], "ConvInteger", **attrs)
            return self.b.op("Add", [y, self.b.op("Unsqueeze", [bias, self.b.const([1, 2], np.int64)], hint="b")],
                             hint="conv")
        return self.b.op("Conv", [xs[0], w, bias] if bias else [xs[0], w], hint="conv", **attrs)

    def op_linear(self, n: Node, xs: list[str]) -> str:
        w, bias, fmt = self.weight(n)
        if fmt == "int8_dyn":
            y = self.dynamic(n, xs[0], "MatMulInteger")
            return self.b.op("Add", [y, bias], hint="fc") if bias else y
        return self.b.op("Gemm", [xs[0], w, bias] if bias else [xs[0], w], hint="fc", transB=1)

    def op_relu(self, n: Node, xs: list[str]) -> str:
        return self.b.op("Relu", xs, hint="relu")

    def op_relu6(self, n: Node, xs: list[str]) -> str:
        return self.b.op("Clip", [xs[0], self.b.const(0.0), self.b.const(6.0)], hint="relu6")

    def op_max_pool2d(self, n: Node, xs: list[str]) -> str:
        return self.b.op("MaxPool", xs, hint="maxpool", **_pool_attrs(n))

    def op_avg_pool2d(self, n: Node, xs: list[str]) -> str:
        return self.b.op("AveragePool", xs, hint="avgpool", count_include_pad=1, **_pool_attrs(n))

    def op_global_avg_pool(self, n: Node, xs: list[str]) -> str:
        return self.b.op("GlobalAveragePool", xs, hint="gap")

    def op_flatten(self, n: Node, xs: list[str]) -> str:
        if n.outputs[0] in self.nhwc:
            xs = [self.b.op("Transpose", xs, hint="nhwc", perm=[0, 2, 3, 1])]
        return self.b.op("Flatten", xs, hint="flatten", axis=1)

    def op_add(self, n: Node, xs: list[str]) -> str:
        return self.b.op("Add", xs, hint="add")


def _pool_attrs(n: Node) -> dict:
    (ph, pw) = n.attrs["padding"]
    return dict(kernel_shape=list(n.attrs["kernel"]), strides=list(n.attrs["stride"]), pads=[ph, pw, ph, pw])
