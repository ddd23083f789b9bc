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
    return path.name


def source_record(graph: Graph, model_path: Path | None, given: str | None) -> dict[str, Any]:
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
    return {"name": source_name(model_path, given), "sha256": sha, "bytes": size, **tail}
