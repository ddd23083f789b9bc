"""A bounded, fast reader for GGUF headers; tensor data stays memory-mapped.

GGUF files are untrusted input. Every count and length read from the file is
checked against the bytes that remain before anything is allocated, and every
tensor's data must lie inside the file. gguf-py's own reader is exact but builds
a numpy view per array element, which costs ~10 s on a 49k-token vocabulary;
this one reads numeric arrays in one `frombuffer` and strings with `struct`.
Writing and dequantizing still use gguf-py.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16
MAX_ARRAY_NESTING = 4         # llama.cpp writes none; a deeper array is refused rather than recursed into
LIST_MAX = 1 << 20            # numeric arrays longer than this stay numpy views of the file (no per-element objects)

# GGUF value types -> (struct code, numpy dtype); 8 = string, 9 = array
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
STRING, ARRAY = 8, 9


class _Corrupt(Exception):
    pass


class _Cursor:
    def __init__(self, buf, pos: int = 0):
        self.buf = buf
        self.pos = pos
        self.size = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"{what} runs past the end of the file (needs {n} bytes at offset {self.pos})")

    def scalar(self, code: str, what: str):
        n = struct.calcsize(code)
        self.need(n, what)
        v = struct.unpack_from(code, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0], what)
            return bool(v) if vtype == 7 else v
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise _Corrupt(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
            sub = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if sub in _SCALARS:
                dt = np.dtype(_SCALARS[sub][1]).newbyteorder("<")
                self.need(count * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                if count > LIST_MAX:
                    return arr
                return [bool(x) for x in arr] if sub == 7 else arr.tolist()
            if sub == STRING:
                self.need(count * 8, what)  # every string costs at least its length field
                return [self.string(what) for _ in range(count)]
            if sub == ARRAY:
                self.need(count * 12, what)
                return [self.value(ARRAY, what, depth + 1) for _ in range(count)]
            raise _Corrupt(f"{what}: unknown array element type {sub}")
        raise _Corrupt(f"{what}: unknown value type {vtype}")


@dataclass
class GGUFTensor:
    name: str
    tensor_type: Any           # gguf.GGMLQuantizationType
    shape: np.ndarray          # GGML order: shape[0] is the row length
    n_elements: int
    n_bytes: int
    data_offset: int           # absolute, in the file
    _mm: Any = None

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes as gguf-py shapes them (typed for float types, row bytes for quantized)."""
        from gguf import GGMLQuantizationType as T
        from gguf.quants import quant_shape_to_byte_shape

        dims = tuple(int(d) for d in reversed(self.shape.tolist()))
        typed = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8, T.I16: np.int16,
                 T.I32: np.int32, T.I64: np.int64}
        raw = self._mm[self.data_offset:self.data_offset + self.n_bytes]
        if self.tensor_type in typed:
            return raw.view(typed[self.tensor_type]).reshape(dims)
        return raw.reshape(quant_shape_to_byte_shape(dims, self.tensor_type))


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


def _parse(path: Path) -> GGUFFile:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    c = _Cursor(mm)
    c.need(4, "magic")
    if bytes(mm[:4]) != GGUF_MAGIC:
        raise EdgeqError(path, "not a GGUF file (bad magic)")
    c.pos = 4
    version = c.scalar("<I", "version")
    if version not in (2, 3):
        raise _Corrupt(f"unsupported GGUF version {version}")
    n_tensors = c.scalar("<Q", "tensor count")
    n_kv = c.scalar("<Q", "metadata count")
    c.need(n_kv * 13, "metadata")        # key length + type + smallest value
    c.need(n_tensors * 28, "tensor infos")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        vtype = c.scalar("<I", f"type of {key!r}")
        if key in meta:
            raise _Corrupt(f"metadata key {key!r} appears twice")
        meta[key] = c.value(vtype, repr(key))
    infos = []
    for _ in range(n_tensors):
        name = c.string("tensor name")
        if len(name) > 1024:      # llama.cpp's GGML_MAX_NAME is 64; be generous, but bounded
            raise _Corrupt(f"tensor name of {len(name)} characters")
        n_dims = c.scalar("<I", f"{name} dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
        dims = [c.scalar("<Q", f"{name} shape") for _ in range(n_dims)]
        raw_type = c.scalar("<I", f"{name} type")
        offset = c.scalar("<Q", f"{name} offset")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name} has unknown type {raw_type}") from None
        n_el = int(np.prod(dims, dtype=object))
        if any(d <= 0 for d in dims) or dims[0] % block or n_el > c.size * 64:
            raise _Corrupt(f"tensor {name} has an impossible shape {dims} for {qtype.name}")
        infos.append((name, qtype, dims, n_el, n_el // block * type_size, offset))
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(align) is not int or not 0 < align <= MAX_ALIGNMENT or align & (align - 1):
        raise _Corrupt(f"general.alignment {align!r} is not a power of two up to {MAX_ALIGNMENT}")
    data_start = (c.pos + align - 1) // align * align
    tensors = []
    seen = set()
    for name, qtype, dims, n_el, n_bytes, offset in infos:
        if name in seen:
            raise _Corrupt(f"tensor {name} appears twice")
        seen.add(name)
        if offset % align:
            raise _Corrupt(f"tensor {name} data offset {offset} is not a multiple of the alignment {align}")
        start = data_start + offset
        if start + n_bytes > c.size:
            raise EdgeqError(path, f"tensor {name} data runs past the end of the file "
                                   f"({start + n_bytes} > {c.size} bytes)")
        tensors.append(GGUFTensor(name, qtype, np.array(dims, dtype=np.int64), n_el, n_bytes, start, mm))
    spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in tensors)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise EdgeqError(path, f"corrupt GGUF: tensors {n0} and {n1} have overlapping data")
    return GGUFFile(path=path, version=version, metadata=meta, tensors=tensors)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    path = Path(path)
    if not path.exists():
        raise EdgeqError(path, "no such file")
    if path.is_dir():
        raise EdgeqError(path, "is a directory, expected a GGUF file")
    if path.stat().st_size < 24:
        raise EdgeqError(path, "too short to be a GGUF file")
    try:
        return _parse(path)
    except _Corrupt as exc:
        raise EdgeqError(path, f"corrupt or truncated GGUF: {exc}") from None


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """All key/value fields as plain Python values (str, int, float, bool, lists)."""
    return dict(reader.metadata)
