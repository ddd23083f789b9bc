"""`edgeq export`: import, decide (passes), lower (target), check, and write a bundle atomically."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeq import __version__
from edgeq.errors import EdgeqError
from edgeq.fsutil import check_output_dir, sha256_file, staged_dir
from edgeq.importers.loader import import_model, resolve_model_path
from edgeq.ir import Graph
from edgeq.passes import Context, run_passes
from edgeq.passes.apply_rules import ApplyRules
from edgeq.passes.assign_preset import AssignPreset
from edgeq.passes.legalize import Legalize
from edgeq.plan import Plan, load_plan
from edgeq.runtime.manifest import BUNDLE_FORMAT, BUNDLE_VERSION
from edgeq.targets.profiles import DeviceProfile, get_profile

MODEL_FILE = {"gguf": "model.gguf"}


@dataclass
class ExportOptions:
    model: str | None = None
    target: str = "cpu"
    backend: str | None = None
    quant: str | None = None
    plan: str | None = None
    out: str = "out"
    force: bool = False
    n_ctx: int | None = None
    kv_dtype: str | None = None
    check: bool = True


def runtime_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("llama-cpp-python", "gguf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def decide(graph: Graph, backend: str, preset: str, user_plan: Plan | None, plan_path: str | None,
           ctx: Context) -> Plan:
    passes = [AssignPreset(preset)]
    if user_plan is not None:
        passes.append(ApplyRules(user_plan, plan_path))
    passes.append(Legalize())
    _, plan = run_passes(passes, graph, Plan(), ctx)
    return plan


def export(opts: ExportOptions, progress: Callable | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    profile: DeviceProfile = get_profile(opts.target)
    check_output_dir(opts.out, opts.force)
    user_plan = load_plan(opts.plan) if opts.plan else None
    if opts.quant and user_plan and user_plan.preset and user_plan.preset != opts.quant:
        raise EdgeqError(opts.plan, f"plan says preset {user_plan.preset!r} but --quant says {opts.quant!r}")

    t0 = time.perf_counter()
    model_path = resolve_model_path(opts.model)
    graph = import_model(model_path)
    timings["import"] = time.perf_counter() - t0

    backend = opts.backend or profile.backend_for(graph.kind)
    if backend not in ("gguf", "onnx"):
        raise EdgeqError(None, f"--backend {backend} is not available yet (available: gguf, onnx)")
    preset = (opts.quant or (user_plan.preset if user_plan else None) or profile.default_quant[backend]).lower()
    if backend == "onnx":
        from edgeq.export_onnx import export_onnx

        return export_onnx(opts, graph, model_path, profile, user_plan, preset, progress, log, timings, t_start)
    if graph.kind != "decoder":
        raise EdgeqError(model_path, f"the gguf backend carries decoders; this is an {graph.kind} (use --backend onnx)")
    kv_dtype = opts.kv_dtype or ("f32" if preset == "f32" else profile.kv_cache_dtype)
    n_ctx = int(opts.n_ctx or min(profile.n_ctx, graph.config.context_length))

    ctx = Context(backend=backend, profile=profile, progress=progress)
    t0 = time.perf_counter()
    plan = decide(graph, backend, preset, user_plan, opts.plan, ctx)
    timings["passes"] = time.perf_counter() - t0

    from edgeq.tokenizer import spec_from_gguf_metadata, spec_to_json

    spec = spec_from_gguf_metadata(graph.metadata.get("gguf", {}), model_path)
    log(f"exporting {graph.metadata.get('name')} ({graph.n_params:,} params) for {profile.name} "
        f"as {backend} {preset}")

    with staged_dir(opts.out, opts.force) as tmp:
        from edgeq.targets.gguf import write_gguf

        t0 = time.perf_counter()
        model_file = tmp / MODEL_FILE[backend]
        written = write_gguf(graph, plan, model_file, spec_to_json(spec), progress=progress)
        timings["lower"] = time.perf_counter() - t0

        spec_file = tmp / "tokenizer_spec.json"
        spec_file.write_text(json.dumps(spec_to_json(spec), ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")

        src_sha = sha256_file(model_path)
        model_bytes = model_file.stat().st_size
        from edgeq.formats import get_format

        weight_bytes = sum(get_format(plan.tensors[n].format).nbytes(t.shape) for n, t in graph.weights.items())
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "edgeq_version": __version__,
            "runtime_versions": runtime_versions(),
            "model": {
                "name": graph.metadata.get("name"),
                "arch": graph.arch,
                "kind": graph.kind,
                "n_params": graph.n_params,
                "weight_bytes": weight_bytes,
                "bits_per_weight": 8 * weight_bytes / graph.n_params,
                "config": graph.config.to_json(),
            },
            "source": {
                "name": _source_name(model_path, opts.model),
                "sha256": src_sha,
                "bytes": model_path.stat().st_size,
                "license": graph.metadata.get("license"),
                "adapters": [],
            },
            "target": profile.to_json(),
            "n_ctx": n_ctx,
            "kv_cache_dtype": kv_dtype,
            "artifacts": [
                {"role": "model", "backend": backend, "path": model_file.name, "sha256": sha256_file(model_file),
                 "bytes": model_bytes, "formats": written},
                {"role": "tokenizer", "backend": "any", "path": spec_file.name, "sha256": sha256_file(spec_file),
                 "bytes": spec_file.stat().st_size, "formats": {}},
            ],
            "tokenizer": {"spec": spec_file.name, "bos_id": spec.bos_id, "eos_id": spec.eos_id, "eot_id": spec.eot_id,
                          "add_bos": spec.add_bos, "chat_template": spec.chat_template is not None},
            "plan": plan.to_json(),
            "passes": ctx.records,
            "predicted": {"latency_ms_per_token": None, "peak_memory_bytes": None},
            "pruning_rates": None,
            "reference": {"path": "reference", "prompts": 2},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n", encoding="utf-8")

        t0 = time.perf_counter()
        measurements = {"host": {"machine": platform.machine(), "python": platform.python_version()},
                        "timings_s": {}}
        _reference_and_check(graph, tmp, manifest, measurements, opts.check)
        timings["reference_and_check"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        measurements["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        (tmp / "measurements.json").write_text(json.dumps(measurements, indent=1) + "\n", encoding="utf-8")

        from edgeq.report import plot_layers, write_report

        plot = "formats_by_layer.png"
        plot_layers(graph, plan, tmp / plot)
        write_report(tmp / "report.md", manifest, measurements, graph, plan, plot)
    return {"out": str(opts.out), "manifest": manifest, "measurements": measurements}


def _source_name(path: Path, given: str | None) -> str:
    if given is None:
        from edgeq.models.default import DEFAULT_NAME

        return DEFAULT_NAME
    return path.name


def _reference_and_check(graph: Graph, bundle: Path, manifest: dict, measurements: dict, check: bool) -> None:
    """Float reference logits for the bundled prompts, and the same prompts through the real runtime."""
    from edgeq.executor import Executor
    from edgeq.reference import compare_logits, reference_token_ids, write_reference
    from edgeq import runtime

    session = runtime.load(bundle, threads=max(1, min(4, os.cpu_count() or 1)), n_ctx=256)
    try:
        ids = reference_token_ids(lambda s: session.tokenize(s, add_special=True, parse_special=False))
        ex = Executor(graph)
        ref = [ex.run(i) for i in ids]
        write_reference(bundle / "reference", ids, ref)
        if check:
            got = [session.logits(i) for i in ids]
            measurements["reference_check"] = {"backend": session.backend_name, **compare_logits(ref, got)}
    finally:
        session.close()
