"""The GGUF size model for budgeted plans: a fixed header plus each tensor's 32-byte-aligned data.

The header (metadata, tokenizer, tensor infos) does not depend on the formats
chosen (every field is fixed-width), 1-D tensors stay f32, and low-rank
branches go to the adapter GGUF, whose own header is spent once when any
branch is chosen. Every figure is exact except the adapter's final padding.
"""

from __future__ import annotations

from typing import Any

from edgeq.core.formats import Format, get_format
from edgeq.core.ir import Graph
from edgeq.core.layout import FileLayout
from edgeq.models import llama
from edgeq.targets.gguf.adapter import adapter_overhead
from edgeq.targets.gguf.writer import layout_overhead, padded


def branch_bytes(gguf_name: str, shape: tuple[int, int], rank: int) -> int:
    """Bytes a rank-`rank` F16 branch of a (out, in) weight adds to the adapter GGUF: data and tensor infos."""
    out_dim, in_dim = shape
    info = sum(8 + len(f"{gguf_name}.{ab}".encode()) + 4 + 2 * 8 + 4 + 8 for ab in ("lora_a", "lora_b"))
    return padded(2 * rank * in_dim) + padded(2 * out_dim * rank) + info


def gguf_layout(graph: Graph, tokenizer: dict[str, Any], with_branches: bool = False) -> FileLayout:
    f32 = get_format("f32")
    overhead = layout_overhead(graph, tokenizer) + sum(padded(f32.nbytes(t.shape)) for t in graph.weights.values()
                                                       if len(t.shape) != 2)

    def tensor_bytes(name: str, shape: tuple, fmt: Format) -> int:
        return padded(fmt.nbytes(shape))

    def branch(name: str, shape: tuple, rank: int) -> int:
        t = graph.weights[name]
        return branch_bytes(t.alias or llama.gguf_name(name), shape, rank)

    return FileLayout("gguf", overhead, tensor_bytes, branch,
                      branch_overhead=adapter_overhead(graph) if with_branches else 0, key="gguf/padded32")
