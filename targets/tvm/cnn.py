"""A CNN graph (the IR contract in models/cnn.py: NCHW float32, batch norm folded) as one Relax function.

images (batch, C, H, W) -> logits (batch, classes), batch symbolic. Linear layers go
through the same kernels as the encoders (ops.emit_linear: dequantize inside the
matmul). Convolutions use Relax's conv2d on a float weight; a weight-only int8 or
int4 kernel is stored quantized and widened by a small kernel right before the conv
(the weights of a digits-sized CNN are a few KB: fusing that into conv2d's
legalized loop nest is not worth a custom conv kernel).
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te

from edgeq.core.errors import EdgeqError
from edgeq.core.formats.int4_groups import INT4_GROUP, int4_quantize_groups
from edgeq.core.formats.int8 import int8_quantize_rows
from edgeq.core.ir import Graph, Node
from edgeq.core.plan import Plan, TensorPlan
from edgeq.targets.tvm.ops import Params, emit_linear, sym

R = relax.op


def _pair(v, default) -> tuple[int, int]:
    if v is None:
        return default
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def conv_weight(bb: relax.BlockBuilder, params: Params, name: str, w: np.ndarray, d: TensorPlan) -> relax.Expr:
    """The float (O, I, kh, kw) conv kernel the conv reads, from its stored format."""
    shape = w.shape
    rows = w.reshape(shape[0], -1)
    if d.format == "f32":
        return params.add(name, w.astype(np.float32))
    if d.format == "f16":
        return bb.emit(R.astype(params.add(name, w.astype(np.float16)), "float32"))
    if d.format == "int8_wo":
        q, scale = int8_quantize_rows(rows)
        qv = params.add(name, q.reshape(shape))
        sv = params.add(name + ".scale", scale)
        return bb.emit(R.multiply(R.astype(qv, "float32"), R.reshape(sv, (shape[0], 1, 1, 1))))
    if d.format == "int4_g32":
        packed, scale = int4_quantize_groups(rows)
        pv = params.add(name, packed)
        sv = params.add(name + ".scale", scale)
        cols = rows.shape[1]

        def decode(p, s):
            def f(o, c):
                byte = p[o, c // 2].astype("int32")
                nib = ((byte >> ((c % 2) * 4)) & 15) - 8
                return nib.astype("float32") * s[o, c // INT4_GROUP].astype("float32")
            return te.compute((shape[0], cols), f, name="decode")

        flat = bb.emit_te(decode, pv, sv, primfunc_name_hint="decode_int4_g32")
        return bb.emit(R.reshape(flat, shape))
    raise EdgeqError(None, f"format {d.format} (for {name}) is not carried by the TVM target")


def lower_cnn(graph: Graph, plan: Plan) -> tuple[relax.BlockBuilder, Params]:
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise EdgeqError(None, "the TVM CNN lowering takes one input (images) and one output (logits)")
    inp = graph.inputs[0]
    b = sym("batch")
    shape = [b] + [int(d) for d in inp.shape[1:]]
    x_in = relax.Var(inp.name, relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    params = Params()
    W = lambda n: graph.weights[n].numpy()                                      # noqa: E731
    with bb.function("main"):
        with bb.dataflow():
            env: dict[str, relax.Expr] = {inp.name: x_in}
            for node in graph.nodes:
                env[node.outputs[0]] = _lower_node(bb, params, node, env, W, plan, b)
            out = bb.emit_output(env[graph.outputs[0].name])
        bb.emit_func_output(out, params=[x_in, *params.vars])
    return bb, params


def _lower_node(bb, params: Params, node: Node, env: dict, W, plan: Plan, b) -> relax.Expr:
    op, a = node.op, node.attrs
    x = env.get(node.inputs[0])
    if op == "conv2d":
        w = conv_weight(bb, params, node.inputs[1], W(node.inputs[1]), plan.tensors[node.inputs[1]])
        y = bb.emit(R.nn.conv2d(x, w, strides=_pair(a.get("stride"), (1, 1)), padding=_pair(a.get("padding"), (0, 0)),
                                dilation=_pair(a.get("dilation"), (1, 1)), groups=int(a.get("groups", 1))))
        if len(node.inputs) > 2:
            bias = params.add(node.inputs[2], W(node.inputs[2]).astype(np.float32))
            y = bb.emit(R.add(y, R.reshape(bias, (1, -1, 1, 1))))
        return y
    if op == "linear":
        bias = W(node.inputs[2]) if len(node.inputs) > 2 else None
        return emit_linear(bb, params, x, node.inputs[1], W(node.inputs[1]), bias, plan.tensors[node.inputs[1]],
                           hint="fc")
    if op == "relu":
        return bb.emit(R.nn.relu(x))
    if op == "relu6":
        return bb.emit(R.clip(x, 0.0, 6.0))
    if op in ("max_pool2d", "avg_pool2d"):
        k = _pair(a.get("kernel"), (1, 1))
        kw = dict(pool_size=k, strides=_pair(a.get("stride"), k), padding=_pair(a.get("padding"), (0, 0)))
        if op == "max_pool2d":
            return bb.emit(R.nn.max_pool2d(x, **kw))
        return bb.emit(R.nn.avg_pool2d(x, count_include_pad=True, **kw))     # torch's default
    if op == "global_avg_pool":
        return bb.emit(R.mean(x, axis=[2, 3], keepdims=True))
    if op == "flatten":
        if int(a.get("start_dim", 1)) != 1:
            raise EdgeqError(None, "flatten: only start_dim=1 is supported")
        dims = list(x.ty.shape.values)
        return bb.emit(R.reshape(x, (b, int(np.prod([int(d) for d in dims[1:]])))))
    if op == "add":
        return bb.emit(R.add(x, env[node.inputs[1]]))
    raise EdgeqError(None, f"op {op!r} is not lowered by the TVM CNN target")
