"""A bounded safetensors reader (lazy, per tensor) and a streaming writer.

safetensors files are untrusted input: an 8-byte little-endian header length,
that many bytes of JSON, then the data. The header is validated here before
anything is allocated or handed to another library: the length must fit in
the file and under a cap, the JSON must be an object of well-formed entries,
every dtype known, every shape's byte size equal to its offsets' span, every
span inside the data section, and no two tensors may overlap.

Tensors are read one at a time through a memory map opened for that tensor
alone and closed after the float32 copy is made, so the pages of a large
checkpoint do not stay resident while an export streams through it. bfloat16
is converted in numpy (the high half of a float32), so no torch is needed.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edgeq.core.errors import EdgeqError

# Large vocabularies with many tensors stay far below this; anything bigger is refused unread.
MAX_HEADER_BYTES = 100 * 2**20

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class STensor:
    """One tensor of a safetensors file: where its bytes are and how to read them."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int          # absolute file offset
    nbytes: int

    def load(self) -> np.ndarray:
        """The tensor as float32 (a fresh array; the file's pages are released afterwards)."""
        if self.dtype not in FLOAT_DTYPES:
            raise EdgeqError(self.path, f"tensor {self.name} has dtype {self.dtype}, expected a float type")
        n = int(np.prod(self.shape, dtype=np.int64))
        if n == 0:
            return np.zeros(self.shape, dtype=np.float32)
        page = mmap.ALLOCATIONGRANULARITY
        base = self.start // page * page
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), self.start + self.nbytes - base, access=mmap.ACCESS_READ, offset=base)
        try:
            raw = np.frombuffer(mm, dtype=DTYPES[self.dtype], count=n, offset=self.start - base)
            if self.dtype == "BF16":
                out = np.empty(n, dtype=np.uint32)
                np.left_shift(raw, 16, out=out, dtype=np.uint32)
                out = out.view(np.float32)
            else:
                out = raw.astype(np.float32)   # always a copy, so the map can close
            del raw
        finally:
            try:
                mm.close()
            except BufferError:   # an exception left a view alive; the map closes when it is collected
                pass
        return out.reshape(self.shape)


    def load_ints(self) -> np.ndarray:
        """An integer tensor as int64 (indices: a sparse adapter's rows and columns)."""
        if self.dtype not in ("I64", "I32", "I16", "I8", "U8"):
            raise EdgeqError(self.path, f"tensor {self.name} has dtype {self.dtype}, expected an integer type")
        n = int(np.prod(self.shape, dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self.start)
            raw = f.read(self.nbytes)
        return np.frombuffer(raw, dtype=DTYPES[self.dtype], count=n).astype(np.int64).reshape(self.shape)


class SafetensorsFile:
    """A validated safetensors file: `tensors` by name, `metadata` (the optional __metadata__ strings)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata = _read_header(self.path)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> STensor:
        return self.tensors[name]

    def keys(self):
        return self.tensors.keys()


def _read_header(path: Path) -> tuple[dict[str, STensor], dict[str, str]]:
    if not path.is_file():
        raise EdgeqError(path, "no such file")
    size = path.stat().st_size
    if size < 8:
        raise EdgeqError(path, f"not a safetensors file (only {size} bytes)")
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > size - 8:
            raise EdgeqError(path, f"corrupt safetensors header: its length ({hlen} bytes) runs past the end of "
                                   f"the file ({size} bytes)")
        if hlen > MAX_HEADER_BYTES:
            raise EdgeqError(path, f"safetensors header of {hlen} bytes is larger than the {MAX_HEADER_BYTES} "
                                   "bytes edgeq accepts")
        raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EdgeqError(path, f"corrupt safetensors header: not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise EdgeqError(path, "corrupt safetensors header: not a JSON object")
    data_start = 8 + hlen
    data_len = size - data_start
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise EdgeqError(path, "corrupt safetensors header: __metadata__ is not a map of strings")
    tensors: dict[str, STensor] = {}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise EdgeqError(path, f"corrupt safetensors header: entry {name!r} needs exactly dtype, shape and "
                                   "data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise EdgeqError(path, f"tensor {name} has unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise EdgeqError(path, f"corrupt safetensors header: tensor {name} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise EdgeqError(path, f"corrupt safetensors header: tensor {name} has invalid data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end or end > data_len:
            raise EdgeqError(path, f"corrupt safetensors header: tensor {name}'s data [{begin}, {end}) lies outside "
                                   f"the {data_len} data bytes of the file")
        n = 1
        for d in shape:
            n *= d
        if n * DTYPES[dtype].itemsize != end - begin:
            raise EdgeqError(path, f"corrupt safetensors header: tensor {name} of shape {shape} {dtype} needs "
                                   f"{n * DTYPES[dtype].itemsize} bytes, its offsets span {end - begin}")
        tensors[name] = STensor(path, name, dtype, tuple(shape), data_start + begin, end - begin)
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise EdgeqError(path, f"corrupt safetensors header: tensors {n0} and {n1} overlap")
    return tensors, meta


# --- writing -------------------------------------------------------------------

_NP_TO_ST = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
             np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int8"): "I8", np.dtype("uint8"): "U8"}


def write_safetensors(path: str | os.PathLike, specs: Iterable[tuple[str, tuple[int, ...], str]],
                      produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file one tensor at a time; returns its size in bytes.

    `specs` lists (name, shape, dtype) with dtype one of F32, F16, BF16, F64;
    `produce(name)` returns that tensor's data (any float array; it is converted,
    BF16 by rounding to nearest even). Only one tensor is in memory at a time.
    """
    specs = list(specs)
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            arr = np.asarray(produce(name))
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{name}: produced shape {arr.shape}, declared {shape}")
            f.write(_encode(arr, dtype).tobytes())
    return path.stat().st_size


def _encode(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype("<u2")
    return np.ascontiguousarray(arr, dtype=DTYPES[dtype])
