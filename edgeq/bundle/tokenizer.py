"""The tokenizer a bundle carries: a decoder's spec (edgeq.runtime.tokenizer reads it), an encoder's tokenizer.json.

A CNN has none. `write_tokenizer` returns what the manifest's `tokenizer` says about it. `write_hf_tokenizer`
writes a decoder's tokenizer the way Hugging Face tooling and ORT GenAI load one (tokenizer.json with
tokenizer_config.json), for the targets whose stock runtimes read them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgeq.bundle.manifest import Artifact
from edgeq.core.ir import Graph
from edgeq.runtime.tokenizer import TokenizerSpec, build_tokenizer, spec_to_json, stop_ids

SPEC_FILE = "tokenizer_spec.json"
ENCODER_FILE = "tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"


def write_tokenizer(graph: Graph, spec, folder: Path) -> tuple[Artifact | None, dict[str, Any]]:
    """(the tokenizer file's artifact, the manifest's `tokenizer`) for the staged bundle in `folder`."""
    if graph.kind == "decoder":
        path = folder / SPEC_FILE
        path.write_text(json.dumps(spec_to_json(spec), ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
        return Artifact("tokenizer", path, "any"), {
            "spec": path.name, "bos_id": spec.bos_id, "eos_id": spec.eos_id, "eot_id": spec.eot_id,
            "add_bos": spec.add_bos, "chat_template": spec.chat_template is not None}
    if graph.kind == "encoder":      # runtimes read it as it is
        path = folder / ENCODER_FILE
        shutil.copyfile(graph.metadata["tokenizer_json"], path)
        return Artifact("tokenizer", path, "any"), {"tokenizer_json": path.name,
                                                    "max_length": graph.config.context_length, "pad_id": 0}
    return None, {}


def write_hf_tokenizer(spec: TokenizerSpec, folder: Path, n_ctx: int) -> list[Path]:
    """tokenizer.json (the spec as a `tokenizers` BPE that gives llama.cpp's ids) and tokenizer_config.json (the
    special tokens, BOS/EOS handling and chat template transformers and ORT GenAI read); same spec, same bytes.
    Byte-level BPE only: for a SentencePiece vocabulary nothing is written (returns no files)."""
    tok = build_tokenizer(spec)
    if not hasattr(tok, "to_str"):       # SentencePiece: llama.cpp's algorithm in edgeq, no tokenizer.json form yet
        return []
    texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(spec.tokens)]
    name = lambda i: None if i is None else texts[i]                       # noqa: E731
    tok_path = folder / HF_TOKENIZER_FILE
    tok_path.write_text(tok.to_str() + "\n", encoding="utf-8")
    eos = spec.eot_id if spec.eot_id is not None else spec.eos_id
    config = {
        "tokenizer_class": "GPT2Tokenizer",       # byte-level BPE: the class transformers and ORT GenAI map it to
        "add_bos_token": spec.add_bos,
        "add_eos_token": spec.add_eos,
        "add_prefix_space": False,
        "bos_token": name(spec.bos_id),
        "eos_token": name(eos),
        "pad_token": name(spec.pad_id),
        "unk_token": name(spec.unk_id),
        "clean_up_tokenization_spaces": False,
        "model_max_length": n_ctx,
        "chat_template": spec.chat_template,
        "edgeq_end_of_generation": sorted(name(i) for i in stop_ids(spec)),
    }
    cfg_path = folder / HF_CONFIG_FILE
    cfg_path.write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return [tok_path, cfg_path]
