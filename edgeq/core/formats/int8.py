"""8-bit symmetric per output channel (a float32 scale per row): ONNX's int8 / int8_dyn (QDQ: activations
quantized per tensor too) and TVM's weight-only int8_wo."""

from __future__ import annotations

import numpy as np

from edgeq.core.formats.registry import Format, register


def int8_row_scales(w: np.ndarray) -> np.ndarray:
    """Symmetric per-output-channel scales: the largest magnitude of each row maps to 127."""
    amax = np.max(np.abs(w), axis=-1).astype(np.float32)
    return np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)


def int8_quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale per row); rounding half to even, like QuantizeLinear."""
    scale = int8_row_scales(w)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def activation_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """uint8 affine parameters for an activation range (static int8's input grid); 0 is exactly representable
    (padding, ReLU zeros)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    zp = np.uint8(np.clip(np.rint(-lo / float(scale)), 0, 255))
    return scale, zp


def fake_quantize_activation(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """x through QuantizeLinear and DequantizeLinear over [lo, hi] (round half to even, saturate), in float32."""
    scale, zp = activation_qparams(lo, hi)
    q = np.clip(np.rint(x / scale) + np.float32(zp), 0, 255)
    return ((q - np.float32(zp)) * scale).astype(np.float32)


def int8_dequantized_rows(w: np.ndarray) -> np.ndarray:
    """The float weights an int8 row-quantized tensor stands for."""
    q, scale = int8_quantize_rows(w)
    return q.astype(np.float32) * scale[:, None]


def _int8_quantize(fmt: Format, w: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    q, scale = int8_quantize_rows(w)
    return np.concatenate([q.view(np.uint8), scale.astype("<f4")[:, None].view(np.uint8)], axis=1)


def _int8_dequantize(fmt: Format, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """What DequantizeLinear computes: (q - 0) * scale, in float32."""
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cols + 4)
    q = data[:, :-4].view(np.int8).astype(np.float32)
    scale = np.ascontiguousarray(data[:, -4:]).view("<f4").reshape(-1)
    return (q * scale[:, None]).astype(np.float32).reshape(shape)


for _name, _static, _desc in (
    ("int8", True, "8-bit symmetric per output channel, f32 scale per row; activations per tensor, static ranges "
                   "calibrated on real inputs (QDQ)"),
    ("int8_dyn", False, "8-bit symmetric per output channel, f32 scale per row; activations per tensor, ranges "
                        "computed at run time (dynamic)"),
):
    # per row: the f32 scale (the zero point is 0: DequantizeLinear and MatMulInteger default to it)
    register(Format(name=_name, block=(1, 1), block_bytes=1, backends=frozenset({"onnx"}), description=_desc,
                    quantize_fn=_int8_quantize, dequantize_fn=_int8_dequantize, row_overhead_bytes=4,
                    channel_rows=True, quantizes_activations=True, static_activations=_static, grid=(8, 0, False)))


register(Format(name="int8_wo", block=(1, 1), block_bytes=1, backends=frozenset({"tvm"}),
                description="8-bit symmetric per output channel, f32 scale per row; weight-only (activations "
                            "float, dequantized inside the matmul)",
                quantize_fn=_int8_quantize, dequantize_fn=_int8_dequantize, row_overhead_bytes=4, channel_rows=True,
                grid=(8, 0, False)))


INT8_DOT_ZERO = 128     # x86 VNNI multiplies unsigned by signed bytes: activations shifted by this, taken off after


def int8_dyn_rows_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What an int8_dyn_rows linear computes for float input rows x (..., in) and float weights w (out, in):
    x quantized per row (scale max|x|/127, round half to even, int8), w per output row (int8_quantize_rows),
    exact int32 sums, then sum * x_scale * w_scale in float32. The TVM kernel (targets/tvm/dot.py) does the same."""
    q, w_scale = int8_quantize_rows(w)
    amax = np.max(np.abs(x), axis=-1).astype(np.float32)
    x_scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    xq = np.clip(np.rint(x / x_scale[..., None]), -127, 127).astype(np.int32)
    acc = (xq @ q.astype(np.int32).T).astype(np.float32)
    return (acc * x_scale[..., None] * w_scale).astype(np.float32)


register(Format(name="int8_dyn_rows", block=(16, 4), block_bytes=64, backends=frozenset({"tvm"}),
                description="8-bit symmetric per output channel, f32 scale per row; activations quantized per row "
                            "(per token) at run time, int32 sums on the CPU's dot-product instructions",
                quantize_fn=_int8_quantize, dequantize_fn=_int8_dequantize, row_overhead_bytes=8, channel_rows=True,
                quantizes_activations=True, grid=(8, 0, False)))
