"""LoRA factors read from an adapter file, checked against the weights a runtime takes them on.

ONNX and TVM bundles name the factors of weight W `W.lora_A`/`W.lora_B` (ONNX inputs) or `W.lora_a`/`W.lora_b`
(TVM parameters): A (in, r) and B (r, out), float32. A file from another bundle or base model is one line.
"""

from __future__ import annotations

from pathlib import Path

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
