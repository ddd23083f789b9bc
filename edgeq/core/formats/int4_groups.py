"""TVM's int4_g32: 4-bit symmetric in groups of 32 along the input, an f16 scale per group, dequantized inside
the matmul kernel (activations stay float). The codes and scales are ggml's own Q4_0."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

import edgeq.core.formats.ggml as ggml
from edgeq.core.formats.registry import Format, register

INT4_GROUP = 32


def int4_quantize_groups(w: np.ndarray, group: int = INT4_GROUP,
                         imatrix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 (rows, cols/2): low nibble = even column, code 0..15 for value code - 8; f16 scale per group
    (rows, cols/group)).

    The codes and scales are ggml's own Q4_0 (the group's signed extreme maps to -8; with an importance
    matrix, its weighted scale search), repacked: a TVM int4 matrix holds exactly the weights a GGUF q4_0
    file holds, so the two runtimes compare on identical values. (An earlier -7..7 grid of our own lost a
    level and doubled SmolLM2's KLD.)
    """
    if group != 32:
        raise ValueError(f"int4 groups are Q4_0's 32 weights, not {group}")
    rows, cols = w.shape
    raw = ggml.quantize(int(GGMLQuantizationType.Q4_0), np.asarray(w, np.float32), imatrix)
    raw = raw.reshape(rows, cols // 32, 18)
    scale = np.ascontiguousarray(raw[..., :2]).view("<f2")[..., 0]
    qs = raw[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)    # element order
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scale)


def int4_dequantize_groups(packed: np.ndarray, scale: np.ndarray, group: int = INT4_GROUP) -> np.ndarray:
    rows = packed.shape[0]
    q = np.empty((rows, packed.shape[1] * 2), np.float32)
    q[:, 0::2] = (packed & 15).astype(np.float32) - 8
    q[:, 1::2] = (packed >> 4).astype(np.float32) - 8
    s = np.repeat(scale.astype(np.float32), group, axis=1)
    return q * s


def _int4_quantize(fmt: Format, w: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    packed, scale = int4_quantize_groups(w, fmt.block[1], imatrix if fmt.takes_imatrix else None)
    return np.concatenate([packed, scale.astype("<f2").view(np.uint8)], axis=1)


def _int4_dequantize(fmt: Format, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    cols = fmt._cols(shape)
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cols // 2 + 2 * (cols // fmt.block[1]))
    packed = data[:, :cols // 2]
    scale = np.ascontiguousarray(data[:, cols // 2:]).view("<f2")
    return int4_dequantize_groups(packed, scale, fmt.block[1]).reshape(shape)


register(Format(name="int4_g32", block=(1, INT4_GROUP), block_bytes=INT4_GROUP // 2 + 2, backends=frozenset({"tvm"}),
                description="4-bit symmetric in groups of 32 along the input, f16 scale per group (ggml's Q4_0 "
                            "codes and scales; an importance matrix weights its scale search); weight-only, "
                            "dequantized inside the matmul",
                quantize_fn=_int4_quantize, dequantize_fn=_int4_dequantize, channel_rows=True, takes_imatrix=True,
                grid=(4, INT4_GROUP, False)))
