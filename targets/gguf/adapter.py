"""Low-rank factors as a llama.cpp LoRA-adapter GGUF (the file `llama-cli --lora` reads): edgeq's low-rank error
branches, applied at load over the quantized model, and users' LoRA adapters kept apart from the base
(`--adapter-mode separate`), switched and scaled at run time.

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


COMPENSATION = "low-rank error compensation"


def lora_file(name: str) -> str:
    """The file of a user's adapter in a bundle."""
    return f"lora-{name}.gguf"


def _writer(graph: Graph, path: Path, title: str = COMPENSATION):
    from gguf import GGUFWriter

    w = GGUFWriter(path, arch="llama")
    w.add_string("general.type", "adapter")
    w.add_string("general.name", f"{graph.metadata.get('name') or 'model'} {title}")
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


def write_adapter(graph: Graph, branches: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
                  title: str = COMPENSATION, dtype=np.float16) -> int:
    """Write the factors {canonical weight name: (A (r, in), B (out, r))} as `dtype`; returns the file's bytes."""
    path = Path(path)
    w = _writer(graph, path, title)
    try:
        for name, t in graph.weights.items():         # graph order: byte-identical files
            if name not in branches:
                continue
            a, b = branches[name]
            heads = llama.qk_heads(graph.config, name)
            if heads is not None:
                b = llama.permute_for_gguf(b, heads)
            gname = t.alias or llama.gguf_name(name)
            w.add_tensor(f"{gname}.lora_a", np.ascontiguousarray(a, dtype=dtype))
            w.add_tensor(f"{gname}.lora_b", np.ascontiguousarray(b, dtype=dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return path.stat().st_size
