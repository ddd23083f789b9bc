"""The second half of an ONNX or TVM export: manifest, reference outputs and check, measurements, report.

Both exporters lower differently but finish a staged bundle the same way; one function keeps their manifests
in the same key order (the manifest is part of what must be byte-identical for the same inputs) and their
measurements and reports alike.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.fsutil import sha256_file
from edgeq.ir import Graph
from edgeq.passes import Context
from edgeq.plan import Plan


def file_artifact(path: Path, role: str, backend: str, formats: dict | None = None) -> dict[str, Any]:
    """A manifest `artifacts` entry for a file already written into the staged bundle."""
    return {"role": role, "backend": backend, "path": path.name, "sha256": sha256_file(path),
            "bytes": path.stat().st_size, "formats": formats or {}}


def copy_encoder_tokenizer(graph: Graph, folder: Path, artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """An encoder's tokenizer.json copied into the bundle (runtimes read it as is); the manifest's `tokenizer`."""
    shutil.copyfile(graph.metadata["tokenizer_json"], folder / "tokenizer.json")
    artifacts.append(file_artifact(folder / "tokenizer.json", "tokenizer", "any"))
    return {"tokenizer_json": "tokenizer.json", "max_length": graph.config.context_length, "pad_id": 0}


def finish_bundle(folder: Path, graph: Graph, plan: Plan, ctx: Context, profile, *, versions: dict[str, str],
                  source: dict[str, Any], n_ctx: int | None, kv_cache_dtype: str | None,
                  artifacts: list[dict[str, Any]], tokenizer: dict[str, Any], sections: dict[str, Any],
                  reference: dict[str, Any], check: bool, timings: dict[str, float], t_start: float,
                  ref_images: np.ndarray | None = None, not_run: str | None = None,
                  decoder_reference: Callable[[dict, dict], None] | None = None) -> tuple[dict, dict]:
    """Write manifest.json, the reference outputs with the runtime's check (`check`; not at all where `not_run`
    says why the library cannot run here), measurements.json and report.md. `sections` are backend-specific
    manifest entries, placed after `tokenizer`; a decoder's reference and check is the backend's
    `decoder_reference(manifest, measurements)`. Returns (manifest, measurements)."""
    from edgeq.export_onnx import cnn_reference_and_check, encoder_reference_and_check
    from edgeq.pipeline import manifest_head
    from edgeq.report import write_report

    manifest: dict[str, Any] = {
        **manifest_head(graph, plan, versions),
        "source": source,
        "target": profile.to_json(),
        "n_ctx": n_ctx,
        "kv_cache_dtype": kv_cache_dtype,
        "artifacts": artifacts,
        "tokenizer": tokenizer,
        **sections,
        "plan": plan.to_json(),
        "passes": ctx.records,
        "predicted": {"latency_ms_per_token": None, "peak_memory_bytes": None},
        "pruning_rates": None,
        "reference": reference,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    measurements: dict[str, Any] = {"host": {"machine": platform.machine(), "python": platform.python_version()}}
    if not_run is not None:
        measurements["reference_check"] = {"backend": ctx.backend, "skipped": not_run}
    if graph.kind == "encoder":
        encoder_reference_and_check(graph, folder, measurements, check and not_run is None)
    elif graph.kind == "cnn":
        cnn_reference_and_check(graph, folder, measurements, check and not_run is None, ref_images)
    elif decoder_reference is not None:
        decoder_reference(manifest, measurements)
    timings["reference_and_check"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    measurements["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    (folder / "measurements.json").write_text(json.dumps(measurements, indent=1) + "\n", encoding="utf-8")
    write_report(folder / "report.md", manifest, measurements, graph, plan, None)
    return manifest, measurements
