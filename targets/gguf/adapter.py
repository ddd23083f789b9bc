"""Low-rank error branches as a llama.cpp LoRA-adapter GGUF, applied by llama.cpp at load over the quantized model.

Format (llama.cpp's adapter loader): general.type = adapter, adapter.type = lora,
adapter.lora.alpha, and per compensated weight `<gguf name>.lora_a` (ggml shape
[in, r]) and `.lora_b` ([r, out]); llama.cpp adds scale·B·(A·x) to the quantized
product, with scale = alpha / r, or 1 when alpha is 0. Ranks differ per tensor
and one alpha serves them all, so alpha is 0 and the branches are stored
unscaled. Q and K branches take llama.cpp's RoPE row order on their output
side, like the weights they correct.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from edgeq.core.ir import Graph
from edgeq.models import llama
from edgeq.targets.gguf.writer import ALIGNMENT

ADAPTER_FILE = "adapter.gguf"


def _writer(graph: Graph, path: Path):
    from gguf import GGUFWriter

    w = GGUFWriter(path, arch="llama")
    w.add_string("general.type", "adapter")
    w.add_string("general.name", f"{graph.metadata.get('name') or 'model'} low-rank error compensation")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 0.0)
    return w


def adapter_overhead(graph: Graph) -> int:
    """Bytes of an adapter file besides its tensors' infos and data, rounded up (the final padding ≤ 31 bytes).

    With lowrank_compensate.branch_bytes per branch this bounds the file size from above.
    """
    with tempfile.TemporaryDirectory(prefix="edgeq-adapter-") as d:
        w = _writer(graph, Path(d) / "a.gguf")
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            size = w.fout[0].tell()
        finally:
            w.close()
    return size + ALIGNMENT - 1


def write_adapter(graph: Graph, branches: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike) -> int:
    """Write the branches {canonical weight name: (A (r, in), B (out, r)) float16}; returns the file's bytes."""
    path = Path(path)
    w = _writer(graph, path)
    try:
        for name, t in graph.weights.items():         # graph order: byte-identical files
            if name not in branches:
                continue
            a, b = branches[name]
            heads = llama.qk_heads(graph.config, name)
            if heads is not None:
                b = llama.permute_for_gguf(b, heads)
            gname = t.alias or llama.gguf_name(name)
            w.add_tensor(f"{gname}.lora_a", np.ascontiguousarray(a, dtype=np.float16))
            w.add_tensor(f"{gname}.lora_b", np.ascontiguousarray(b, dtype=np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return path.stat().st_size
