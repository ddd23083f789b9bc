"""`edgeq eval`: a bundle's fidelity in its own runtime against the float source model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from edgeq import runtime
from edgeq.core.errors import EdgeqError
from edgeq.core.fs import atomic_write_text
from edgeq.devices.session import DeviceSession, runs_remotely
from edgeq.evaluate.cnn import evaluate_cnn
from edgeq.evaluate.decoder import evaluate
from edgeq.evaluate.encoder import evaluate_encoder
from edgeq.evaluate.points import record_point
from edgeq.evaluate.source import reference_executor
from edgeq.evaluate.texts import EVALUATION_TEXT_NAME, evaluation_text
from edgeq.runtime.manifest import read_manifest


def evaluate_bundle(bundle: str | os.PathLike, text_file: str | None = None, ctx: int = 512, chunks: int = 8,
                    reference: str | None = None, adapters: list[str] | None = None,
                    backend: str | None = None, threads: int = 1,
                    record: bool = True, progress: Callable | None = None,
                    reference_logits: Callable | None = None, sentences: int = 256, images: str | None = None,
                    device: str | None = None, pareto: bool = True, pruning_rate: float | None = None,
                    use_adapters: dict[str, float | None] | None = None) -> dict:
    """Evaluate; `reference_logits` lets a benchmark reuse one float reference across many bundles.

    `pruning_rate`: a decoder bundle's rate to load it at; the reference is still the unpruned float source, so
    rates (and orderings) compare on one scale.
    `use_adapters`: the bundle's separate adapters to apply (name -> weight, None: its default scale); the float
    reference merges them, from the folders `adapters` names after the bundle's merged ones.

    `pareto`: add the (bpw, KLD) point to the source model's cache that export reports plot (edgeq/evaluate/points.py).
    """
    bundle = Path(bundle)
    kind = read_manifest(bundle)["model"].get("kind")
    if runs_remotely(device) and kind != "decoder":
        raise EdgeqError(bundle, f"edgeq eval --device {device} scores decoders; run an {kind} there with edgeq run")
    if pruning_rate is not None and kind != "decoder":
        raise EdgeqError(bundle, f"pruning rates are for decoders, this bundle holds an {kind}")
    if kind == "cnn":
        with runtime.load(bundle, backend=backend, threads=threads, device=device) as session:
            res = evaluate_cnn(session, images, reference=reference, reference_logits=reference_logits,
                               progress=progress)
        res["backend"] = session.backend_name
        if record:
            _record(bundle, res)
        return res
    if kind == "encoder":
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
    if use_adapters and runs_remotely(device):
        raise EdgeqError(None, f"--use-adapter runs in this process, not on {device}")
    session = (DeviceSession(bundle, device, backend, threads, n_ctx=ctx, pruning_rate=pruning_rate)
               if runs_remotely(device)
               else runtime.load(bundle, backend=backend, threads=threads, n_ctx=ctx, device=device,
                                 pruning_rate=pruning_rate, adapters=use_adapters))
    try:
        manifest = session.manifest
        if reference_logits is None:
            reference_logits = reference_executor(manifest, reference, adapters or [], bundle,
                                                  getattr(session, "adapters", None)).logits
        tokens = session.tokenize(text, add_special=True, parse_special=False)
        if len(tokens) < ctx:
            raise EdgeqError(text_file, f"text has {len(tokens)} tokens, fewer than one --ctx {ctx} window")
        res = evaluate(tokens, ctx, session.logits, reference_logits, session.spec.bos_id, session.spec.add_bos,
                       max_chunks=chunks, progress=progress)
    finally:
        session.close()
    res["backend"] = session.backend_name
    res["text"] = text_name
    using = dict(getattr(session, "adapters", None) or {})
    if using:
        res["adapters"] = using
    if pruning_rate is not None:
        res["pruning_rate"] = pruning_rate
    if record:
        _record(bundle, res)
    if pareto and text_file is None and not pruning_rate and not using:
        record_point(bundle, manifest, res)
    return res


def _record(bundle: Path, res: dict) -> None:
    mpath = bundle / "measurements.json"
    meas = json.loads(mpath.read_text(encoding="utf-8")) if mpath.is_file() else {}
    meas.setdefault("eval", []).append(res)
    atomic_write_text(mpath, json.dumps(meas, indent=1) + "\n")
