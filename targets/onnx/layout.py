"""The ONNX size model for budgeted plans: exact file bytes, from a lowering that keeps no weight data.

An ONNX file is one protobuf message, so a tensor's bytes are its
initializers (name, dims, type, raw data, field tags and lengths) plus the
nodes that read them (MatMulNBits with its attributes, a Cast for f16, a
GatherBlockQuantized...). Rather than restate the lowering's choices here,
the real lowering runs with a builder that records each initializer's size
and keeps an empty placeholder, on zero weights: protobuf sizes depend on
names, shapes and types, never on values, so the size computed is the size
`save_model` writes, to the byte.

Per (tensor, format) bytes come from one such lowering per candidate format
(every tensor in that format): the tensor's initializers, the weight-side
nodes derived only from them, and the first nodes that read those. Node and
value names carry running counters, so these are additive to within a few
bytes; `exact_bytes` sizes a whole plan exactly, and the allocator checks
its plan against it.
"""

from __future__ import annotations

import functools

import numpy as np
from onnx import numpy_helper

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import Format, get_format
from edgeq.core.ir import Graph
from edgeq.core.layout import FileLayout, zero_weights
from edgeq.core.plan import Plan, TensorPlan
from edgeq.models import names
from edgeq.targets.onnx.builder import Builder
from edgeq.targets.onnx.lower import INLINE_LIMIT, lower_onnx

LAYOUT_VERSION = 1
_OWNED_SUFFIXES = ("", "_scale", "_zero_point", "_lowrank_a", "_lowrank_b")


def _vlen(n: int) -> int:
    """Bytes of a protobuf varint."""
    return max(1, (int(n).bit_length() + 6) // 7)


def _entry(size: int) -> int:
    """Bytes of a length-delimited field with a one-byte tag (GraphProto's node and initializer fields)."""
    return 1 + _vlen(size) + size


class SizingBuilder(Builder):
    """A Builder whose initializers are empty placeholders; `data` records each one's raw bytes."""

    def __init__(self, name: str, data: dict[str, int]):
        super().__init__(name)
        self.data = data

    def initializer(self, name: str, arr: np.ndarray) -> str:
        if name in self._names:
            raise ValueError(f"duplicate ONNX name {name}")
        self._names.add(name)
        arr = np.asarray(arr)
        t = numpy_helper.from_array(np.empty((0,), arr.dtype), name)
        del t.dims[:]
        t.dims.extend(arr.shape)
        self.initializers.append(t)
        self.data[name] = int(arr.nbytes)
        return name


def size_plan(graph: Graph, plan: Plan, ranks: dict[str, int] | None = None) -> tuple[int, dict[str, int]]:
    """(bytes of model.onnx, bytes per weight: its initializers and the nodes that read them) for `plan` with
    rank-r branches on `ranks`' weights. `graph` should have zero weights (zero_weights)."""
    data: dict[str, int] = {}
    branches = {n: (np.zeros((r, graph.weights[n].shape[1]), np.float16),
                    np.zeros((graph.weights[n].shape[0], r), np.float16)) for n, r in (ranks or {}).items() if r}
    model = lower_onnx(graph, plan, builder=functools.partial(SizingBuilder, data=data),
                       **({"branches": branches} if branches else {}))
    g = model.graph
    inits = {}
    grow = 0
    for t in g.initializer:
        empty = t.ByteSize()
        full = empty - 1 + _vlen(data[t.name]) + data[t.name]        # raw_data: varint(0) -> varint(n) + n
        inits[t.name] = _entry(full)
        grow += _entry(full) - _entry(empty)
    g_empty = g.ByteSize()
    g_full = g_empty + grow
    total = model.ByteSize() - _entry(g_empty) + _entry(g_full)

    owner_of = {}
    for n in graph.weights:
        if len(graph.weights[n].shape) == 2:
            for s in _OWNED_SUFFIXES:
                if n + s in inits:
                    owner_of[n + s] = n
    per = {n: 0 for n in graph.weights if len(graph.weights[n].shape) == 2}
    for name, size in inits.items():
        if name in owner_of:
            per[owner_of[name]] += size
    weight_side = set(inits)                        # values computed from initializers alone
    for node in g.node:
        ins = [i for i in node.input if i]
        owners = {owner_of[i] for i in ins if i in owner_of}
        if len(owners) == 1:
            (o,) = owners
            per[o] += _entry(node.ByteSize())
            if all(i in weight_side for i in ins):    # e.g. the Cast of an f16 weight: its consumer is o's too
                weight_side.update(node.output)
                owner_of.update({v: o for v in node.output})
        elif ins and all(i in weight_side for i in ins):
            weight_side.update(node.output)
    return total, per


def onnx_layout(graph: Graph, fmts: list[Format], ranks: list[int] = ()) -> FileLayout:
    """The FileLayout of ONNX decoders for the candidate formats `fmts` (and branch ranks `ranks`)."""
    zg = zero_weights(graph)
    mats = [n for n, t in graph.weights.items() if len(t.shape) == 2]

    def plan_in(fmt: str, rank: int = 0) -> tuple[Plan, dict[str, int]]:
        tensors = {n: TensorPlan("f32") for n in graph.weights}
        for n in mats:
            if get_format(fmt).can_carry(graph.weights[n].shape):
                tensors[n] = TensorPlan(fmt)
        has_branch = {n: rank for n in mats if rank and n != names.EMBED}
        return Plan(tensors=tensors), has_branch

    def spread(total: int, per: dict[str, int], changed: list[str]) -> dict[str, int]:
        """per-weight bytes plus an even share (rounded up) of what no weight owns but the change added
        (a branch's Add, longer counters), so that the plan with every weight changed is sized exactly."""
        rest = total - base_total - sum(per[n] - base[n] for n in mats)
        share = -(-rest // len(changed)) if changed else 0
        return {n: per[n] + (share if n in changed else 0) for n in mats}

    base_total, base = size_plan(zg, plan_in("f32")[0])
    table: dict[tuple[str, str], int] = {(n, "f32"): base[n] for n in mats}
    for f in fmts:
        if f.name != "f32":
            p, _ = plan_in(f.name)
            total, per = size_plan(zg, p)
            changed = [n for n in mats if p.tensors[n].format == f.name]
            per = spread(total, per, changed)
            table.update({(n, f.name): per[n] for n in changed})
    branch_table: dict[tuple[str, int], int] = {}
    for r in sorted({r for r in ranks if r > 0}):
        p, has = plan_in("f32", r)
        total, per = size_plan(zg, p, has)
        per = spread(total, per, list(has))
        branch_table.update({(n, r): per[n] - base[n] for n in has})
    overhead = base_total - sum(base.values())

    def exact_bytes(plan: Plan) -> int:
        total, _ = size_plan(zg, plan, {n: t.rank for n, t in plan.tensors.items() if t.rank})
        if total >= INLINE_LIMIT:
            raise EdgeqError(None, f"a budgeted ONNX plan of {total / 1e6:.0f} MB needs external data (past 2 GB), "
                                   "which budgeted plans cannot size exactly yet")
        return total

    return FileLayout.from_tables("onnx", overhead, table, branch_table, key=f"onnx/layout-v{LAYOUT_VERSION}",
                                  exact_bytes=exact_bytes)

