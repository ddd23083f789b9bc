"""ggml's own quantizers, through the libggml that llama-cpp-python ships.

Reusing the runtime's library (instead of re-implementing k-quants) is what
makes edgeq's reference quantizer bit-identical to what llama.cpp writes.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np

from edgeq.core.errors import EdgeqError


@functools.lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama-cpp-python is not installed; it provides ggml's quantizers")
    libdir = Path(spec.origin).parent / "lib"
    candidates = sorted(libdir.glob("libggml-base.*")) or sorted(libdir.glob("libggml.*"))
    if not candidates:
        raise RuntimeError(f"no libggml in {libdir}")
    # llama_cpp loads its libraries first so that the CPU backend is registered in this process.
    import llama_cpp  # noqa: F401

    so = ctypes.CDLL(str(candidates[0]))
    so.ggml_quantize_chunk.restype = ctypes.c_size_t
    so.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    so.ggml_quantize_init.argtypes = [ctypes.c_int]
    so.ggml_quantize_init.restype = None
    so.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    so.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    so.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    so.ggml_row_size.restype = ctypes.c_size_t
    so.ggml_get_type_traits.argtypes = [ctypes.c_int]
    so.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return so


class _TypeTraits(ctypes.Structure):
    """ggml.h's `struct ggml_type_traits` (llama-cpp-python 0.3.36's ggml)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.lru_cache(maxsize=None)
def _to_float(ggml_type: int):
    fn = lib().ggml_get_type_traits(ggml_type).contents.to_float
    if not fn:
        raise RuntimeError(f"ggml has no dequantizer for type {ggml_type}")
    return _TO_FLOAT(fn)


def row_size(ggml_type: int, n_per_row: int) -> int:
    return int(lib().ggml_row_size(ggml_type, n_per_row))


def dequantize(ggml_type: int, data: np.ndarray, n: int) -> np.ndarray:
    """`n` float32 values from the bytes of ggml type `ggml_type` (whole rows), by ggml's own dequantizer: the
    planner dequantizes every candidate of every tensor, and gguf-py's numpy port took 3-15x as long (the i-quants'
    grid lookups most) for the same values, bit for bit (tests/test_formats.py compares the two on every type)."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty(n, dtype=np.float32)
    if n:
        _to_float(ggml_type)(data.ctypes.data, out.ctypes.data, n)
    return out


def quantize(ggml_type: int, w: np.ndarray, imatrix: np.ndarray | None = None, threads: int = 2) -> np.ndarray:
    """Quantize a 2-D float array row-wise; returns uint8 of shape (rows, row_bytes).

    Rows are split between threads (ctypes releases the GIL); ggml's quantizers
    are row-independent, so the bytes do not depend on the split.
    """
    so = lib()
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError("quantize expects a 2-D array")
    rows, n = w.shape
    rs = row_size(ggml_type, n)
    out = np.empty((rows, rs), dtype=np.uint8)
    im = None
    if imatrix is not None:
        im = np.ascontiguousarray(imatrix, dtype=np.float32)
        if im.shape != (n,):
            raise ValueError(f"imatrix has shape {im.shape}, expected ({n},)")
    if im is None and so.ggml_quantize_requires_imatrix(ggml_type):
        # ggml aborts the whole process (GGML_ASSERT) when asked; refuse in one line instead
        raise EdgeqError(None, f"ggml type {ggml_type} is written from an importance matrix only; none was given")
    so.ggml_quantize_init(ggml_type)
    im_ptr = None if im is None else im.ctypes.data

    def part(r0: int, r1: int) -> int:
        return int(so.ggml_quantize_chunk(ggml_type, w[r0].ctypes.data, out[r0].ctypes.data, 0, r1 - r0, n, im_ptr))

    if threads <= 1 or rows < 64:
        written = part(0, rows) if rows else 0
    else:
        from concurrent.futures import ThreadPoolExecutor

        bounds = np.linspace(0, rows, threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            written = sum(pool.map(lambda ab: part(*ab), zip(bounds[:-1], bounds[1:])))
    if written != out.nbytes:
        raise RuntimeError(f"ggml wrote {written} bytes, expected {out.nbytes}")
    return out
