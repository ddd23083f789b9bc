"""Narrow a GGUF file's MLPs to per-layer widths by byte copies of whole blocks, for llama.cpp to load. No gguf package.

An edgeq bundle exported with `--pruning-rates` holds the full-width model with every MLP's channels sorted, so the
model at any rate is a prefix: the first k rows of ffn_gate and ffn_up (whole rows, whatever their format) and the
first k columns of every ffn_down row (k is a multiple of the format's block, which the exporter guaranteed and the
manifest records, so the kept bytes of a row are a prefix too). Nothing is requantized.

llama.cpp's `llama` architecture reads `feed_forward_length` as a per-layer array but builds every layer's tensors
with layer 0's width (llama-cpp-python 0.3.36: "check_tensor_dims: tensor 'blk.1.ffn_gate.weight' has wrong
shape"); its `deci` architecture (Llama with per-layer FFN and head counts, from Nemotron) builds each layer with its
own width and computes exactly llama's graph otherwise (same logits to the bit at full width, tests/test_uniql.py).
So a file whose layers differ is written as `deci`, with the `llama.*` keys renamed; equal widths stay `llama`.

With mean compensation (`biases`) each layer also gets `blk.N.ffn_down.bias` (float32, the model's width), appended
after the source's tensors: both architectures read it as an optional tensor (llama.cpp 0.3.36's models/llama.cpp
and models/deci.cpp: `ffn_down_b`, TENSOR_NOT_REQUIRED) and add it to the down projection's output.

The source is untrusted input: every count and length is checked against the file's size before it is used.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.runtime.manifest import BundleError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_COUNT = 1 << 24
# GGUF value types: fixed sizes of the scalars; 8 = string, 9 = array
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_FFN = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$")
_F32 = 0                  # ggml type of a float32 tensor


@dataclass
class _TensorInfo:
    name: str
    dims: list[int]          # ggml order: dims[0] runs along a row
    type: int
    offset: int              # from the start of the data section


@dataclass
class _Header:
    version: int
    kvs: list[tuple[str, int, bytes]]     # key, value type, the value's raw bytes
    tensors: list[_TensorInfo]
    alignment: int
    data_start: int


class _Reader:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise BundleError(self.path, "GGUF header runs past the end of the file")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def count(self, what: str) -> int:
        n = self.u64()
        if n > MAX_COUNT or n > len(self.buf) - self.pos:
            raise BundleError(self.path, f"GGUF {what} count {n} is implausible")
        return n

    def string(self) -> str:
        try:
            return self.take(self.count("string length")).decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(self.path, "GGUF string is not UTF-8") from None

    def skip_value(self, vtype: int) -> None:
        if vtype in _SCALAR:
            self.take(_SCALAR[vtype])
        elif vtype == _STRING:
            self.take(self.count("string length"))
        elif vtype == _ARRAY:
            sub, n = self.u32(), self.count("array")
            if sub in _SCALAR:
                self.take(_SCALAR[sub] * n)
            elif sub == _STRING:
                for _ in range(n):
                    self.take(self.count("string length"))
            else:
                raise BundleError(self.path, f"GGUF array of value type {sub} is not supported")
        else:
            raise BundleError(self.path, f"unknown GGUF value type {vtype}")


def _read_header(buf, path: Path) -> _Header:
    r = _Reader(buf, path)
    if r.take(4) != MAGIC:
        raise BundleError(path, "not a GGUF file")
    version = r.u32()
    if version not in (2, 3):
        raise BundleError(path, f"GGUF version {version} is not supported")
    n_tensors, n_kv = r.count("tensor"), r.count("key")
    kvs, alignment = [], DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = r.string()
        vtype = r.u32()
        start = r.pos
        r.skip_value(vtype)
        raw = bytes(buf[start:r.pos])
        if key == "general.alignment":
            if vtype != _UINT32:
                raise BundleError(path, "general.alignment is not a uint32")
            alignment = struct.unpack("<I", raw)[0]
            if alignment == 0 or alignment & (alignment - 1) or alignment > 1 << 16:
                raise BundleError(path, f"GGUF alignment {alignment} is not a power of two")
        kvs.append((key, vtype, raw))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if not 1 <= n_dims <= 4:
            raise BundleError(path, f"tensor {name} has {n_dims} dimensions")
        dims = [r.u64() for _ in range(n_dims)]
        tensors.append(_TensorInfo(name, dims, r.u32(), r.u64()))
    data_start = _pad(r.pos, alignment)
    if data_start > len(buf):
        raise BundleError(path, "GGUF file ends before its data")
    return _Header(version, kvs, tensors, alignment, data_start)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _tensor_sizes(h: _Header, file_size: int, path: Path) -> dict[str, int]:
    """Each tensor's span: the distance to the next tensor's data (the last one's to the end of the file), its
    bytes plus the padding to the alignment."""
    order = sorted(h.tensors, key=lambda t: t.offset)
    sizes = {}
    for t, nxt in zip(order, order[1:] + [None]):
        end = nxt.offset if nxt is not None else file_size - h.data_start
        if t.offset > end or h.data_start + end > file_size:
            raise BundleError(path, f"tensor {t.name} lies outside the file")
        sizes[t.name] = end - t.offset
    return sizes


def sliced_bytes(path: Path, widths: list[int], blocks: list[int], biases: list[np.ndarray] | None = None) -> int:
    """The size of the file `slice_mlp` writes (for callers that check a cached copy)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        h = _read_header(buf, path)
        plan = _plan(h, buf, path, widths, blocks, biases)
    return plan[-1]


def _plan(h: _Header, buf, path: Path, widths: list[int], blocks: list[int], biases: list[np.ndarray] | None = None):
    """New tensor infos and, per tensor, how to copy it: (info, source offset, row bytes in, row bytes out, rows)."""
    sizes = _tensor_sizes(h, len(buf), path)
    copies, infos, pos = [], [], 0
    n_layers = len(widths)
    seen: set[tuple[int, str]] = set()
    for t in h.tensors:
        if biases is not None and t.name.endswith(".ffn_down.bias"):
            raise BundleError(path, f"tensor {t.name}: the file already has a down-projection bias")
        m = _FFN.match(t.name)
        dims = list(t.dims)
        rows = 1
        for d in dims[1:]:
            rows *= d
        if m is None:
            nbytes = sizes[t.name]
            row_in = row_out = nbytes
            n_rows = 1
        else:
            layer, kind = int(m.group(1)), m.group(2)
            if layer >= n_layers or len(dims) != 2:
                raise BundleError(path, f"tensor {t.name} does not fit the pruning table ({n_layers} layers)")
            seen.add((layer, kind))
            k = widths[layer]
            full = dims[1] if kind in ("gate", "up") else dims[0]
            if not 0 < k <= full:
                raise BundleError(path, f"width {k} of layer {layer} is outside 1..{full}")
            if kind in ("gate", "up"):          # rows are the MLP's channels: keep the first k whole rows
                row_in = _row_bytes(t, sizes[t.name], rows, h.alignment, path)
                row_out, n_rows = row_in, k
                dims[1] = k
            else:                                # columns are the channels: keep a prefix of every row's blocks
                if k % blocks[layer]:
                    raise BundleError(path, f"width {k} of layer {layer} is not a multiple of its block "
                                            f"({blocks[layer]})")
                row_in = _row_bytes(t, sizes[t.name], rows, h.alignment, path)
                if (row_in * k) % full:
                    raise BundleError(path, f"{t.name}: {k} of {full} columns is not a whole number of bytes")
                row_out, n_rows = row_in * k // full, rows
                dims[0] = k
        infos.append(_TensorInfo(t.name, dims, t.type, pos))
        copies.append((h.data_start + t.offset, row_in, row_out, n_rows))
        pos = _pad(pos + row_out * n_rows, h.alignment)
    missing = [(layer, kind) for layer in range(n_layers) for kind in ("gate", "up", "down")
               if (layer, kind) not in seen]
    if missing:
        raise BundleError(path, f"GGUF file has no blk.{missing[0][0]}.ffn_{missing[0][1]}.weight")
    if biases is not None:
        if len(biases) != n_layers:
            raise BundleError(path, f"{len(biases)} biases for {n_layers} layers")
        out_dims = {int(m.group(1)): t.dims[1] for t in h.tensors if (m := _FFN.match(t.name)) and m.group(2) == "down"}
        for layer, b in enumerate(biases):
            if b.shape != (out_dims[layer],):
                raise BundleError(path, f"bias of layer {layer} has {b.size} values, ffn_down has {out_dims[layer]} "
                                        "outputs")
            infos.append(_TensorInfo(f"blk.{layer}.ffn_down.bias", [b.size], _F32, pos))
            copies.append((None, b.size * 4, b.size * 4, 1))
            pos = _pad(pos + b.size * 4, h.alignment)
    header = _header_bytes(h, infos, widths, path)
    return header, infos, copies, len(header) + pos


def _row_bytes(t: _TensorInfo, span: int, rows: int, alignment: int, path: Path) -> int:
    """Bytes of one row, without ggml's type table: the span to the next tensor is rows x row bytes plus less than
    one alignment of padding, so with more rows than the alignment has bytes, span // rows is the row size."""
    if rows <= alignment:
        raise BundleError(path, f"tensor {t.name} has too few rows ({rows}) to be pruned")
    row = span // rows
    if row == 0 or span - row * rows >= alignment:
        raise BundleError(path, f"tensor {t.name}: {span} bytes are not {rows} whole rows")
    return row


def _header_bytes(h: _Header, infos: list[_TensorInfo], widths: list[int], path: Path) -> bytes:
    uniform = len(set(widths)) == 1
    arch = "llama" if uniform else "deci"
    out = [MAGIC, struct.pack("<IQQ", 3, len(infos), len(h.kvs))]
    found = False
    for key, vtype, raw in h.kvs:
        if key == "general.architecture":
            if vtype != _STRING or raw[8:] != b"llama":
                raise BundleError(path, "only llama-architecture GGUF files can be pruned")
            out += [_gguf_string(key), struct.pack("<I", _STRING), _gguf_string(arch)]
            continue
        if key.startswith("llama."):
            key = arch + key[len("llama"):]
        if key == f"{arch}.feed_forward_length":
            found = True
            if uniform:
                out += [_gguf_string(key), struct.pack("<II", _UINT32, widths[0])]
            else:
                out += [_gguf_string(key), struct.pack("<IIQ", _ARRAY, _UINT32, len(widths)),
                        struct.pack(f"<{len(widths)}I", *widths)]
            continue
        out += [_gguf_string(key), struct.pack("<I", vtype), raw]
    if not found:
        raise BundleError(path, "GGUF file has no llama.feed_forward_length")
    for t in infos:
        out += [_gguf_string(t.name), struct.pack("<I", len(t.dims)), struct.pack(f"<{len(t.dims)}Q", *t.dims),
                struct.pack("<IQ", t.type, t.offset)]
    head = b"".join(out)
    return head + bytes(_pad(len(head), h.alignment) - len(head))


def slice_mlp(src: str | os.PathLike, dst: str | os.PathLike, widths: list[int], blocks: list[int],
              biases: list[np.ndarray] | None = None) -> int:
    """Write `src` with layer i's MLP narrowed to its first `widths[i]` channels to `dst` (atomically); `blocks[i]`
    is the block of layer i's ffn_down format along its input; `biases[i]` (float32), layer i's ffn_down bias.
    Returns the bytes written."""
    src, dst = Path(src), Path(dst)
    if len(blocks) != len(widths):
        raise BundleError(src, "pruning table and blocks disagree on the number of layers")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        h = _read_header(buf, src)
        header, infos, copies, total = _plan(h, buf, src, widths, blocks, biases)
        extra = iter([] if biases is None else biases)
        try:
            with open(tmp, "wb") as out:
                out.write(header)
                written = 0
                for info, (start, row_in, row_out, n_rows) in zip(infos, copies):
                    if start is None:                     # an appended bias
                        out.write(np.ascontiguousarray(next(extra), dtype="<f4").tobytes())
                    elif start + row_in * n_rows > len(buf):
                        raise BundleError(src, f"tensor {info.name} lies outside the file")
                    elif row_in == row_out:
                        out.write(buf[start:start + row_out * n_rows])
                    else:
                        for r in range(n_rows):
                            out.write(buf[start + r * row_in:start + r * row_in + row_out])
                    written += row_out * n_rows
                    pad = _pad(written, h.alignment) - written
                    out.write(bytes(pad))
                    written += pad
            if tmp.stat().st_size != total:
                raise BundleError(src, f"sliced file is {tmp.stat().st_size} bytes, expected {total}")
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return total
