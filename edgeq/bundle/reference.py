"""Reference inputs and float outputs stored in each bundle, and the export's check of them in the runtime.

They let a device check an exported model without torch or the source model: run the inputs, compare with
the stored float outputs. Decoders carry prompts and logits, encoders sentences and embeddings, CNNs images
and logits. At export the same inputs run through the real runtime of every artifact the host can run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgeq import runtime
from edgeq.core.executor import Executor
from edgeq.core.ir import Graph
from edgeq.evaluate.decoder import compare_logits
from edgeq.evaluate.encoder import cosines
from edgeq.importers.hf_bert import encoder_tokenizer
from edgeq.runtime.tokenizer import build_tokenizer, encode

FOLDER = "reference"
REFERENCE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)
REFERENCE_SENTENCES = (
    "The capital of France is Paris.",
    "A function returns a value to its caller.",
    "Quantization stores each weight in fewer bits.",
    "short",
)
REFERENCE_IMAGES = 8
CHECK_THREADS = max(1, min(4, os.cpu_count() or 1))


def reference_token_ids(tokenize) -> list[list[int]]:
    return [tokenize(p) for p in REFERENCE_PROMPTS]


def write_reference(folder: Path, ids: list[list[int]], logits: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inputs.json").write_text(
        json.dumps({"prompts": list(REFERENCE_PROMPTS), "token_ids": ids}, indent=1) + "\n", encoding="utf-8")
    for i, lg in enumerate(logits):
        np.save(folder / f"logits_{i}.npy", lg.astype(np.float32))


def read_reference(folder: Path) -> tuple[list[list[int]], list[np.ndarray]]:
    d = json.loads((folder / "inputs.json").read_text(encoding="utf-8"))
    ids = d["token_ids"]
    return ids, [np.load(folder / f"logits_{i}.npy", allow_pickle=False) for i in range(len(ids))]


def reference_images(graph: Graph, calib: list[np.ndarray] | None) -> np.ndarray:
    """The images a CNN bundle carries with their float logits: the first calibration images, else seeded noise."""
    if calib is None:
        return np.random.default_rng(0).random((REFERENCE_IMAGES, *graph.config.image_shape), dtype=np.float32)
    return np.ascontiguousarray(calib[0][:REFERENCE_IMAGES], dtype=np.float32)


def reference_record(graph: Graph, images: np.ndarray | None, from_calibration: bool) -> dict[str, Any]:
    """The manifest's `reference`: where the reference inputs are and how many."""
    if graph.kind == "decoder":
        return {"path": FOLDER, "prompts": len(REFERENCE_PROMPTS)}
    if graph.kind == "cnn":
        return {"path": FOLDER, "inputs": len(images),
                "images": "calibration images" if from_calibration else "seeded uniform noise in [0, 1)"}
    return {"path": FOLDER, "inputs": len(REFERENCE_SENTENCES)}


def reference_and_check(graph: Graph, bundle: Path, backends: list[str], measurements: dict, check: bool,
                        cannot_run: str | None, spec=None, images: np.ndarray | None = None) -> None:
    """Write the float reference outputs; with `check`, run the same inputs in the runtime of every artifact and
    record the agreement in `measurements` (not where `cannot_run` says why the host cannot run it)."""
    if cannot_run is not None:
        measurements["reference_check"] = {"backend": backends[0], "skipped": cannot_run}
    run = check and cannot_run is None
    if graph.kind == "encoder":
        _encoder(graph, bundle, measurements, run)
    elif graph.kind == "cnn":
        _cnn(graph, bundle, measurements, run, images)
    elif cannot_run is None:
        _decoder(graph, bundle, backends, measurements, check)
    else:       # the prompts tokenized here, as the runtime would
        tok = build_tokenizer(spec)
        ids = reference_token_ids(lambda s: encode(tok, spec, s, add_special=True, parse_special=False))
        write_reference(bundle / FOLDER, ids, Executor(graph, cache_weights=False).logits_many(ids))


def _decoder(graph: Graph, bundle: Path, backends: list[str], measurements: dict, check: bool) -> None:
    """Float reference logits for the bundled prompts, and the same prompts through every artifact's runtime."""
    session = runtime.load(bundle, threads=CHECK_THREADS, n_ctx=256)
    try:
        ids = reference_token_ids(lambda s: session.tokenize(s, add_special=True, parse_special=False))
        # streamed: each weight is loaded once for all prompts and dropped, so a model far larger than
        # the RAM left beside the runtime's own mapping of the exported file still gets its reference
        ref = Executor(graph, cache_weights=False).logits_many(ids)
        write_reference(bundle / FOLDER, ids, ref)
        if check:
            got = [session.logits(i) for i in ids]
            measurements["reference_check"] = {"backend": session.backend_name, **compare_logits(ref, got)}
    finally:
        session.close()
    if check and len(backends) > 1:   # every artifact of a multi-backend bundle, on the same ids
        checks = {measurements["reference_check"]["backend"]: measurements["reference_check"]}
        for b in backends[1:]:
            with runtime.load(bundle, backend=b, threads=CHECK_THREADS, n_ctx=256, verify=False) as s:
                checks[b] = {"backend": b, **compare_logits(ref, [s.logits(i) for i in ids])}
        measurements["reference_checks"] = checks


def _encoder(graph: Graph, bundle: Path, measurements: dict, check: bool) -> None:
    """Float reference embeddings for a few sentences, and the runtime's."""
    tok = encoder_tokenizer(graph)
    ids = [tok.encode(s).ids for s in REFERENCE_SENTENCES]
    ex = Executor(graph)
    ref = np.stack([ex.embed(i) for i in ids])
    folder = bundle / FOLDER
    folder.mkdir()
    (folder / "inputs.json").write_text(json.dumps({"sentences": list(REFERENCE_SENTENCES), "token_ids": ids},
                                                   indent=1) + "\n", encoding="utf-8")
    np.save(folder / "embeddings.npy", ref.astype(np.float32))
    if check:
        with runtime.load(bundle, threads=CHECK_THREADS) as s:
            got = s.embed(list(REFERENCE_SENTENCES))
        c = cosines(ref, got)
        measurements["reference_check"] = {"backend": s.backend_name, "cosine_mean": float(c.mean()),
                                           "cosine_min": float(c.min()), "n_inputs": int(c.size)}


def _cnn(graph: Graph, bundle: Path, measurements: dict, check: bool, x: np.ndarray) -> None:
    """Float reference logits for the reference images, and the runtime's on the same images."""
    ref = Executor(graph).run_inputs({"images": x})["logits"]
    folder = bundle / FOLDER
    folder.mkdir()
    np.save(folder / "images.npy", x)
    np.save(folder / "logits.npy", ref.astype(np.float32))
    if check:
        with runtime.load(bundle, threads=CHECK_THREADS) as s:
            got = s.run({"images": x})["logits"]
        measurements["reference_check"] = {
            "backend": s.backend_name, "agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
            "max_abs_diff": float(np.abs(got - ref).max()), "n_inputs": int(len(x))}
