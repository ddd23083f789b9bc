"""`edgeq add-adapter BUNDLE DIR`: one more LoRA adapter beside an exported base, the base untouched.

The adapter is checked against the base the bundle holds (its manifest's config gives every weight's name and
shape), written by each backend's target exactly as `export --adapter-mode separate` writes it, and listed
in the manifest, which is replaced in one rename: a reader sees the old bundle or the new one, never half.
ONNX and TVM graphs take adapters on the weights they were exported with LoRA inputs for (the manifest's
`lora_slots`); an adapter that changes another weight needs a new export.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgeq.core.adapter import LoraAdapter, UserAdapter
from edgeq.core.errors import EdgeqError
from edgeq.core.fs import atomic_write_text, fsync_tree, output_lock
from edgeq.core.ir import Tensor
from edgeq.evaluate.source import reference_graph
from edgeq.models import llama
from edgeq.passes.merge_adapters import load_adapter, unmerged
from edgeq.runtime.manifest import LORA_ROLE, read_manifest, verify_artifacts
from edgeq.targets.registry import get_target


def _no_values(bundle: Path, name: str) -> Callable:
    def load():
        raise EdgeqError(bundle, f"the adapter holds full weights for {name}, which a bundle cannot compare them "
                                 "with; pass the source model with --model")
    return load


def base_graph(manifest: dict[str, Any], bundle: Path, model: str | None):
    """The bundle's base as a graph: the source model when given (checked against the manifest's digest), else
    its names and shapes alone, from the manifest's config."""
    if model is not None:
        return reference_graph(manifest, model, bundle)
    cfg = llama.LlamaConfig.from_json(manifest["model"]["config"])
    weights = {n: Tensor(n, shape, _no_values(bundle, n)) for n, shape in llama.expected_shapes(cfg).items()}
    return llama.build_graph(cfg, weights, {"name": manifest["model"].get("name")})


def add_adapter(bundle: str | Path, arg: str, model: str | None = None) -> list[dict[str, Any]]:
    """Add the adapter `DIR[:WEIGHT][=NAME]` to every backend of the bundle; returns its new manifest entries."""
    bundle = Path(bundle)
    with output_lock(bundle):
        m = read_manifest(bundle)
        verify_artifacts(bundle, m)
        if m["model"]["kind"] != "decoder" or m["model"].get("arch") != "llama":
            raise EdgeqError(bundle, "LoRA adapters apply to llama-family decoder bundles")
        graph = base_graph(m, bundle, model)
        adapter = unmerged(load_adapter(arg, graph), graph)
        if any(a.get("role") == LORA_ROLE and a["name"] == adapter.name for a in m["artifacts"]):
            raise EdgeqError(bundle, f"already holds an adapter named {adapter.name!r}; name this one with DIR=NAME")
        backends = list(dict.fromkeys(a["backend"] for a in m["artifacts"] if a.get("role", "model") == "model"))
        for b in backends:
            get_target(b).check_adapter(adapter)
            _check_slots(bundle, m, b, adapter)
        stage = Path(tempfile.mkdtemp(prefix=f".add-adapter-{adapter.name}-", dir=bundle))
        moved: list[Path] = []
        try:
            entries = [get_target(b).lower_adapter(graph, adapter, stage).entry() for b in backends]
            fsync_tree(stage)
            for e in entries:
                if (bundle / e["path"]).exists():
                    raise EdgeqError(bundle / e["path"], "exists already (a file the manifest does not list)")
            for e in entries:
                (stage / e["path"]).replace(bundle / e["path"])
                moved.append(bundle / e["path"])
            tokenizer_at = next((i for i, a in enumerate(m["artifacts"]) if a.get("role") == "tokenizer"),
                                len(m["artifacts"]))
            m["artifacts"][tokenizer_at:tokenizer_at] = entries
            atomic_write_text(bundle / "manifest.json", json.dumps(m, indent=1) + "\n")
        except BaseException:
            for p in moved:
                p.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return entries


def _check_slots(bundle: Path, m: dict[str, Any], backend: str, adapter: UserAdapter) -> None:
    """ONNX and TVM graphs have LoRA inputs only on the weights their export's adapters changed."""
    if not get_target(backend).adapters_need_slots or not isinstance(adapter, LoraAdapter):
        return
    slots = set((m.get(backend) or {}).get("lora_slots") or [])
    outside = [t for t in adapter.targets if t not in slots]
    if outside:
        which = f"LoRA inputs on {len(slots)} weights" if slots else "no LoRA inputs (not exported with " \
                                                                     "--adapter-mode separate)"
        raise EdgeqError(bundle, f"its {backend} model has {which}; adapter {adapter.name} also changes "
                                 f"{outside[0]}: export again with this adapter among the --adapter options")
