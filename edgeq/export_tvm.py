"""`edgeq export --backend tvm`: decide (preset, user plan, legalize), lower to Relax, build for the profile, write a bundle.

The bundle layout is the ONNX one (manifest, tokenizer, reference inputs with float
outputs, measurements, report); the TVM artifact is the library plus its weights
file, and the manifest's `tvm` section says how to call it (entry, inputs, the
weights' parameter order, the target it was built for).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.bundle_tail import copy_encoder_tokenizer, file_artifact, finish_bundle
from edgeq.errors import EdgeqError
from edgeq.fsutil import staged_dir
from edgeq.ir import Graph
from edgeq.passes import Context
from edgeq.passes.assign_preset import preset_plan
from edgeq.plan import Plan

LIBRARY_STEM = "model"
PARAMS_FILE = "params.safetensors"


def decide_tvm(graph: Graph, preset: str, user_plan: Plan | None, plan_path: str | None, ctx: Context,
               opts=None) -> Plan:
    """Preset, the user's rules, legalize; for decoders, the importance matrix of the formats that take one
    (int4_g32: ggml's Q4_0 scale search) exactly as the ONNX export gets it (passes/calibrate.imatrix_calibration;
    `opts` carries --no-calibration / --imatrix / --calib-windows). Encoders and CNNs have no calibration text
    here: their int4 is plain Q4_0."""
    plan = preset_plan(graph, preset, user_plan, plan_path, ctx)
    if graph.kind == "decoder":
        from edgeq.passes.calibrate import imatrix_calibration

        imatrix_calibration(graph, plan, ctx, opts)
    return plan


def runtime_versions() -> dict[str, str]:
    from edgeq.pipeline import runtime_versions as versions

    return versions(("apache-tvm", "apache-tvm-ffi"))


def save_params(params: dict[str, np.ndarray], path: Path) -> None:
    """safetensors (no pickle; the reader bounds every length); its layout depends only on names and arrays."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(path))


def host_can_run(profile) -> bool:
    """Whether this machine can load the profile's library itself (to check the export against the reference)."""
    from edgeq.targets.tvm.build import resolve_target

    t = resolve_target(profile)
    if t["kind"] == "cuda":
        import tvm

        return bool(tvm.cuda(0).exist)
    return "mtriple" not in t and profile.os == platform.system().lower()


