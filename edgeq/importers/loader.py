"""Pick the importer for a model path."""

from __future__ import annotations

import os
from pathlib import Path

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.importers import hf_bert
from edgeq.importers.gguf import import_gguf
from edgeq.importers.hf import import_hf
from edgeq.importers.hub import looks_like_hub_id, resolve_hub_id
from edgeq.importers.torch_export import import_pt2
from edgeq.models.recipes.default import default_model_path
from edgeq.models.recipes.minilm import MINILM_NAME, minilm_path
from edgeq.runtime.tokenizer import spec_from_gguf_metadata


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    if model is None:
        return default_model_path()
    p = Path(model).expanduser()
    if p.exists():                   # a local path always wins over a shipped name or a Hub id
        return p
    if str(model) == MINILM_NAME:
        return minilm_path()
    if looks_like_hub_id(str(model)):
        return resolve_hub_id(str(model), "model")
    raise EdgeqError(p, "no such file or folder (nor a Hugging Face id org/name[@revision])")


def import_model(path: Path) -> Graph:
    if path.is_file() and path.suffix == ".pt2":
        return import_pt2(path)
    if path.is_file():
        return import_gguf(path)
    if path.is_dir():
        if hf_bert.is_bert_folder(path):
            return hf_bert.import_hf_folder(path)
        return import_hf(path)
    raise EdgeqError(path, "not a model file or folder")


def graph_tokenizer_spec(graph: Graph):
    """The model's tokenizer: the one its importer built (HF folders), else the GGUF metadata's."""
    spec = graph.metadata.get("tokenizer_spec")
    if spec is not None:
        return spec
    return spec_from_gguf_metadata(graph.metadata.get("gguf", {}), graph.metadata.get("source_path"))
