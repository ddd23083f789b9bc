"""Named arrays in a safetensors file (TVM parameters, TVM LoRA adapters): no pickle, one line when unreadable."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from edgeq.runtime.manifest import BundleError

ALIGNMENT = 64          # bytes: what TVM's CPU kernels assume of a tensor's data (it refuses to share less aligned)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8}
_MAX_HEADER = 100 << 20


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the file; the safetensors reader bounds every length against the file's size."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(path, f"not a readable safetensors file ({exc})") from None


def aligned_arrays(specs: list[tuple[tuple[int, ...], object]], alignment: int = ALIGNMENT) -> list[np.ndarray]:
    """Uninitialised C-contiguous arrays of these (shape, dtype), each starting on an `alignment`-byte boundary,
    carved out of one allocation. One buffer instead of one per array: numpy asks the kernel for huge pages for
    a large one, so filling it faults a few pages instead of thousands (measured: 40 MB in 420 arrays filled in
    48 ms, in one 7 ms); all of it is freed when the last array goes."""
    sizes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // alignment) * alignment
    buf = np.empty(total + alignment, np.uint8)
    start = (-buf.ctypes.data) % alignment
    return [buf[start + o:start + o + n].view(dtype).reshape(shape)
            for o, n, (shape, dtype) in zip(offsets, sizes, specs)]


def read_aligned_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, each read from the file straight into its own aligned array: one copy
    of the bytes (the safetensors reader's arrays then an aligned copy of each were two), which is most of what
    a first switch to an adapter costs. The header is checked as the safetensors format asks: known dtypes, each
    tensor's bytes its shape's, the tensors tiling the data without holes or overlaps, within the file."""
    def bad(why: str) -> BundleError:
        return BundleError(path, f"not a readable safetensors file ({why})")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, _MAX_HEADER):
                raise bad("header size out of bounds")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise bad("header is not JSON") from None
            if not isinstance(header, dict):
                raise bad("header is not a JSON object")
            entries = []
            for name, t in header.items():
                if name == "__metadata__":
                    continue
                try:
                    dtype, shape, (begin, end) = _DTYPES[t["dtype"]], t["shape"], t["data_offsets"]
                except (KeyError, TypeError, ValueError):
                    raise bad(f"tensor {name!r}: dtype, shape or offsets missing or unknown") from None
                if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                        and type(begin) is int and type(end) is int):
                    raise bad(f"tensor {name!r}: malformed shape or offsets")
                if end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
                    raise bad(f"tensor {name!r}: {end - begin} bytes for shape {shape}")
                entries.append((begin, end, name, dtype, shape))
            entries.sort()
            at = 0
            for begin, end, name, _, _ in entries:
                if begin != at:
                    raise bad(f"tensor {name!r}: its bytes do not follow the previous tensor's")
                at = end
            if 8 + n + at != size:
                raise bad(f"{size} bytes where the header describes {8 + n + at}")
            out = {}
            arrays = aligned_arrays([(tuple(shape), dtype) for _, _, _, dtype, shape in entries])
            for (_, _, name, _, _), arr in zip(entries, arrays):     # in file order: one sequential read
                if arr.nbytes and f.readinto(memoryview(arr.reshape(-1)).cast("B")) != arr.nbytes:
                    raise bad("file ends early")
                out[name] = arr
            return out
    except OSError as exc:
        raise bad(str(exc)) from None
