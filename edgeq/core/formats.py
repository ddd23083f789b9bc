"""The registry of quantization formats.

Every size, budget and bits-per-weight figure in edgeq is computed here from
the bytes a format really writes (scales included), never from a nominal
bit-width. Each format names the backends that can carry it and gives a
reference quantize/dequantize that matches its runtime bit for bit: for GGUF
types that is ggml's own code (`edgeq.core.ggml`) and gguf-py's dequantizer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgeq.core import blockq
from edgeq.core.errors import EdgeqError


@dataclass(frozen=True)
class Format:
    name: str
    block: tuple[int, int]              # (rows, cols) of one block; cols run along the input dimension
    block_bytes: int
    backends: frozenset[str]
    ggml_type: int | None = None        # the GGMLQuantizationType value, for formats GGUF carries
    takes_imatrix: bool = False         # whether ggml's quantizer uses an importance matrix for this type
    description: str = ""
    quantize_fn: Callable[["Format", np.ndarray, np.ndarray | None], np.ndarray] | None = None
    dequantize_fn: Callable[["Format", np.ndarray, tuple[int, ...]], np.ndarray] | None = None
    # Formats whose overhead is per row (a scale per output channel) rather than per block.
    row_overhead_bytes: int = 0
    # Rows are output channels (axis 0), whatever the rank: a conv weight (out, in, kh, kw) has `out` scales
    # and in*kh*kw columns (the axis a TVM int4 group runs along).
    channel_rows: bool = False
    # Formats whose row size is not a whole number of blocks plus a constant (packed zero points).
    row_bytes_fn: Callable[[int], int] | None = None
    # Formats whose runtime also quantizes the layer's input per tensor (ONNX int8 / int8_dyn): the weight
    # round trip alone does not describe their error, so budgeted plans do not take them as candidates.
    quantizes_activations: bool = False
    # ... with one range per tensor calibrated ahead and kept in the plan (static INT8), not computed per call.
    static_activations: bool = False
    # The format written instead when a row cannot hold whole blocks (llama.cpp's tensor_type_fallback for ggml
    # types: a K-type's 32-block sibling, then f16); None: a plan asking for it on such a shape is an error.
    fallback: str | None = None
    # The quantization grid: (bits per code, weights per scale (0: one scale per output row), whether codes have
    # an offset). What a differentiable stand-in of the quantizer needs (DynaQuant); None for plain floats.
    grid: tuple[int, int, bool] | None = None

    def _rows(self, shape: tuple[int, ...]) -> int:
        if len(shape) < 2:
            return 1
        return int(shape[0]) if self.channel_rows else int(np.prod(shape[:-1]))

    def _cols(self, shape: tuple[int, ...]) -> int:
        if self.channel_rows and len(shape) > 1:
            return int(np.prod(shape[1:]))
        return int(shape[-1]) if shape else 1

    @property
    def bits_per_weight(self) -> float:
        if self.row_bytes_fn is not None:   # two blocks: packed zero points fill whole bytes
            return 8.0 * self.row_bytes_fn(2 * self.block[1]) / (2 * self.block[1])
        return 8.0 * self.block_bytes / (self.block[0] * self.block[1])

    def can_carry(self, shape: tuple[int, ...]) -> bool:
        return self._cols(shape) % self.block[1] == 0 and self._rows(shape) % self.block[0] == 0

    def nbytes(self, shape: tuple[int, ...]) -> int:
        if not self.can_carry(shape):
            raise ValueError(f"format {self.name} cannot carry shape {shape} (block {self.block})")
        rows = self._rows(shape)
        if self.row_bytes_fn is not None:
            return rows * self.row_bytes_fn(int(shape[-1]))
        return int(np.prod(shape)) // (self.block[0] * self.block[1]) * self.block_bytes + rows * self.row_overhead_bytes

    def quantize(self, w: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """Float weights (rows, cols) -> the exact bytes the backend stores, shape (rows, row_bytes)."""
        if self.quantize_fn is None:
            raise NotImplementedError(f"format {self.name} has no reference quantizer")
        w = np.asarray(w, dtype=np.float32)
        w2 = w.reshape(self._rows(w.shape), -1) if w.ndim > 1 else w.reshape(1, -1)
        return self.quantize_fn(self, w2, imatrix)

    def dequantize(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.dequantize_fn is None:
            raise NotImplementedError(f"format {self.name} has no reference dequantizer")
        return self.dequantize_fn(self, data, shape)

    def roundtrip(self, w: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """What the runtime will compute with: dequantize(quantize(w))."""
        return self.dequantize(self.quantize(w, imatrix), tuple(w.shape))


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name} registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str, path=None) -> Format:
    fmt = FORMATS.get(name.lower())
    if fmt is None:
        raise EdgeqError(path, f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    return fmt


def formats_for(backend: str) -> list[Format]:
    return [f for f in FORMATS.values() if backend in f.backends]


def candidate_formats(backend: str, names: list[str] | None = None, path=None) -> list[Format]:
    """The formats a budgeted plan of `backend` chooses among (those with a reference quantizer), or the named
    subset.

    Formats that also quantize activations (ONNX int8 / int8_dyn: one range per tensor) are not candidates:
    the sensitivity pass measures the weights' error alone, and on a decoder the activation error dominates
    (SmolLM2's down_proj inputs: KLD 0.84, targets/onnx/presets.py)."""
    if names:
        out = []
        for n in names:
            f = get_format(n.strip(), path)
            if backend not in f.backends:
                raise EdgeqError(path, f"format {f.name} is not carried by backend {backend}")
            if f.quantizes_activations:
                raise EdgeqError(path, f"format {f.name} quantizes activations too; a budgeted plan chooses among "
                                       "weight formats (their error is what the sensitivity pass measures)")
            if f not in out:
                out.append(f)
        return out
    return [f for f in FORMATS.values() if backend in f.backends and f.quantize_fn is not None
            and not f.quantizes_activations]


def shape_fallback(name: str, cols: int) -> tuple[str, str | None]:
    """(the format written for rows of `cols` elements when `name` was asked for, why; None when it fits).

    A quantized row must hold whole blocks. llama.cpp demotes a type that does not fit silently, so plans and
    size estimates follow the same chain of `fallback`s (e.g. q4_k -> q5_0 -> f16) and say so."""
    fmt = get_format(name)
    block = fmt.block[1]
    if cols % block == 0:
        return fmt.name, None
    if fmt.fallback is None:
        raise EdgeqError(None, f"format {fmt.name} does not fit rows of {cols} and has no fallback")
    why = f"row length {cols} is not a multiple of the {fmt.name} block ({block})"
    to = get_format(fmt.fallback)
    while cols % to.block[1]:
        why = f"{why} nor of the {to.name} block ({to.block[1]})"
        if to.fallback is None:
            raise EdgeqError(None, f"format {fmt.name} does not fit rows of {cols}, nor does any fallback")
        to = get_format(to.fallback)
    return to.name, f"{why} -> {to.name}"


# --- GGUF (ggml) types --------------------------------------------------------

def _ggml_quantize(fmt: Format, w: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    if fmt.name == "f32":
        return np.ascontiguousarray(w, dtype="<f4").view(np.uint8).reshape(w.shape[0], -1)
    from edgeq.core import ggml

    return ggml.quantize(fmt.ggml_type, w, imatrix if fmt.takes_imatrix else None)


def _ggml_dequantize(fmt: Format, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    arr = dequantize(flat.reshape(rows, -1), GGMLQuantizationType(fmt.ggml_type))
    return np.asarray(arr, dtype=np.float32).reshape(shape)


def _register_gguf_types() -> None:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

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
    }
    # llama.cpp's tensor_type_fallback: a K-type (256-blocks) becomes a 32-block type, and a 32-block type that
    # still does not fit becomes f16. (Its IQ types fall back to iq4_nl; register them with that fallback.)
    fallback = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0",
                **dict.fromkeys(("q8_0", "q5_0", "q5_1", "q4_0", "q4_1"), "f16")}
    # K-types: the sub-block that carries a (quantized) scale; q4_k/q5_k sub-blocks have a min too
    grid = {"q8_0": (8, 32, False), "q6_k": (6, 16, False), "q5_k": (5, 32, True), "q5_1": (5, 32, True),
            "q5_0": (5, 32, False), "q4_k": (4, 32, True), "q4_1": (4, 32, True), "q4_0": (4, 32, False),
            "q3_k": (3, 16, False), "q2_k": (2, 16, True)}
    for name, (t, imat, desc) in described.items():
        block, size = GGML_QUANT_SIZES[t]
        # Plain floats are written the same way (little-endian IEEE) by every backend.
        backends = {"gguf", "onnx", "tvm"} if name in ("f32", "f16") else {"gguf"}
        register(Format(
            name=name, block=(1, block), block_bytes=size, backends=frozenset(backends), ggml_type=int(t),
            takes_imatrix=imat, description=desc, quantize_fn=_ggml_quantize, dequantize_fn=_ggml_dequantize,
            fallback=fallback.get(name), grid=grid.get(name),
        ))


_register_gguf_types()


# --- ONNX (onnxruntime) formats -------------------------------------------------

def int8_row_scales(w: np.ndarray) -> np.ndarray:
    """Symmetric per-output-channel scales: the largest magnitude of each row maps to 127."""
    amax = np.max(np.abs(w), axis=-1).astype(np.float32)
    return np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)


def int8_quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale per row); rounding half to even, like QuantizeLinear."""
    scale = int8_row_scales(w)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


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


# --- block-wise weight-only formats (onnxruntime's MatMulNBits / GatherBlockQuantized) ---------------
# int4 (symmetric, blocks of 32), int4_b64, int4_b128, int4_asym (uint4 zero points), int4_asym_b64,
# int4_asym_b128, and int8_b32 (Q8_0's grid, for the tables a 4-bit preset keeps at 8 bits).

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
    ))


# --- TVM (weight-only) formats ---------------------------------------------------
# The weights are stored quantized and dequantized inside the matmul kernel; activations stay float.

register(Format(name="int8_wo", block=(1, 1), block_bytes=1, backends=frozenset({"tvm"}),
                description="8-bit symmetric per output channel, f32 scale per row; weight-only (activations "
                            "float, dequantized inside the matmul)",
                quantize_fn=_int8_quantize, dequantize_fn=_int8_dequantize, row_overhead_bytes=4, channel_rows=True,
                grid=(8, 0, False)))

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
    from gguf import GGMLQuantizationType

    from edgeq.core import ggml

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
