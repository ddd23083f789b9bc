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
    initializers = {t.name for t in model.graph.initializer}
    nbits_node = {n.input[1]: n.name for n in model.graph.node if n.op_type == "MatMulNBits"}
    attention = bool((plan.pruning or {}).get("attention"))
    cfg = graph.config
    layers = []
    for i in range(cfg.n_layers):
        items: list[dict] = []
        for name, rows in zip(llama.mlp_weights(i), (True, True, False)):   # gate, up: rows; down: columns
            items += _weight_items(name, plan.tensors[name].format, rows, initializers, nbits_node)
        if attention:
            q, k, v, o = llama.attention_weights(i)
            half = Fraction(1, 2)                  # a Q/K width counts dimensions, a head keeps width/2 of each half
            for name, rows, groups, per, width in ((q, True, 2 * cfg.n_heads, half, "qk"),
                                                   (k, True, 2 * cfg.n_kv_heads, half, "qk"),
                                                   (v, True, cfg.n_kv_heads, Fraction(1), "v"),
                                                   (o, False, cfg.n_heads, Fraction(1), "v")):
                items += _weight_items(name, plan.tensors[name].format, rows, initializers, nbits_node, groups, per,
                                       width)
                if cfg.attention_bias and name != o:
                    items.append(_item(name.removesuffix(".weight") + ".bias", 0, per, initializers, groups, width))
            items.append(_item(f"model.layers.{i}.self_attn.rope_pairs", 1, half, initializers, 1, "qk"))
            for kind, width in (("key", "qk"), ("value", "v")):
                items += [{"value": f"past_key_values.{i}.{kind}", "dim": 3, "width": width},
                          {"value": f"present.{i}.{kind}", "dim": 3, "width": width}]
        layers.append(items)
    return layers


def _item(init: str, axis: int, per: Fraction, initializers: set[str], groups: int = 1, width: str | None = None,
          owner: str | None = None) -> dict:
    """One initializer narrowed along `axis`: `groups` equal runs (heads), each keeping a prefix of width·`per`
    elements; `width` names the table's widths it follows (absent: the MLP's channels)."""
    if init not in initializers:
        raise EdgeqError(None, f"the ONNX model has no initializer {init}" + (f" for {owner}" if owner else ""))
    return {"initializer": init, "axis": axis, "per_channel": [per.numerator, per.denominator],
            **({"groups": groups} if groups != 1 else {}), **({"width": width} if width else {})}


def _weight_items(name: str, fmt: str, rows: bool, initializers: set[str], nbits_node: dict[str, str],
                  groups: int = 1, unit: Fraction = Fraction(1), width: str | None = None) -> list[dict]:
    """The initializers (and MatMulNBits attribute) of weight `name` narrowed along its rows (outputs) or columns
    (inputs), as targets/onnx/linear.py stores `fmt`."""
    add = lambda init, axis, per: _item(init, axis, per * unit, initializers, groups, width, name)   # noqa: E731
    if fmt in NBITS:
        bits, block, asym = NBITS[fmt]
        per = Fraction(1) if rows else Fraction(1, block)
        out = [add(name, 0 if rows else 1, per), add(name + "_scale", 0 if rows else 1, per)]
        if asym:
            out.append(add(name + "_zero_point", 0 if rows else 1, Fraction(1) if rows else Fraction(bits, 8 * block)))
        times = groups * unit
        return out + [{"node": nbits_node[name], "attribute": "N" if rows else "K",
                       **({"width": width, "times": [times.numerator, times.denominator]} if width else {})}]
    if fmt in ("f32", "f16", "int8", "int8_dyn"):
        out = [add(name, 1 if rows else 0, Fraction(1))]                  # stored (in, out)
        if fmt.startswith("int8") and rows:
            out.append(add(name + "_scale", 0, Fraction(1)))              # one scale per output channel
        return out
    raise EdgeqError(None, f"format {fmt} of {name} cannot be narrowed on ONNX")
