"""TVM's int8_g32: llama.cpp's q8_0 — 8-bit symmetric in blocks of 32 along the input, an f16 scale per block —
with the layer's input quantized the same way at run time (q8_0 x q8_0: int32 sums per block, scaled into f32).

The codes and scales are ggml's own Q8_0, so a TVM int8 matrix holds exactly the weights of a GGUF q8_0 file. On
CPUs with integer dot products (x86 AVX-512 VNNI, arm64 `sdot`) each call quantizes its input rows per block of 32
(scale max|x|/127, half to even) and sums in integers (targets/tvm/int8_vnni.py); elsewhere the kernel reads the
weights as code x scale with f32 activations. Per-output-channel weight scales with run-time int8 activations
measured SmolLM2 KLD 0.0074 against q8_0's 0.0039 (stop 33): the block scales are what buys q8_0's fidelity.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

import edgeq.core.formats.ggml as ggml
from edgeq.core.formats.registry import Format, register

INT8_GROUP = 32
Q8_0 = int(GGMLQuantizationType.Q8_0)


def int8_quantize_groups(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes (rows, cols), f16 scale per block (rows, cols/32)): ggml's Q8_0 bytes, split."""
    rows, cols = w.shape
    if cols % INT8_GROUP:
        raise ValueError(f"{cols} columns are not whole blocks of {INT8_GROUP}")
    raw = ggml.quantize(Q8_0, np.asarray(w, np.float32)).reshape(rows, cols // INT8_GROUP, 2 + INT8_GROUP)
    scale = np.ascontiguousarray(raw[..., :2]).view("<f2")[..., 0]
    codes = np.ascontiguousarray(raw[..., 2:]).view(np.int8).reshape(rows, cols)
    return codes, np.ascontiguousarray(scale)


def int8_dequantize_groups(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float32) * np.repeat(scale.astype(np.float32), INT8_GROUP, axis=1)).astype(np.float32)


def int8_groups_act(x: np.ndarray) -> np.ndarray:
    """Input rows (..., in) as the integer kernels see them: each block of 32 quantized to int8 (scale max|x|/127,
    1 where the block is zero; half to even), returned dequantized in f32 (its products with the codes are exact in
    the int32 sums, so (this x codes) then the two scales is the kernel's arithmetic up to float summation order)."""
    g = x.reshape(*x.shape[:-1], -1, INT8_GROUP).astype(np.float32)
    amax = np.max(np.abs(g), axis=-1, keepdims=True)
    s = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    return (np.clip(np.rint(g / s), -127, 127) * s).astype(np.float32).reshape(x.shape)


def _quantize(fmt: Format, w: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    return ggml.quantize(Q8_0, np.asarray(w, np.float32))


def _dequantize(fmt: Format, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return ggml.dequantize(Q8_0, data, int(np.prod(shape))).reshape(shape)


# quantizes_activations: its integer kernels quantize each input block at run time, so the weights' round trip
# alone does not describe its error and budgeted plans do not take it as a candidate
register(Format(name="int8_g32", block=(1, INT8_GROUP), block_bytes=INT8_GROUP + 2, backends=frozenset({"tvm"}),
                description="8-bit symmetric in blocks of 32 along the input, f16 scale per block (ggml's Q8_0 codes "
                            "and scales); activations quantized the same way per call on integer dot-product "
                            "kernels (q8_0 x q8_0)",
                quantize_fn=_quantize, dequantize_fn=_dequantize, channel_rows=True, quantizes_activations=True,
                grid=(8, INT8_GROUP, False)))
