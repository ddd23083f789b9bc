"""The tokenizer a bundle carries: a decoder's spec (edgeq.runtime.tokenizer reads it), an encoder's tokenizer.json.

A CNN has none. Returns what the manifest's `tokenizer` says about it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgeq.bundle.manifest import Artifact
from edgeq.core.ir import Graph
from edgeq.runtime.tokenizer import spec_to_json

SPEC_FILE = "tokenizer_spec.json"
ENCODER_FILE = "tokenizer.json"


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
