"""The Format type and the one registry of formats: facts, exact bytes, shape fallbacks, reference quantizers.

Every size, budget and bits-per-weight figure in edgeq is computed here from the bytes a format really
writes (scales included), never from a nominal bit-width. Each format names the backends that can carry
it and gives a reference quantize/dequantize that matches its runtime bit for bit. The families register
themselves in the modules beside this one (ggml_types, int8, nbits, int4_groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgeq.core.errors import EdgeqError


@dataclass(frozen=True)
class Format:
    name: str
    block: tuple[int, int]              # (rows, cols) of one block; cols run along the input dimension
    block_bytes: int
    backends: frozenset[str]
    ggml_type: int | None = None        # the GGMLQuantizationType value, for formats GGUF carries
    takes_imatrix: bool = False         # whether ggml's quantizer uses an importance matrix for this type
    requires_imatrix: bool = False      # ... and is not written without one (llama.cpp refuses; the output head and
                                        # token table excepted)
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
    # Columns of the shortest row prefix that every array the format stores keeps in whole bytes (what a runtime can
    # slice without requantizing: MLP pruning); None: one block. Packed 4-bit zero points need two blocks.
    slice_cols: int | None = None
    # Whether the quantizer treats each block of a row on its own, so that quantizing the blocks one at a time (with
    # their slices of the importance matrix) gives the row's bytes. GPTQ's pricing then reads the compensated
    # weights' round trip off its block loop instead of quantizing them again (passes/gptq.py). False where a
    # block's bytes depend on the rest of its row (llama.cpp's q4_0/q4_1/q5_0/q5_1 scale their importance weights by
    # the row's mean square) and wherever that was not checked (tests/test_gptq.py checks every True).
    blockwise: bool = False

    @property
    def slice_step(self) -> int:
        return self.slice_cols or self.block[1]

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
        if self.requires_imatrix and imatrix is None:
            raise EdgeqError(None, f"format {self.name} is written from an importance matrix only, as llama.cpp's is")
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
