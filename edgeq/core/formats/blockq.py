"""Block-wise weight quantization as onnxruntime's MatMulNBits and GatherBlockQuantized store it.

Each row (output channel) is cut into blocks of `block` inputs; a block keeps
one float32 scale and, for the asymmetric form, one unsigned zero point of
`bits` bits (packed two per byte for 4 bits, a row's zero points padded to a
whole byte). Values are unsigned: 4-bit codes are packed two per byte, the
lower-index element in the low nibble. The kernel computes (q - zp) * scale;
without stored zero points zp is 2^(bits-1) (8 for 4 bits, 128 for 8 bits).

The symmetric 4-bit grid is ggml's Q4_0 (scale = the block's signed
extreme / -8, so the largest magnitude lands on -8 exactly), with a float32
instead of a float16 scale; the 8-bit one is Q8_0's (scale = amax / 127).
With an importance matrix, symmetric 4-bit blocks of 32 are ggml's own Q4_0
quantization (its weighted scale search, llama-quantize --imatrix), repacked:
the same weights a GGUF q4_0 file holds, so the two runtimes compare on
identical values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

import edgeq.core.formats.ggml as ggml


@dataclass(frozen=True)
class BlockQ:
    """The arrays one quantized matrix (rows, cols) is stored as."""

    data: np.ndarray                 # (rows, n_blocks, block * bits / 8) uint8
    scales: np.ndarray               # (rows, n_blocks) float32
    zero_points: np.ndarray | None   # (rows, ceil(n_blocks * bits / 8)) uint8, asymmetric only


def zero_point_bytes(n_blocks: int, bits: int) -> int:
    return (n_blocks * bits + 7) // 8


def nbytes(rows: int, cols: int, bits: int, block: int, asym: bool) -> int:
    nb = cols // block
    return rows * (nb * block * bits // 8 + 4 * nb + (zero_point_bytes(nb, bits) if asym else 0))


def takes_imatrix(bits: int, block: int, asym: bool) -> bool:
    return (bits, block, asym) == (4, 32, False)


def quantize(w: np.ndarray, bits: int, block: int, asym: bool, imatrix: np.ndarray | None = None) -> BlockQ:
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"{cols} columns are not a multiple of the block size {block}")
    if imatrix is not None and takes_imatrix(bits, block, asym):
        return _from_q4_0(w, imatrix)
    nb = cols // block
    x = w.reshape(rows, nb, block)
    qmax = (1 << bits) - 1
    mid = 1 << (bits - 1)
    if asym:
        lo = np.minimum(x.min(-1), 0.0)
        hi = np.maximum(x.max(-1), 0.0)
        scale = ((hi - lo) / np.float32(qmax)).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        zp = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.int32)
    else:
        if bits == 4:   # Q4_0: the signed extreme maps to -8
            idx = np.argmax(np.abs(x), axis=-1)
            ext = np.take_along_axis(x, idx[..., None], -1)[..., 0]
            scale = (ext / np.float32(-mid)).astype(np.float32)
        else:           # Q8_0: amax maps to 127
            scale = (np.abs(x).max(-1) / np.float32(mid - 1)).astype(np.float32)
        scale = np.where(scale != 0, scale, np.float32(1.0)).astype(np.float32)
        zp = np.full(scale.shape, mid, np.int32)
    q = np.clip(np.rint(x / scale[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    data = _pack(q, bits)
    zps = None
    if asym:
        zps = _pack(zp.astype(np.uint8), bits)
        pad = zero_point_bytes(nb, bits) - zps.shape[-1]
        if pad:
            zps = np.concatenate([zps, np.zeros((rows, pad), np.uint8)], -1)
    return BlockQ(np.ascontiguousarray(data), np.ascontiguousarray(scale), zps)


def _from_q4_0(w: np.ndarray, imatrix: np.ndarray) -> BlockQ:
    """ggml's Q4_0 blocks (f16 scale, 16 bytes: element j in the low nibble of byte j, j+16 in its high nibble),
    repacked in MatMulNBits' order (consecutive elements share a byte), scales widened to f32 exactly."""
    rows, cols = w.shape
    raw = ggml.quantize(int(GGMLQuantizationType.Q4_0), w, imatrix).reshape(rows, cols // 32, 18)
    scales = np.ascontiguousarray(raw[..., :2]).view("<f2")[..., 0].astype(np.float32)
    qs = raw[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)          # (rows, blocks, 32) in element order
    return BlockQ(np.ascontiguousarray(_pack(codes.astype(np.uint8), 4)), np.ascontiguousarray(scales), None)


def dequantize(b: BlockQ, bits: int, block: int, cols: int) -> np.ndarray:
    """What the kernels compute: (q - zp) * scale, float32, shape (rows, cols)."""
    rows, nb = b.scales.shape
    q = _unpack(b.data.reshape(rows, nb, -1), bits, block).astype(np.float32)
    if b.zero_points is None:
        zp = np.full((rows, nb), 1 << (bits - 1), np.float32)
    else:
        zp = _unpack(b.zero_points, bits, -1)[:, :nb].astype(np.float32)
    return ((q - zp[..., None]) * b.scales[..., None]).astype(np.float32).reshape(rows, cols)


def to_bytes(b: BlockQ) -> np.ndarray:
    """One row of bytes per output channel: codes, scales (little-endian f32), zero points."""
    rows = b.scales.shape[0]
    parts = [b.data.reshape(rows, -1), b.scales.astype("<f4").view(np.uint8).reshape(rows, -1)]
    if b.zero_points is not None:
        parts.append(b.zero_points)
    return np.concatenate(parts, axis=1)


def from_bytes(raw: np.ndarray, bits: int, block: int, cols: int, asym: bool) -> BlockQ:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    nb = cols // block
    nd = nb * block * bits // 8
    data = raw[:, :nd].reshape(rows, nb, -1)
    scales = np.ascontiguousarray(raw[:, nd:nd + 4 * nb]).view("<f4").reshape(rows, nb).astype(np.float32)
    zps = np.ascontiguousarray(raw[:, nd + 4 * nb:]) if asym else None
    return BlockQ(data, scales, zps)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], -1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _unpack(p: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return p
    out = np.stack([p & 0x0F, p >> 4], -1).reshape(p.shape[:-1] + (-1,))
    return out if n < 0 else out[..., :n]
