"""Narrow an ONNX decoder's MLPs to per-layer widths by editing the model's protobuf bytes. No onnx package.

A bundle exported with `--pruning-rates` holds the full-width model with every MLP's channels sorted, and the
manifest's `onnx.pruning` recipe lists, per layer, each initializer that holds the MLP's channels (which axis, and
how many elements along it one channel takes: 1 for a float or int8 weight, 1/32 for a 32-block's scale, 1/64 for
two 4-bit zero points a byte) and each node attribute that states the width (MatMulNBits' K or N). At width k the
initializers keep a prefix of k·per_channel elements along their axis, the attributes read k, and everything else
is copied byte for byte, so onnxruntime builds its session on the narrowed weights only (never a Slice in the graph
that would keep the full weights resident).

With `--prune-attention` the recipe also names the attention's arrays (`width` "qk" or "v": which of the table's
widths they follow). Their axis holds `groups` equal runs (heads, or RoPE halves of heads), each narrowed to a
prefix; MatMulNBits attributes read the width times `times`; and the KV cache inputs and outputs (`value`) declare
the narrowed head width in their dimension `dim`.

Only the protobuf wire format is parsed (ModelProto -> GraphProto -> NodeProto / AttributeProto / TensorProto, by
field number); the file is untrusted input and every length is checked against the bytes it lies in.
"""

from __future__ import annotations

import mmap
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from edgeq.runtime.manifest import BundleError

# field numbers of onnx.proto
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 1, 5, 11, 12
VALUE_NAME, VALUE_TYPE, TYPE_TENSOR, TENSOR_TYPE_SHAPE, SHAPE_DIM, DIM_VALUE, DIM_PARAM = 1, 2, 1, 2, 1, 1, 2
NODE_NAME, NODE_ATTRIBUTE = 3, 5
ATTR_NAME, ATTR_I = 1, 3
TENSOR_DIMS, TENSOR_NAME, TENSOR_RAW, TENSOR_EXTERNAL = 1, 8, 9, 13
TENSOR_DATA_FIELDS = (4, 5, 6, 7, 10, 11)        # float_data, int32_data, string_data, int64_data, double, uint64


def _varint(buf, pos: int, end: int, path: Path) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise BundleError(path, "ONNX model: a varint runs past its message")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7


def _enc_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int, end: int, path: Path):
    """(field number, wire type, value, start of the field, end of the field) for each field of one message;
    value is an int (varint), or (start, end) of the payload (length-delimited and fixed)."""
    pos = start
    while pos < end:
        f0 = pos
        tag, pos = _varint(buf, pos, end, path)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end, path)
        elif wire == 2:
            n, pos = _varint(buf, pos, end, path)
            if n > end - pos:
                raise BundleError(path, "ONNX model: a field runs past its message")
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if n > end - pos:
                raise BundleError(path, "ONNX model: a field runs past its message")
            value, pos = (pos, pos + n), pos + n
        else:
            raise BundleError(path, f"ONNX model: unsupported protobuf wire type {wire}")
        yield field, wire, value, f0, pos


def _len_field(field: int, payload: bytes) -> bytes:
    return _enc_varint(field << 3 | 2) + _enc_varint(len(payload)) + payload


