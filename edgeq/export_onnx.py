"""`edgeq export --backend onnx`: decide (preset, user plan, legalize, calibrate), lower, check, write a bundle.

Kept apart from the GGUF flow in pipeline.py; it shares the bundle layout
(manifest, reference inputs with float outputs, measurements, report) and the
atomic staging.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.fsutil import sha256_file, staged_dir
from edgeq.ir import Graph
from edgeq.passes import Context, run_passes
from edgeq.passes.apply_rules import ApplyRules
from edgeq.passes.assign_preset import AssignPreset
from edgeq.passes.calibrate_ranges import CalibrateRanges
from edgeq.passes.legalize import Legalize
from edgeq.plan import Plan

MODEL_FILE = "model.onnx"
REFERENCE_SENTENCES = (
    "The capital of France is Paris.",
    "A function returns a value to its caller.",
    "Quantization stores each weight in fewer bits.",
    "short",
)
SOURCE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json",
                "sentence_bert_config.json")


def source_digest(path: Path) -> tuple[str, int]:
    """SHA-256 of a model: of the file, or for a folder of (name, file hash) for the files that define the model."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    h = hashlib.sha256()
    total = 0
    for rel in SOURCE_FILES:
        f = path / rel
        if f.is_file():
            h.update(f"{rel}\0{sha256_file(f)}\n".encode())
            total += f.stat().st_size
    return h.hexdigest(), total


def encoder_tokenizer(graph: Graph):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(graph.metadata["tokenizer_json"])
    tok.no_padding()
    tok.enable_truncation(graph.config.context_length)
    return tok


def calibration_inputs(graph: Graph, n: int = 128) -> tuple[list[np.ndarray], str]:
    if graph.kind == "encoder":
        from edgeq.texts import calibration_sentences

        tok = encoder_tokenizer(graph)
        return [np.array(tok.encode(s).ids, dtype=np.int64) for s in calibration_sentences(n)], \
            f"{n} sentences of pydoc_data.topics (even-indexed topics)"
    raise EdgeqError(None, f"no default calibration data for {graph.kind} models; pass calibration inputs")


def decide_onnx(graph: Graph, preset: str, user_plan: Plan | None, plan_path: str | None, ctx: Context,
                calibration: list[np.ndarray] | None = None, calibration_source: str | None = None,
                percentile: float | None = 99.999) -> Plan:
    passes = [AssignPreset(preset)]
    if user_plan is not None:
        passes.append(ApplyRules(user_plan, plan_path))
    passes.append(Legalize())
    _, plan = run_passes(passes, graph, Plan(), ctx)
    if any(d.format == "int8" and d.act_range is None for d in plan.tensors.values()):
        if calibration is None:
            calibration, calibration_source = calibration_inputs(graph)
        _, plan = run_passes([CalibrateRanges(calibration, calibration_source or "calibration inputs", percentile)],
                             graph, plan, ctx)
    return plan


def source_name(path: Path, given: str | None) -> str:
    from edgeq.models.minilm import MINILM_NAME

    if given == MINILM_NAME:
        return MINILM_NAME
    if given is None:
        from edgeq.models.default import DEFAULT_NAME

        return DEFAULT_NAME
    return path.name


def runtime_versions() -> dict[str, str]:
    from edgeq.pipeline import runtime_versions as versions

    return versions(("onnxruntime", "onnx"))


