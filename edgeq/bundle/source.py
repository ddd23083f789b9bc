"""What a bundle was made from: the manifest's `source`, and the digest `edgeq eval` checks a reference against.

One digest per model kind: a decoder's file (or its folder's listing), an encoder folder's defining files,
a CNN's imported graph (so a module exported through the API and the same module saved as a .pt2 are the
same source).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.fs import sha256_file, sha256_source, source_bytes
from edgeq.core.ir import Graph
from edgeq.importers.hub import looks_like_hub_id
from edgeq.models.recipes.default import DEFAULT_NAME
from edgeq.models.recipes.minilm import MINILM_NAME

ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json",
                 "sentence_bert_config.json")


def encoder_digest(path: Path) -> tuple[str, int]:
    """SHA-256 of a model: of the file, or for a folder of (name, file hash) for the files that define the model."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    h = hashlib.sha256()
    total = 0
    for rel in ENCODER_FILES:
        f = path / rel
        if f.is_file():
            h.update(f"{rel}\0{sha256_file(f)}\n".encode())
            total += f.stat().st_size
    return h.hexdigest(), total


def graph_digest(graph: Graph) -> str:
    """SHA-256 of what a network computes (ops, attributes, weight names, shapes and bytes), however it was saved."""
    h = hashlib.sha256()
    h.update(json.dumps([[n.op, n.inputs, n.outputs, n.attrs] for n in graph.nodes], sort_keys=True).encode())
    for name, t in graph.weights.items():
        arr = np.ascontiguousarray(t.numpy(), dtype="<f4")
        h.update(f"\0{name}\0{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def source_digest(kind: str | None, path: Path, graph: Graph | None = None) -> str:
    """The digest the manifest records for a source of this kind (a CNN's needs its imported graph)."""
    if kind == "cnn":
        return graph_digest(graph) if graph is not None and graph.kind == "cnn" else ""
    if kind == "encoder":
        return encoder_digest(path)[0]
    return sha256_source(path)


def source_name(path: Path | None, given: str | None) -> str:
    """How the manifest names the source: a shipped model by its name, else the file or folder's name."""
    if given == MINILM_NAME:
        return MINILM_NAME
    if given is None:
        return DEFAULT_NAME
    if looks_like_hub_id(given) and not Path(given).exists():
        return f"{given}@{path.name}" if "@" not in given and path.is_dir() else given   # the commit it resolved to
    return path.name


FLOAT_SOURCES = frozenset({"f32", "f16", "bf16", "f64"})


def quantized_source_formats(graph: Graph) -> dict[str, int]:
    """{format: tensor count} of a source whose weights are stored quantized (a Q4_1 GGUF, say); {} for float."""
    counts: dict[str, int] = {}
    for t in graph.weights.values():
        counts[t.source_format] = counts.get(t.source_format, 0) + 1
    return dict(sorted(counts.items())) if set(counts) - FLOAT_SOURCES else {}


def requantized_tensors(graph: Graph, plan) -> dict[str, list[str]]:
    """{"q4_1 -> q5_0": [tensor, ...]}: tensors a quantized source holds on one grid that the plan puts on another
    (a tensor kept in its source format is written byte for byte instead)."""
    out: dict[str, list[str]] = {}
    for name, t in graph.weights.items():
        fmt = plan.tensors[name].format
        if t.source_format not in FLOAT_SOURCES and fmt != t.source_format:
            out.setdefault(f"{t.source_format} -> {fmt}", []).append(name)
    return dict(sorted(out.items()))


def requantize_note(graph: Graph, plan) -> str | None:
    """The one line that says a quantized source is quantized again, and how much of it."""
    formats = quantized_source_formats(graph)
    if not formats:
        return None
    moved = requantized_tensors(graph, plan)
    n = sum(len(v) for v in moved.values())
    src = ", ".join(f"{k} {v}" for k, v in formats.items())
    if not n:
        return f"note: the source is already quantized ({src}); every tensor keeps its source format, byte for byte"
    groups = ", ".join(f"{k}: {len(v)}" for k, v in sorted(moved.items(), key=lambda kv: -len(kv[1]))[:4])
    return (f"warning: the source is already quantized ({src}): {n} tensors are requantized onto another grid "
            f"({groups}{', ...' if len(moved) > 4 else ''}), which adds to their error; a float source avoids "
            "it (--no-requantize refuses)")


def source_record(graph: Graph, model_path: Path | None, given: str | None, plan=None) -> dict[str, Any]:
    """The manifest's `source`: name, digest and bytes of the source, its licence and the merged adapters."""
    tail = {"license": graph.metadata.get("license"), "adapters": graph.metadata.get("adapters", [])}
    if graph.kind == "cnn" or model_path is None:     # a CNN, or a graph built in memory (latency micro-models)
        rec: dict[str, Any] = {"name": model_path.name if model_path else graph.metadata.get("name"),
                               "sha256": graph_digest(graph), "sha256_of": "the imported graph (ops, attributes, weights)",
                               "bytes": 4 * graph.n_params}
        if model_path is not None:
            rec["file_sha256"] = sha256_file(model_path)
        return {**rec, **tail}
    if graph.kind == "encoder":
        sha, size = encoder_digest(model_path)
    else:
        sha, size = sha256_source(model_path), source_bytes(model_path)
    rec = {"name": source_name(model_path, given), "sha256": sha, "bytes": size, **tail}
    formats = quantized_source_formats(graph)
    if formats:          # what a quantized source held, and what this bundle moved onto other grids
        rec["formats"] = formats
        if plan is not None:
            rec["requantized"] = {k: len(v) for k, v in requantized_tensors(graph, plan).items()}
    return rec
