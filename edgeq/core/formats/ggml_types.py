"""GGUF's ggml types: llama.cpp quantizes and dequantizes them (ggml.py, its own code).

Their facts (block sizes and bytes) come from gguf-py's table; their shape fallbacks are llama.cpp's.
f32 and f16 are written the same way (little-endian IEEE) by every backend, so they carry all three.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

import edgeq.core.formats.ggml as ggml
from edgeq.core.formats.registry import Format, register


def _ggml_quantize(fmt: Format, w: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    if fmt.name == "f32":
        return np.ascontiguousarray(w, dtype="<f4").view(np.uint8).reshape(w.shape[0], -1)
    return ggml.quantize(fmt.ggml_type, w, imatrix if fmt.takes_imatrix else None)


def _ggml_dequantize(fmt: Format, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if data.size != fmt.nbytes(tuple(shape)):
        raise ValueError(f"{fmt.name}: {data.size} bytes do not hold shape {tuple(shape)}")
    if fmt.name == "f32":
        return np.ascontiguousarray(data, dtype=np.uint8).reshape(-1).view("<f4").astype(np.float32).reshape(shape)
    return ggml.dequantize(fmt.ggml_type, data, int(np.prod(shape))).reshape(shape)


def _register_gguf_types() -> None:
    described = {
        "f32": (T.F32, False, "32-bit float"),
        "f16": (T.F16, False, "16-bit float"),
        "bf16": (T.BF16, False, "bfloat16"),
        "q8_0": (T.Q8_0, False, "8-bit, blocks of 32, f16 scale"),
        "q5_0": (T.Q5_0, True, "5-bit symmetric, blocks of 32"),
        "q5_1": (T.Q5_1, True, "5-bit with offset, blocks of 32"),
        "q4_0": (T.Q4_0, True, "4-bit symmetric, blocks of 32"),
        "q4_1": (T.Q4_1, True, "4-bit with offset, blocks of 32"),
        "q6_k": (T.Q6_K, True, "6-bit k-quant, super-blocks of 256"),
        "q5_k": (T.Q5_K, True, "5-bit k-quant, super-blocks of 256"),
        "q4_k": (T.Q4_K, True, "4-bit k-quant, super-blocks of 256"),
        "q3_k": (T.Q3_K, True, "3-bit k-quant, super-blocks of 256"),
        "q2_k": (T.Q2_K, True, "2-bit k-quant, super-blocks of 256"),
        # i-quants: non-uniform grids (lattice codebooks below 4 bits), ggml's own search, imatrix-weighted
        "iq4_nl": (T.IQ4_NL, True, "4-bit non-linear grid, blocks of 32, f16 scale"),
        "iq4_xs": (T.IQ4_XS, True, "4-bit non-linear grid, super-blocks of 256 with 6-bit sub-block scales"),
        "iq3_s": (T.IQ3_S, True, "3.4-bit lattice codebook, super-blocks of 256"),
        "iq3_xxs": (T.IQ3_XXS, True, "3.06-bit lattice codebook, super-blocks of 256"),
        "iq2_s": (T.IQ2_S, True, "2.5-bit lattice codebook, super-blocks of 256"),
        "iq2_xs": (T.IQ2_XS, True, "2.3-bit lattice codebook, super-blocks of 256"),
        "iq2_xxs": (T.IQ2_XXS, True, "2.06-bit lattice codebook, super-blocks of 256"),
        "iq1_m": (T.IQ1_M, True, "1.75-bit ternary-lattice codebook, super-blocks of 256"),
        "iq1_s": (T.IQ1_S, True, "1.56-bit ternary-lattice codebook, super-blocks of 256"),
    }
    # llama-quant.cpp's tensor_requires_imatrix: written only from an importance matrix
    requires = {"iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"}
    # llama.cpp's tensor_type_fallback: a 256-block type becomes a 32-block type (the i-quants iq4_nl), and a
    # 32-block type that still does not fit becomes f16.
    fallback = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0",
                **dict.fromkeys(("iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"), "iq4_nl"),
                **dict.fromkeys(("q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "iq4_nl"), "f16")}
    # K-types: the sub-block that carries a (quantized) scale; q4_k/q5_k sub-blocks have a min too
    grid = {"q8_0": (8, 32, False), "q6_k": (6, 16, False), "q5_k": (5, 32, True), "q5_1": (5, 32, True),
            "q5_0": (5, 32, False), "q4_k": (4, 32, True), "q4_1": (4, 32, True), "q4_0": (4, 32, False),
            "q3_k": (3, 16, False), "q2_k": (2, 16, True),
            # i-quants are non-uniform: a uniform grid of their payload bits is only a stand-in
            "iq4_nl": (4, 32, False), "iq4_xs": (4, 32, False), "iq3_s": (3, 32, False), "iq3_xxs": (3, 32, False),
            "iq2_s": (2, 32, False), "iq2_xs": (2, 16, False), "iq2_xxs": (2, 32, False), "iq1_m": (1, 16, False),
            "iq1_s": (1, 32, False)}
    # llama.cpp's imatrix quantizers of these weight a block by the whole row's mean square (quantize_row_q4_0_impl
    # and its siblings); every other quantizing type's block bytes depend on the block alone
    row_scaled = {"q4_0", "q4_1", "q5_0", "q5_1"}
    for name, (t, imat, desc) in described.items():
        block, size = GGML_QUANT_SIZES[t]
        # Plain floats are written the same way (little-endian IEEE) by every backend.
        backends = {"gguf", "onnx", "tvm"} if name in ("f32", "f16") else {"gguf"}
        register(Format(
            name=name, block=(1, block), block_bytes=size, backends=frozenset(backends), ggml_type=int(t),
            takes_imatrix=imat, description=desc, quantize_fn=_ggml_quantize, dequantize_fn=_ggml_dequantize,
            fallback=fallback.get(name), grid=grid.get(name), requires_imatrix=name in requires,
            blockwise=block > 1 and name not in row_scaled,
        ))


_register_gguf_types()
