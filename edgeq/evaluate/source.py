"""The float source model a bundle was made from, found and checked against the manifest's digest.

One resolution for every model kind; only what is hashed differs (edgeq/bundle/source.py). Without
`--reference`, the source the manifest names is looked for among the models edgeq ships.
"""

from __future__ import annotations

from pathlib import Path

from edgeq.bundle.source import source_digest
from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.core.plan import Plan
from edgeq.importers.loader import import_model
from edgeq.models.recipes.default import DEFAULT_NAME, default_model_path
from edgeq.models.recipes.minilm import MINILM_NAME, minilm_path
from edgeq.passes import Context
from edgeq.passes.merge_adapters import MergeAdapters, parse_adapter_spec


def reference_graph(manifest: dict, reference: str | None, bundle: Path):
    """The float model the bundle was made from, imported; it must have the manifest's source digest.

    One resolution for every model kind; only what is hashed differs: a decoder's file (or folder listing),
    an encoder folder's defining files, a CNN's imported graph (so any save of the same network matches).
    Without `reference`, the source the manifest names is looked for among the models edgeq ships.
    """
    name = manifest["source"]["name"]
    if reference:
        path = Path(reference)
        if not path.exists():
            raise EdgeqError(path, "no such reference model file or folder")
    else:
        path = _shipped_source(name)
        if path is None:
            hint = " (a CNN's .pt2)" if manifest["model"].get("kind") == "cnn" else ""
            raise EdgeqError(bundle, f"cannot find the source model {name!r}; pass --reference PATH{hint}")
    kind = manifest["model"].get("kind")
    graph = import_model(path) if kind == "cnn" else None
    if source_digest(kind, path, graph) != manifest["source"]["sha256"]:
        raise EdgeqError(path, "is not the model this bundle was made from (SHA-256 differs from the manifest)")
    return graph if graph is not None else import_model(path)


def _shipped_source(name: str) -> Path | None:
    return {DEFAULT_NAME: default_model_path, MINILM_NAME: minilm_path}.get(name, lambda: None)()


def reference_executor(manifest: dict, reference: str | None, adapters: list[str], bundle: Path,
                       separate: dict[str, float] | None = None):
    """The float source model, with the bundle's merged adapters and the separate ones in use (`separate`:
    name -> weight) merged in that order; the folders `adapters` names must have their hashes (and a merged
    adapter its weight)."""
    graph = reference_graph(manifest, reference, bundle)
    want = [dict(a, separate=False) for a in manifest["source"].get("adapters") or []]
    loras = {a["name"]: a for a in manifest["artifacts"] if a.get("role") == "lora"}
    want += [{"name": n, "sha256": loras[n]["source_sha256"], "weight": w, "separate": True}
             for n, w in (separate or {}).items()]
    if want or adapters:
        if len(adapters) != len(want):
            names = ", ".join(f"{a['name']}:{a['weight']:g}" for a in want) or "none"
            raise EdgeqError(bundle, f"the bundle's reference needs adapters [{names}] (merged at export, then those "
                                     f"in use); pass their folders with --adapter in that order (got {len(adapters)})")
        args = [(path, exp["weight"] if exp["separate"] else w)
                for (path, w, _), exp in zip(map(parse_adapter_spec, adapters), want)]
        merge = MergeAdapters(args)
        graph, _ = merge.run(graph, Plan(), Context(backend="gguf"))
        for got, exp in zip(merge.adapters, want):
            if got.sha256 != exp["sha256"] or got.weight != exp["weight"]:
                raise EdgeqError(got.path, f"is not adapter {exp['name']} with weight {exp['weight']:g} that the "
                                           "bundle holds (SHA-256 or weight differ)")
    # Eval runs many windows: keep the weights unless they would not fit comfortably.
    return Executor(graph, cache_weights=graph.n_params * 4 <= 2 * 2**30)