def _string(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _edit_node(buf, start: int, end: int, attrs: dict[str, dict[str, int]], path: Path) -> bytes | None:
    """The node re-encoded with its width attributes set, or None when it is not one the recipe names."""
    name = next((_string(buf, v) for f, w, v, _, _ in _fields(buf, start, end, path) if f == NODE_NAME and w == 2),
                None)
    if name not in attrs:
        return None
    want = attrs[name]
    out, done = [], set()
    for f, w, v, a, b in _fields(buf, start, end, path):
        if f == NODE_ATTRIBUTE and w == 2:
            parts, attr_name = [], None
            for af, aw, av, aa, ab in _fields(buf, v[0], v[1], path):
                if af == ATTR_NAME and aw == 2:
                    attr_name = _string(buf, av)
                parts.append((af, aw, aa, ab))
            if attr_name in want:
                body = b"".join(_enc_varint(ATTR_I << 3) + _enc_varint(want[attr_name]) if af == ATTR_I and aw == 0
                                else bytes(buf[aa:ab]) for af, aw, aa, ab in parts)
                out.append(_len_field(NODE_ATTRIBUTE, body))
                done.add(attr_name)
                continue
        out.append(bytes(buf[a:b]))
    missing = set(want) - done
    if missing:
        raise BundleError(path, f"ONNX node {name} has no attribute {sorted(missing)[0]}")
    return b"".join(out)


def _edit_value(buf, start: int, end: int, dims: dict[str, dict[int, int]], path: Path) -> bytes | None:
    """A graph input or output (ValueInfoProto) re-encoded with the dimensions `dims[name]` set, or None when the
    recipe does not name it."""
    fields = list(_fields(buf, start, end, path))
    name = next((_string(buf, v) for f, w, v, _, _ in fields if f == VALUE_NAME and w == 2), None)
    if name not in dims:
        return None
    want, seen = dims[name], [0]

    def nested(s: int, e: int, chain: tuple[int, ...]) -> bytes:
        out = []
        for f, w, v, a, b in _fields(buf, s, e, path):
            if chain and f == chain[0] and w == 2:
                out.append(_len_field(f, nested(v[0], v[1], chain[1:])))
            elif not chain and f == SHAPE_DIM and w == 2:
                i = seen[0]
                seen[0] += 1
                out.append(_len_field(f, _enc_varint(DIM_VALUE << 3) + _enc_varint(want[i])) if i in want
                           else bytes(buf[a:b]))
            else:
                out.append(bytes(buf[a:b]))
        return b"".join(out)

    body = b"".join(_len_field(VALUE_TYPE, nested(v[0], v[1], (TYPE_TENSOR, TENSOR_TYPE_SHAPE)))
                    if f == VALUE_TYPE and w == 2 else bytes(buf[a:b]) for f, w, v, a, b in fields)
    if any(i >= seen[0] for i in want):
        raise BundleError(path, f"ONNX value {name} has no dimension {max(want)}")
    return body


def _edit_tensor(buf, start: int, end: int, cuts: dict[str, tuple[int, int, int]], path: Path) -> bytes | None:
    """The initializer re-encoded with a prefix of `keep` along `axis` (in each of `groups` equal runs of it), or
    None when the recipe does not name it."""
    fields = list(_fields(buf, start, end, path))
    name = next((_string(buf, v) for f, w, v, _, _ in fields if f == TENSOR_NAME and w == 2), None)
    if name not in cuts:
        return None
    axis, keep, groups = cuts[name]
    dims: list[int] = []
    raw = None
    for f, w, v, _, _ in fields:
        if f == TENSOR_DIMS and w == 0:
            dims.append(v)
        elif f == TENSOR_DIMS and w == 2:                 # packed
            p = v[0]
            while p < v[1]:
                d, p = _varint(buf, p, v[1], path)
                dims.append(d)
        elif f == TENSOR_RAW and w == 2:
            raw = v
        elif f == TENSOR_EXTERNAL or f in TENSOR_DATA_FIELDS:
            raise BundleError(path, f"ONNX initializer {name} is not stored as raw data in the model")
    if (raw is None or not 0 <= axis < len(dims) or dims[axis] % groups
            or not 0 < keep <= dims[axis] // groups):
        raise BundleError(path, f"ONNX initializer {name} does not fit the pruning recipe")
    count = int(np.prod(dims, dtype=np.int64))
    nbytes = raw[1] - raw[0]
    if count <= 0 or nbytes % count:
        raise BundleError(path, f"ONNX initializer {name}: {nbytes} bytes are not {count} elements")
    arr = np.frombuffer(buf, np.uint8, count=nbytes, offset=raw[0]).reshape(
        *dims[:axis], groups, dims[axis] // groups, *dims[axis + 1:], nbytes // count)
    sliced = np.ascontiguousarray(arr[(slice(None),) * (axis + 1) + (slice(0, keep),)])
    new_dims = dims[:axis] + [groups * keep] + dims[axis + 1:]
    out = [b"".join(_enc_varint(TENSOR_DIMS << 3) + _enc_varint(d) for d in new_dims)]
    for f, w, v, a, b in fields:
        if f == TENSOR_DIMS:
            continue
        out.append(_len_field(TENSOR_RAW, sliced.tobytes()) if f == TENSOR_RAW else bytes(buf[a:b]))
    return b"".join(out)


def plan_cuts(recipe: list, widths: list[int], full: list[int], path: Path,
              attention: dict[str, list[int]] | None = None):
    """Per initializer (axis, elements kept per group, groups), per node {attribute: value} and per graph input or
    output {dimension: value} at these widths (`attention`: {"qk": [...], "v": [...]} per layer, or None)."""
    table = {None: widths, **(attention or {})}
    if len(recipe) != len(widths) or any(len(w) != len(widths) for w in table.values()):
        raise BundleError(path, "the ONNX pruning recipe and the pruning table disagree on the number of layers")
    cuts: dict[str, tuple[int, int, int]] = {}
    attrs: dict[str, dict[str, int]] = {}
    dims: dict[str, dict[int, int]] = {}
    for layer, items in enumerate(recipe):
        for it in items:
            kind = it.get("width")
            if kind not in table:
                raise BundleError(path, f"the ONNX pruning recipe follows {kind} widths, which the table lacks")
            k = table[kind][layer]
            if "initializer" in it:
                per = Fraction(int(it["per_channel"][0]), int(it["per_channel"][1]))
                keep = k * per
                if keep.denominator != 1:
                    raise BundleError(path, f"width {k} of layer {layer} splits an element of {it['initializer']}")
                cuts[it["initializer"]] = (int(it["axis"]), int(keep), int(it.get("groups", 1)))
            elif "value" in it:
                dims.setdefault(it["value"], {})[int(it["dim"])] = int(k)
            else:
                times = Fraction(*(int(v) for v in it.get("times", (1, 1))))
                if (k * times).denominator != 1:
                    raise BundleError(path, f"width {k} of layer {layer} does not fit node {it['node']}")
                attrs.setdefault(it["node"], {})[it["attribute"]] = int(k * times)
    return cuts, attrs, dims


def slice_mlp(src: str | os.PathLike, dst: str | os.PathLike, widths: list[int], full: list[int],
              recipe: list, attention: dict[str, list[int]] | None = None) -> None:
    """Write the model at `src` with layer i's MLP narrowed to its first `widths[i]` channels (and its attention
    heads to `attention`'s widths) to `dst` (atomically)."""
    src, dst = Path(src), Path(dst)
    cuts, attrs, dims = plan_cuts(recipe, widths, full, src, attention)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    with open(src, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        found_t, found_n, found_v = set(), set(), set()
        out = []
        graph_seen = False
        for f, w, v, a, b in _fields(buf, 0, len(buf), src):
            if f != MODEL_GRAPH or w != 2:
                out.append(bytes(buf[a:b]))
                continue
            graph_seen = True
            parts = []
            for gf, gw, gv, ga, gb in _fields(buf, v[0], v[1], src):
                new = None
                if gf == GRAPH_INITIALIZER and gw == 2:
                    new = _edit_tensor(buf, gv[0], gv[1], cuts, src)
                    if new is not None:
                        found_t.add(_string(buf, next(x[2] for x in _fields(buf, gv[0], gv[1], src)
                                                      if x[0] == TENSOR_NAME)))
                elif gf == GRAPH_NODE and gw == 2:
                    new = _edit_node(buf, gv[0], gv[1], attrs, src)
                    if new is not None:
                        found_n.add(_string(buf, next(x[2] for x in _fields(buf, gv[0], gv[1], src)
                                                      if x[0] == NODE_NAME)))
                elif gf in (GRAPH_INPUT, GRAPH_OUTPUT) and gw == 2 and dims:
                    new = _edit_value(buf, gv[0], gv[1], dims, src)
                    if new is not None:
                        found_v.add(_string(buf, next(x[2] for x in _fields(buf, gv[0], gv[1], src)
                                                      if x[0] == VALUE_NAME)))
                parts.append(bytes(buf[ga:gb]) if new is None else _len_field(gf, new))
            out.append(_len_field(MODEL_GRAPH, b"".join(parts)))
        missing = sorted(set(cuts) - found_t) + sorted(set(attrs) - found_n) + sorted(set(dims) - found_v)
        if not graph_seen or missing:
            raise BundleError(src, f"ONNX model lacks {missing[0] if missing else 'a graph'} named by the pruning "
                                   "recipe")
    try:
        with open(tmp, "wb") as fh:
            for part in out:
                fh.write(part)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
