"""`edgeq eval`: a bundle's fidelity in its own runtime against the float source model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from edgeq.errors import EdgeqError
from edgeq.fsutil import atomic_write_text, sha256_source


def reference_graph(manifest: dict, reference: str | None, bundle: Path):
    """The float model the bundle was made from, imported; it must have the manifest's source digest.

    One resolution for every model kind; only what is hashed differs: a decoder's file (or folder listing),
    an encoder folder's defining files, a CNN's imported graph (so any save of the same network matches).
    Without `reference`, the source the manifest names is looked for among the models edgeq ships.
    """
    from edgeq.importers.loader import import_model

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
    if _source_digest(kind, path, graph) != manifest["source"]["sha256"]:
        raise EdgeqError(path, "is not the model this bundle was made from (SHA-256 differs from the manifest)")
    return graph if graph is not None else import_model(path)


def _shipped_source(name: str) -> Path | None:
    from edgeq.models.default import DEFAULT_NAME, default_model_path
    from edgeq.models.minilm import MINILM_NAME, minilm_path

    return {DEFAULT_NAME: default_model_path, MINILM_NAME: minilm_path}.get(name, lambda: None)()


def _source_digest(kind: str | None, path: Path, graph) -> str:
    if kind == "cnn":
        from edgeq.export_onnx import graph_digest

        return graph_digest(graph) if graph.kind == "cnn" else ""
    if kind == "encoder":
        from edgeq.export_onnx import source_digest

        return source_digest(path)[0]
    return sha256_source(path)


def evaluate_bundle(bundle: str | os.PathLike, text_file: str | None = None, ctx: int = 512, chunks: int = 8,
                    reference: str | None = None, adapters: list[str] | None = None,
                    backend: str | None = None, threads: int = 1,
                    record: bool = True, progress: Callable | None = None,
                    reference_logits: Callable | None = None, sentences: int = 256, images: str | None = None,
                    device: str | None = None) -> dict:
    """Evaluate; `reference_logits` lets a benchmark reuse one float reference across many bundles."""
    from edgeq import runtime
    from edgeq.evaluation import evaluate
    from edgeq.texts import EVALUATION_TEXT_NAME, evaluation_text

    bundle = Path(bundle)
    from edgeq.runtime.manifest import read_manifest

    kind = read_manifest(bundle)["model"].get("kind")
    if kind == "cnn":
        from edgeq.evaluate_cnn import evaluate_cnn

        with runtime.load(bundle, backend=backend, threads=threads, device=device) as session:
            res = evaluate_cnn(session, images, reference=reference, reference_logits=reference_logits,
                               progress=progress)
        res["backend"] = session.backend_name
        if record:
            _record(bundle, res)
        return res
    if kind == "encoder":
        from edgeq.evaluate_encoder import evaluate_encoder

        with runtime.load(bundle, backend=backend, threads=threads, device=device) as session:
            res = evaluate_encoder(session, text_file, n=sentences, reference=reference,
                                   reference_embed=reference_logits, progress=progress)
        res["backend"] = session.backend_name
        if record:
            _record(bundle, res)
        return res
    if text_file is not None:
        p = Path(text_file)
        if not p.is_file():
            raise EdgeqError(p, "no such text file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EdgeqError(p, "text file is not UTF-8") from None
        text_name = p.name
    else:
        text, text_name = evaluation_text(), EVALUATION_TEXT_NAME
    session = runtime.load(bundle, backend=backend, threads=threads, n_ctx=ctx, device=device)
    try:
        manifest = session.manifest
        if reference_logits is None:
            reference_logits = _reference_executor(manifest, reference, adapters or [], bundle).logits
        tokens = session.tokenize(text, add_special=True, parse_special=False)
        if len(tokens) < ctx:
            raise EdgeqError(text_file, f"text has {len(tokens)} tokens, fewer than one --ctx {ctx} window")
        res = evaluate(tokens, ctx, session.logits, reference_logits, session.spec.bos_id, session.spec.add_bos,
                       max_chunks=chunks, progress=progress)
    finally:
        session.close()
    res["backend"] = session.backend_name
    res["text"] = text_name
    if record:
        _record(bundle, res)
    return res


def _reference_executor(manifest: dict, reference: str | None, adapters: list[str], bundle: Path):
    """The float source model, with the bundle's adapters merged (their hashes and weights must match)."""
    from edgeq.executor import Executor

    graph = reference_graph(manifest, reference, bundle)
    want = manifest["source"].get("adapters") or []
    if want or adapters:
        from edgeq.passes import Context
        from edgeq.passes.merge_adapters import MergeAdapters
        from edgeq.plan import Plan

        if len(adapters) != len(want):
            names = ", ".join(f"{a['name']}:{a['weight']:g}" for a in want) or "none"
            raise EdgeqError(bundle, f"the bundle was exported with adapters [{names}]; pass the same with --adapter "
                                     f"(got {len(adapters)})")
        merge = MergeAdapters(adapters)
        graph, _ = merge.run(graph, Plan(), Context(backend="gguf"))
        for got, exp in zip(merge.adapters, want):
            if got.sha256 != exp["sha256"] or got.weight != exp["weight"]:
                raise EdgeqError(got.path, f"is not adapter {exp['name']} with weight {exp['weight']:g} that the "
                                           "bundle was exported with (SHA-256 or weight differ)")
    # Eval runs many windows: keep the weights unless they would not fit comfortably.
    return Executor(graph, cache_weights=graph.n_params * 4 <= 2 * 2**30)


def _record(bundle: Path, res: dict) -> None:
    mpath = bundle / "measurements.json"
    meas = json.loads(mpath.read_text(encoding="utf-8")) if mpath.is_file() else {}
    meas.setdefault("eval", []).append(res)
    atomic_write_text(mpath, json.dumps(meas, indent=1) + "\n")