def export_tvm(opts, graph: Graph, model_path: Path, profile, user_plan: Plan | None, preset: str | None,
               progress: Callable | None, log: Callable[[str], None], timings: dict[str, float],
               t_start: float, decision=None, ctx: Context | None = None) -> dict:
    """`decision` (with the `ctx` that made it): a budgeted plan from pipeline.decide, else `preset` decides."""
    from edgeq.export_onnx import REFERENCE_SENTENCES, cnn_calibration, cnn_reference_images, source_record
    from edgeq.targets.tvm.build import compile_module, export_library, library_kind, resolve_target
    from edgeq.targets.tvm.lower import ENTRY, lower_tvm

    from edgeq.pipeline import Decision, _check_budget, budgeted

    if decision is None:
        ctx = Context(backend="tvm", profile=profile, progress=progress)
        t0 = time.perf_counter()
        plan = decide_tvm(graph, preset, user_plan, opts.plan, ctx, opts)
        decision = Decision(plan, ctx.analysis.get("calibration") if plan.calibration else None)
        timings["passes"] = time.perf_counter() - t0
    plan = decision.plan
    what = preset or (f"{plan.search['method']} plan for {plan.search['budget_mb']:.3f} MB"
                      if plan.search and budgeted(opts) else "plan")
    ndk_clang = getattr(opts, "ndk_clang", None) or os.environ.get("EDGEQ_ANDROID_CLANG") or None
    target = resolve_target(profile)
    log(f"exporting {graph.metadata.get('name')} ({graph.n_params:,} params) for {profile.name} as tvm {what} "
        f"({json.dumps(target, sort_keys=True)}, {library_kind(profile, ndk_clang)})")

    t0 = time.perf_counter()
    lowered = lower_tvm(graph, plan, progress=progress,
                        imatrix=decision.calibration.imatrix() if decision.calibration is not None else None,
                        branches=decision.branches or None)
    timings["lower"] = time.perf_counter() - t0
    tuning_db, trials = None, int(getattr(opts, "tune_trials", 0) or 0)
    if trials:
        from edgeq.targets.tvm.tune import tune, tuning_target

        t0 = time.perf_counter()
        target = tuning_target(target)
        tuning_db = tune(lowered.mod, target, profile, trials, host_can_run(profile), log)
        timings["tune"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    executable = compile_module(lowered.mod, target, tuning_db)
    timings["compile"] = time.perf_counter() - t0
    source = source_record(graph, model_path, opts.model)
    ref_images = None
    if graph.kind == "cnn":   # the first calibration images when given (weight-only presets need none), else noise
        ref_images = cnn_reference_images(graph, cnn_calibration(graph, getattr(opts, "calib_images", None))[0])
    if graph.kind == "decoder":              # what `edgeq eval` checks a decoder's reference against
        from edgeq.fsutil import sha256_source, source_bytes

        source = {**source, "sha256": sha256_source(model_path), "bytes": source_bytes(model_path)}
    with staged_dir(opts.out, opts.force) as tmp:
        lib = export_library(executable, tmp / LIBRARY_STEM, profile, ndk_clang)
        save_params(lowered.params, tmp / PARAMS_FILE)
        artifacts: list[dict[str, Any]] = [
            file_artifact(lib, "model", "tvm", plan.format_counts()),
            file_artifact(tmp / PARAMS_FILE, "params", "tvm",
                          {"f16": 2 * len(decision.branches)} if decision.branches else {})]
        if budgeted(opts):        # library + params within the budget, as planned (the size model builds it)
            _check_budget({"tvm": decision}, artifacts)
        tokenizer: dict[str, Any] = {}
        if graph.kind == "encoder":
            tokenizer = copy_encoder_tokenizer(graph, tmp, artifacts)
        elif graph.kind == "decoder":
            tokenizer = _write_decoder_tokenizer(graph, tmp, artifacts)
        entries = {"entry": ENTRY}
        if graph.kind == "decoder":
            from edgeq.targets.tvm.decoder import ENTRIES

            entries = {"entry": ENTRIES[0], "decode_entry": ENTRIES[1], "max_positions": graph.config.context_length}
        from edgeq.pipeline import calibration_record

        runnable = host_can_run(profile)
        manifest, measurements = finish_bundle(
            tmp, graph, plan, ctx, profile, versions=runtime_versions(), source=source,
            n_ctx=_n_ctx(opts, graph, profile), kv_cache_dtype="f32" if graph.kind == "decoder" else None,
            artifacts=artifacts, tokenizer=tokenizer,
            sections={**({"calibration": calibration_record(decision, opts)} if graph.kind == "decoder" else {}),
                      "tvm": {"library": lib.name, "params": PARAMS_FILE, **entries, "target": target,
                              "tune_trials": trials, "inputs": lowered.inputs, "outputs": lowered.outputs,
                              "param_names": lowered.param_names}},
            reference=({"path": "reference", "prompts": 2} if graph.kind == "decoder" else
                       {"path": "reference", "inputs": len(REFERENCE_SENTENCES) if ref_images is None else
                        len(ref_images)}),
            check=opts.check, ref_images=ref_images, timings=timings, t_start=t_start,
            not_run=None if runnable else f"library is for {profile.name}, not this host",
            decoder_reference=lambda manifest, measurements: decoder_reference_and_check(
                graph, tmp, manifest, measurements, opts.check, runnable))
    return {"out": str(opts.out), "manifest": manifest, "measurements": measurements}


def _n_ctx(opts, graph: Graph, profile) -> int | None:
    n = int(getattr(graph.config, "context_length", 0)) or None
    if graph.kind == "decoder":
        n = int(getattr(opts, "n_ctx", None) or min(profile.n_ctx, n))
        if n > graph.config.context_length:
            raise EdgeqError(None, f"--n-ctx {n} exceeds the model's context length {graph.config.context_length}")
    return n


def _write_decoder_tokenizer(graph: Graph, tmp: Path, artifacts: list) -> dict:
    """The tokenizer spec file of a decoder bundle, as the GGUF export writes it (Session reads it)."""
    from edgeq.importers.loader import graph_tokenizer_spec
    from edgeq.tokenizer import spec_to_json

    spec = graph_tokenizer_spec(graph)
    spec_file = tmp / "tokenizer_spec.json"
    spec_file.write_text(json.dumps(spec_to_json(spec), ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    artifacts.append(file_artifact(spec_file, "tokenizer", "any"))
    return {"spec": spec_file.name, "bos_id": spec.bos_id, "eos_id": spec.eos_id, "eot_id": spec.eot_id,
            "add_bos": spec.add_bos, "chat_template": spec.chat_template is not None}


def decoder_reference_and_check(graph: Graph, bundle: Path, manifest: dict, measurements: dict, check: bool,
                                runnable: bool) -> None:
    """The GGUF bundles' reference prompts and logits; checked in the TVM runtime when the library runs here."""
    if runnable:
        from edgeq.pipeline import _reference_and_check

        _reference_and_check(graph, bundle, manifest, measurements, check)
        return
    from edgeq.executor import Executor
    from edgeq.importers.loader import graph_tokenizer_spec
    from edgeq.reference import reference_token_ids, write_reference
    from edgeq.tokenizer import build_tokenizer, encode

    spec = graph_tokenizer_spec(graph)
    tok = build_tokenizer(spec)
    ids = reference_token_ids(lambda s: encode(tok, spec, s, add_special=True, parse_special=False))
    write_reference(bundle / "reference", ids, Executor(graph, cache_weights=False).logits_many(ids))
