"""Block-wise weight-only formats as onnxruntime's MatMulNBits / GatherBlockQuantized store them (blockq.py).

int4 (symmetric, blocks of 32), int4_b64, int4_b128, int4_asym (uint4 zero points), int4_asym_b64,
int4_asym_b128, and int8_b32 (Q8_0's grid, for the tables a 4-bit preset keeps at 8 bits).
"""

from __future__ import annotations

import functools

import numpy as np

import edgeq.core.formats.blockq as blockq
from edgeq.core.formats.registry import Format, register


def _nbits_quantize(fmt: Format, w: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    bits, block, asym = NBITS[fmt.name]
    return blockq.to_bytes(blockq.quantize(w, bits, block, asym, imatrix if fmt.takes_imatrix else None))


def _nbits_dequantize(fmt: Format, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    bits, block, asym = NBITS[fmt.name]
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, fmt.nbytes((1, shape[-1])))
    return blockq.dequantize(blockq.from_bytes(raw, bits, block, shape[-1], asym), bits, block,
                             shape[-1]).reshape(shape)


NBITS: dict[str, tuple[int, int, bool]] = {}    # format name -> (bits, block, asymmetric)
for _bits, _block, _asym in ((4, 32, False), (4, 64, False), (4, 128, False), (4, 32, True), (4, 64, True),
                             (4, 128, True), (8, 32, False)):
    _name = f"int{_bits}" + ("_asym" if _asym else "") + ("" if (_bits, _block) == (4, 32) else f"_b{_block}")
    NBITS[_name] = (_bits, _block, _asym)
    register(Format(
        name=_name, block=(1, _block), block_bytes=_block * _bits // 8 + 4, backends=frozenset({"onnx"}),
        takes_imatrix=blockq.takes_imatrix(_bits, _block, _asym),
        description=(f"{_bits}-bit weight-only, blocks of {_block}, f32 scale per block"
                     + (", uint4 zero point per block (packed)" if _asym else ", symmetric")
                     + " (MatMulNBits; activations stay float)"),
        quantize_fn=_nbits_quantize, dequantize_fn=_nbits_dequantize,
        row_bytes_fn=functools.partial(lambda cols, b, k, a: blockq.nbytes(1, cols, b, k, a), b=_bits, k=_block,
                                       a=_asym),
        grid=(_bits, _block, _asym),
        slice_cols=_block * 8 // _bits if _asym and _bits < 8 else None,
    ))
