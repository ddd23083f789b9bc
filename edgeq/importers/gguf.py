"""Import a llama-architecture GGUF file into the IR.

Tensors stay memory-mapped and are dequantized only when a pass or the
executor asks for them; llama.cpp's Q/K row permutation is undone so the IR
holds the canonical (Hugging Face) layout whatever the source.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph, Tensor
from edgeq.importers.gguf_metadata import open_gguf, read_metadata
from edgeq.models import llama


def _loader(reader_tensor, shape: tuple[int, ...], n_heads: int | None):
    from gguf.quants import dequantize

    def load() -> np.ndarray:
        arr = dequantize(reader_tensor.data, reader_tensor.tensor_type).astype(np.float32, copy=False)
        arr = arr.reshape(shape)
        if n_heads is not None:
            arr = llama.unpermute_from_gguf(arr, n_heads)
        return arr

    return load


def _raw(reader_tensor):
    """The tensor's bytes exactly as the file stores them (GGUF layout, Q/K rows still permuted)."""
    return lambda: np.ascontiguousarray(reader_tensor.data).view(np.uint8).reshape(-1)


def import_gguf(path: str | os.PathLike) -> Graph:
    path = Path(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = llama.config_from_gguf(meta, names, path)
    expected = llama.expected_shapes(cfg)
    weights: dict[str, Tensor] = {}
    for t in reader.tensors:
        canonical = llama.hf_name(t.name)
        if canonical is None:
            raise EdgeqError(path, f"unknown tensor {t.name} for the llama architecture")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        want = expected.get(canonical)
        if canonical == "rope_freqs.weight":
            want = (cfg.head_dim // 2,)
        if want is None:
            raise EdgeqError(path, f"tensor {t.name} is not expected for this config")
        if shape != want:
            raise EdgeqError(path, f"tensor {t.name} has shape {shape}, the metadata implies {want}")
        weights[canonical] = Tensor(
            name=canonical,
            shape=shape,
            load=_loader(t, shape, llama.qk_heads(cfg, canonical)),
            alias=t.name,
            source_format=t.tensor_type.name.lower(),
            source_bytes=_raw(t),
        )
    missing = [n for n in expected if n not in weights]
    if missing:
        raise EdgeqError(path, f"missing tensor {llama.gguf_name(missing[0])} ({len(missing)} missing)")
    metadata = {
        "source_path": str(path),
        "gguf": {k: v for k, v in meta.items()},
        "name": meta.get("general.name") or path.stem,
        "license": meta.get("general.license"),
    }
    return llama.build_graph(cfg, weights, metadata)
