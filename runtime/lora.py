"""LoRA factors read from an adapter file, checked against the weights a runtime takes them on, and combined for
the adapters a session applies.

ONNX and TVM bundles name the factors of weight W `W.lora_A`/`W.lora_B` (ONNX inputs) or `W.lora_a`/`W.lora_b`
(TVM parameters): A (in, r) and B (r, out), float32. A file from another bundle or base model is one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.runtime.manifest import BundleError


def checked_factors(path: Path, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]],
                    names: tuple[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{weight: (A, B)} from `arrays`, whose keys are `<weight>.lora_<names[0] or names[1]>`; `shapes`: weight ->
    (in, out) of the weights that take factors."""
    a_suffix, b_suffix = (f".lora_{n}" for n in names)
    for key in arrays:
        w, sep, part = key.rpartition(".lora_")
        if not sep or part not in names:
            raise BundleError(path, f"unexpected tensor {key!r} in a LoRA adapter file")
        if w not in shapes:
            raise BundleError(path, f"adapts {w}, which this model takes no LoRA factors for (made for another base "
                                    "model or bundle?)")
    out = {}
    for w in sorted({k.rpartition(".lora_")[0] for k in arrays}):
        a, b = arrays.get(w + a_suffix), arrays.get(w + b_suffix)
        n_in, n_out = shapes[w]
        if a is None or b is None or a.dtype != np.float32 or b.dtype != np.float32 or a.ndim != 2 or \
                b.ndim != 2 or a.shape[0] != n_in or b.shape[1] != n_out or a.shape[1] != b.shape[0]:
            raise BundleError(path, f"{w}: LoRA factors {getattr(a, 'shape', None)} and {getattr(b, 'shape', None)} "
                                    f"do not fit the weight ({n_out}, {n_in}) (made for another base model?)")
        out[w] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    return out


Factors = dict[str, tuple[np.ndarray, np.ndarray]]


def aligned_empty(shape: tuple[int, ...], dtype=np.float32, alignment: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `alignment`-byte boundary (TVM shares such
    memory through DLPack instead of copying it)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + alignment, np.uint8)
    start = (-buf.ctypes.data) % alignment
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def aligned_copy(arr: np.ndarray) -> np.ndarray:
    out = aligned_empty(arr.shape, arr.dtype)
    out[...] = arr
    return out


class LoraFactorStore:
    """The LoRA factors a runtime feeds for a choice of adapters, each adapter's bytes resident once.

    An adapter applied alone at scale 1 is fed its file's own arrays, kept for later switches. Several adapters
    (or one at another scale) are fed per weight their A side by side along the rank and their B·scale stacked
    likewise: that combination is a copy, so the adapters it holds are dropped from the store when it is built,
    and read again (`open_file` checks the file once more) when one is next chosen alone. Keeping both would hold
    every combined adapter twice (measured: the second adapter of a pair grew resident memory by 3x its file).
    """

    def __init__(self, read: Callable[[Path], Factors]):
        self._read = read
        self._held: dict[str, Factors] = {}

    def add(self, name: str, factors: Factors) -> None:
        """An adapter the runtime read itself (its first read, which told it the file holds LoRA factors)."""
        self._held[name] = factors

    def select(self, chosen: list[tuple[str, float]], open_file: Callable[[str], Path]) -> Factors:
        """{weight: (A, B)} for these adapters (name, scale); weights no chosen adapter changes are absent."""
        def factors(name: str) -> Factors:
            f = self._held.get(name)
            return f if f is not None else self._read(open_file(name))

        if len(chosen) == 1 and chosen[0][1] == 1.0:
            name = chosen[0][0]
            self._held[name] = factors(name)
            return self._held[name]
        parts = [(factors(n), np.float32(s)) for n, s in chosen]
        for n, _ in chosen:
            self._held.pop(n, None)       # their bytes live in the combination from now on
        out = {}
        for w in sorted({w for f, _ in parts for w in f}):
            ps = [(f[w], s) for f, s in parts if w in f]
            if len(ps) == 1:
                (a, b), s = ps[0]
                out[w] = (a, b if s == 1.0 else np.multiply(b, s, out=aligned_empty(b.shape)))
                continue
            rank = sum(a.shape[1] for (a, _), _ in ps)
            a_all = np.concatenate([a for (a, _), _ in ps], 1, out=aligned_empty((ps[0][0][0].shape[0], rank)))
            b_all = aligned_empty((rank, ps[0][0][1].shape[1]))
            row = 0
            for (_, b), s in ps:
                np.multiply(b, s, out=b_all[row:row + b.shape[0]])
                row += b.shape[0]
            out[w] = (a_all, b_all)
        return out