def export_onnx(opts, graph: Graph, model_path: Path, profile, user_plan: Plan | None, preset: str,
                progress: Callable | None, log: Callable[[str], None], timings: dict[str, float],
                t_start: float) -> dict:
    from edgeq.targets.onnx import lower_onnx, save_model

    ctx = Context(backend="onnx", profile=profile, progress=progress)
    t0 = time.perf_counter()
    plan = decide_onnx(graph, preset, user_plan, opts.plan, ctx)
    timings["passes"] = time.perf_counter() - t0
    log(f"exporting {graph.metadata.get('name')} ({graph.n_params:,} params) for {profile.name} as onnx {preset}")

    t0 = time.perf_counter()
    model = lower_onnx(graph, plan, progress=progress)
    timings["lower"] = time.perf_counter() - t0
    src_sha, src_bytes = source_digest(model_path)
    with staged_dir(opts.out, opts.force) as tmp:
        files = save_model(model, tmp / MODEL_FILE)
        del model
        artifacts: list[dict[str, Any]] = []
        for f in files:
            artifacts.append({"role": "model" if f.name == MODEL_FILE else "model_data", "backend": "onnx",
                              "path": f.name, "sha256": sha256_file(f), "bytes": f.stat().st_size,
                              "formats": plan.format_counts() if f.name == MODEL_FILE else {}})
        tokenizer: dict[str, Any] = {}
        if graph.kind == "encoder":
            shutil.copyfile(graph.metadata["tokenizer_json"], tmp / "tokenizer.json")
            artifacts.append({"role": "tokenizer", "backend": "any", "path": "tokenizer.json",
                              "sha256": sha256_file(tmp / "tokenizer.json"),
                              "bytes": (tmp / "tokenizer.json").stat().st_size, "formats": {}})
            tokenizer = {"tokenizer_json": "tokenizer.json", "max_length": graph.config.context_length, "pad_id": 0}
        from edgeq.pipeline import manifest_head

        manifest: dict[str, Any] = {
            **manifest_head(graph, plan, runtime_versions()),
            "source": {"name": source_name(model_path, opts.model), "sha256": src_sha, "bytes": src_bytes,
                       "license": graph.metadata.get("license"), "adapters": []},
            "target": profile.to_json(),
            "n_ctx": int(getattr(graph.config, "context_length", 0)) or None,
            "kv_cache_dtype": None,
            "artifacts": artifacts,
            "tokenizer": tokenizer,
            "plan": plan.to_json(),
            "passes": ctx.records,
            "predicted": {"latency_ms_per_token": None, "peak_memory_bytes": None},
            "pruning_rates": None,
            "reference": {"path": "reference", "inputs": len(REFERENCE_SENTENCES)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        t0 = time.perf_counter()
        measurements: dict[str, Any] = {"host": {"machine": platform.machine(), "python": platform.python_version()}}
        if graph.kind == "encoder":
            encoder_reference_and_check(graph, tmp, measurements, opts.check)
        timings["reference_and_check"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        measurements["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        (tmp / "measurements.json").write_text(json.dumps(measurements, indent=1) + "\n", encoding="utf-8")
        from edgeq.report import write_report

        write_report(tmp / "report.md", manifest, measurements, graph, plan, None)
    return {"out": str(opts.out), "manifest": manifest, "measurements": measurements}


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    return np.sum(ref * got, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))


def encoder_reference_and_check(graph: Graph, bundle: Path, measurements: dict, check: bool) -> None:
    """Float reference embeddings for a few sentences (so a device can check itself), and the runtime's."""
    from edgeq import runtime
    from edgeq.executor import Executor

    tok = encoder_tokenizer(graph)
    ids = [tok.encode(s).ids for s in REFERENCE_SENTENCES]
    ex = Executor(graph)
    ref = np.stack([ex.embed(i) for i in ids])
    folder = bundle / "reference"
    folder.mkdir()
    (folder / "inputs.json").write_text(json.dumps({"sentences": list(REFERENCE_SENTENCES), "token_ids": ids},
                                                   indent=1) + "\n", encoding="utf-8")
    np.save(folder / "embeddings.npy", ref.astype(np.float32))
    if check:
        with runtime.load(bundle, threads=max(1, min(4, os.cpu_count() or 1))) as s:
            got = s.embed(list(REFERENCE_SENTENCES))
        c = cosines(ref, got)
        measurements["reference_check"] = {"backend": s.backend_name, "cosine_mean": float(c.mean()),
                                           "cosine_min": float(c.min()), "n_inputs": int(c.size)}
