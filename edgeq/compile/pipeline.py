"""The one compile pipeline: options -> import + merge -> passes -> each target's lowering -> one bundle.

`export` writes a bundle for every backend the options name (one, or `--backend all`), whatever the model
kind; `plan` stops after the passes and returns the plan an export would use. Everything a backend knows
comes from its Target (targets/registry.py); everything a bundle holds is written by edgeq/bundle/.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeq.bundle.manifest import MODEL_ROLES, ManifestParts, calibration_record, manifest, write_manifest
from edgeq.bundle.native import add_native, native_runner
from edgeq.bundle.pareto import plan_pareto
from edgeq.bundle.reference import reference_and_check, reference_images, reference_record
from edgeq.bundle.report import plot_layers, write_report
from edgeq.bundle.source import requantize_note, requantized_tensors, source_record
from edgeq.bundle.tokenizer import write_tokenizer
from edgeq.compile.decide import DecideInputs, Decision, decide
from edgeq.compile.options import ExportOptions, backend_preset, bundle_n_ctx
from edgeq.compile.speed import speed_beside_preset
from edgeq.core.errors import EdgeqError
from edgeq.core.fs import check_output_dir, output_lock, staged_dir
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan, load_plan
from edgeq.importers.calibration_text import calibration_source
from edgeq.importers.images import calibration_images
from edgeq.importers.loader import graph_tokenizer_spec, import_model, resolve_model_path
from edgeq.models.recipes.default import DEFAULT_NAME
from edgeq.passes import Context, run_passes
from edgeq.core.adapter import UserAdapter
from edgeq.passes.merge_adapters import MergeAdapters, load_adapter, unmerged
from edgeq.predictor.predict import latency_profile_backend, manifest_prediction
from edgeq.targets.base import LowerRequest, Target
from edgeq.targets.profiles import DeviceProfile, get_profile
from edgeq.targets.registry import TARGETS, get_target

LAYER_PLOT = "formats_by_layer.png"


def import_and_merge(model: str | None, adapters: list[str], ctx: Context,
                     log: Callable[[str], None] | None = None) -> tuple[Path, Graph]:
    """Import the source model and merge its LoRA adapters (lazily: nothing is loaded yet). Forgetting the model
    must not pass unnoticed: `log` hears which one is used instead."""
    if model is None and log is not None:
        log(f"edgeq: no --model given: using the embedded default model {DEFAULT_NAME} (SmolLM2-135M-Instruct)")
    model_path = resolve_model_path(model)
    graph = import_model(model_path)
    if adapters:
        graph, _ = run_passes([MergeAdapters(adapters)], graph, Plan(), ctx)
    return model_path, graph


def separate_adapters(graph: Graph, args: list[str]) -> list[UserAdapter]:
    """The adapters kept apart from the base, each checked against it (shapes, modules) and uniquely named."""
    if graph.arch != "llama":
        raise EdgeqError(graph.metadata.get("source_path"),
                         f"LoRA adapters apply to llama-family decoders; this model is {graph.arch}")
    out: list[UserAdapter] = []
    for arg in args:
        ad = load_adapter(arg, graph)
        if any(o.name == ad.name for o in out):
            raise EdgeqError(ad.path, f"a second adapter named {ad.name!r}; name them apart with DIR=NAME")
        out.append(unmerged(ad, graph))
    return out


@dataclass
class Compilation:
    """An imported model and what the options decide for it before any pass runs."""

    graph: Graph
    model_path: Path | None
    profile: DeviceProfile
    targets: list[Target]
    inputs: dict[str, DecideInputs]       # per target
    ctx: Context
    adapters: list[UserAdapter]           # kept apart from the base (--adapter-mode separate)


def prepare(opts: ExportOptions, progress: Callable | None, graph: Graph | None, several_allowed: bool,
            log: Callable[[str], None] | None = None) -> Compilation:
    """Check the options, import the model (unless given), pick the targets and their presets."""
    profile = get_profile(opts.target)
    user_plan = load_plan(opts.plan) if opts.plan else None
    opts.check_against(user_plan)
    if opts.backend == "all" and not several_allowed:
        raise EdgeqError(None, f"a plan is for one backend; pass --backend {', '.join(TARGETS)}")
    text = calibration_source(opts.calib_text, opts.calib_jsonl)
    ctx = Context(backend=opts.backend or "gguf", profile=profile, progress=progress, log=log)
    model_path = None
    if graph is None:
        model_path, graph = import_and_merge(opts.model, opts.merged_adapters, ctx, log)
    adapters = separate_adapters(graph, opts.adapters) if opts.adapter_mode == "separate" else []
    targets = [get_target(b) for b in profile.backends_to_export(graph.kind, opts.backend)]
    several = len(targets) > 1
    for t in targets:
        if several and not t.joins_bundles:
            raise EdgeqError(None, f"a bundle with several backends cannot include {t.name} yet; export it with "
                                   f"--backend {t.name}")
        if opts.budgeted and graph.kind not in t.budget_kinds:
            kinds = " and ".join(f"{k}s" for k in sorted(t.budget_kinds)) or f"no model kind on {t.name}"
            raise EdgeqError(None, f"budgeted plans (--budget-mb / --bpw) are for {kinds} only for now; use --quant "
                                   f"with this {graph.kind}")
        t.check(graph, profile, budgeted=opts.budgeted, n_ctx=opts.n_ctx, tune_trials=opts.tune_trials)
        for ad in adapters:
            t.check_adapter(ad)
    spec = graph_tokenizer_spec(graph) if graph.kind == "decoder" else None
    images, images_source = (calibration_images(graph, opts.calib_images) if graph.kind == "cnn" else (None, None))
    inputs = {t.name: DecideInputs(t, backend_preset(opts, user_plan, profile, t, several), profile, user_plan, spec,
                                   images, images_source, text) for t in targets}
    return Compilation(graph, model_path, profile, targets, inputs, ctx, adapters)


def decide_all(c: Compilation, opts: ExportOptions, branches: bool = True) -> dict[str, Decision]:
    """Each target's decision, in bundle order, sharing one context (and so one calibration)."""
    decisions = {}
    # a model kind that can be bundled with several backends says which backend each pass record decided for
    tag = len(c.profile.all_backends.get(c.graph.kind, ())) > 1
    for t in c.targets:
        c.ctx.backend = t.name
        first = len(c.ctx.records)
        decisions[t.name] = decide(c.graph, c.inputs[t.name], opts, c.ctx, branches)
        if tag and t.name in c.profile.all_backends[c.graph.kind]:
            for r in c.ctx.records[first:]:
                r.setdefault("backend", t.name)
        _check_requantize(c, decisions[t.name].plan, opts)
    return decisions


def _check_requantize(c: Compilation, plan: Plan, opts: ExportOptions) -> None:
    """A quantized source quantized again: one line on stderr, or a refusal with --no-requantize (as
    llama-quantize refuses without --allow-requantize)."""
    note = requantize_note(c.graph, plan)
    if note is None:
        return
    moved = requantized_tensors(c.graph, plan)
    if moved and not opts.allow_requantize:
        first = next(iter(moved))
        raise EdgeqError(c.graph.metadata.get("source_path"),
                         f"is already quantized and this plan requantizes {sum(map(len, moved.values()))} tensors "
                         f"({first}: {moved[first][0]} ...); --no-requantize refuses (keep their source formats in "
                         "a plan, or export a float source)")
    c.ctx.warn(note)


def decisions(opts: ExportOptions, progress: Callable | None = None,
              branches: bool = True) -> tuple[Graph, dict[str, Decision]]:
    """The model and the decision `export` would make for each backend, without writing anything."""
    c = prepare(opts, progress, None, several_allowed=True)
    return c.graph, decide_all(c, opts, branches)


def plan(opts: ExportOptions, progress: Callable | None = None, log: Callable[[str], None] | None = None) -> Plan:
    """The plan `export` would use with these options (low-rank branches are not computed: only the plan)."""
    c = prepare(opts, progress, None, several_allowed=False, log=log)
    return decide_all(c, opts, branches=False)[c.targets[0].name].plan


def export(opts: ExportOptions, progress: Callable | None = None, log: Callable[[str], None] = lambda s: None,
           graph: Graph | None = None) -> dict:
    """Export `opts.model`, or `graph` when the caller imported it already (export_module). The output path is
    locked for the whole export and the bundle is staged beside it and renamed into place (core/fs.py)."""
    check_output_dir(opts.out, opts.force)
    with output_lock(opts.out):
        return _export(opts, progress, log, graph)


def _export(opts: ExportOptions, progress: Callable | None, log: Callable[[str], None], graph: Graph | None) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    check_output_dir(opts.out, opts.force)
    t0 = time.perf_counter()
    c = prepare(opts, progress, graph, several_allowed=True, log=log)
    timings["import"] = time.perf_counter() - t0
    graph, profile, targets, first = c.graph, c.profile, c.targets, c.targets[0]
    t0 = time.perf_counter()
    runner = native_runner(opts.native, profile, first, graph.kind, log)
    if runner is not None:
        timings["native_runner"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decisions = decide_all(c, opts)
    timings["passes"] = time.perf_counter() - t0
    plan_ = decisions[first.name].plan
    graph = decisions[first.name].graph or graph      # what the passes made of it (sorted or narrowed MLPs)
    what = (f"{plan_.search['method']} plan for {plan_.search['budget_mb']:.3f} MB" if plan_.search and opts.budgeted
            else " + ".join(f"{t.name} {c.inputs[t.name].preset or 'plan'}" for t in targets))
    log(f"exporting {graph.metadata.get('name')} ({graph.n_params:,} params) for {profile.name} as {what} "
        f"{' '.join(t.describe(profile, opts.android_clang) for t in targets)}".rstrip())
    cannot_run = first.cannot_run_here(profile)
    spec = c.inputs[first.name].spec
    images = c.inputs[first.name].calibration
    ref_images = reference_images(graph, images) if graph.kind == "cnn" else None

    with staged_dir(opts.out, opts.force) as tmp:
        t0 = time.perf_counter()
        artifacts, sections = [], {}
        for t in targets:
            d = decisions[t.name]
            lowered = t.lower(LowerRequest(d.written or d.graph or c.graph, d.plan, tmp, profile,
                                           imatrix=d.calibration.imatrix() if d.calibration is not None else None,
                                           branches=d.branches, spec=spec, n_ctx=bundle_n_ctx(graph, profile, opts),
                                           ndk_clang=opts.android_clang,
                                           tune_trials=opts.tune_trials, adapters=c.adapters, progress=progress,
                                           log=log))
            artifacts += lowered.artifacts
            if lowered.section is not None:
                sections[t.name] = lowered.section
            timings.update(lowered.timings)
            artifacts += [t.lower_adapter(graph, ad, tmp) for ad in c.adapters]
        timings.setdefault("lower", time.perf_counter() - t0)
        if opts.budgeted:
            _check_budget(decisions, artifacts)
        if runner is not None:
            native_files, sections["native"] = add_native(tmp, profile, runner, first.name)
            artifacts += native_files
        predicted = _prediction(opts, graph, profile, decisions, c.inputs, artifacts)
        tokenizer_file, tokenizer = write_tokenizer(graph, spec, tmp)
        if tokenizer_file is not None:
            artifacts.append(tokenizer_file)

        m = manifest(ManifestParts(
            graph=graph, plan=plan_, plans={t.name: decisions[t.name].plan for t in targets},
            versions={k: v for t in targets for k, v in t.runtime_versions().items()},
            source=source_record(graph, c.model_path, opts.model, plan_), target=profile.to_json(),
            n_ctx=bundle_n_ctx(graph, profile, opts),
            kv_cache_dtype=(first.kv_cache_dtype(c.inputs[first.name].preset, profile, opts.kv_dtype)
                            if graph.kind == "decoder" else None),
            artifacts=[a.entry() for a in artifacts], tokenizer=tokenizer,
            calibration=(calibration_record(decisions[first.name].calibration, opts.calibration)
                         if graph.kind == "decoder" else None),
            sections=sections, passes=c.ctx.records,
            reference=(reference_record(graph, ref_images, images is not None) if opts.reference else None),
            predicted=predicted))
        write_manifest(tmp, m)

        t0 = time.perf_counter()
        measurements: dict[str, Any] = {"host": {"machine": platform.machine(), "python": platform.python_version()}}
        if opts.reference:
            reference_and_check(graph, tmp, [t.name for t in targets], measurements, opts.check, cannot_run, spec,
                                ref_images)
        else:
            measurements["reference_check"] = {"backend": first.name, "skipped": "no reference outputs were asked for"}
        timings["reference_and_check"] = time.perf_counter() - t0
        if opts.budgeted and opts.check and cannot_run is None:   # the plan's measured point beside the presets'
            t0 = time.perf_counter()
            measurements["pareto"] = plan_pareto(tmp, m, str(c.model_path), opts.merged_adapters,
                                                 ctx=min(512, graph.config.context_length))
            timings["pareto_eval"] = time.perf_counter() - t0
        if opts.budgeted and opts.check and cannot_run is None:   # what the plan costs in speed, beside a preset
            t0 = time.perf_counter()
            model_file = next(a.path for a in artifacts if a.role == "model" and a.backend == first.name)
            speed = speed_beside_preset(graph, first, plan_, model_file, profile, decisions[first.name].calibration,
                                        spec)
            if speed is not None:
                measurements["speed"] = speed
                timings["speed"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        measurements["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        (tmp / "measurements.json").write_text(json.dumps(measurements, indent=1) + "\n", encoding="utf-8")
        plot = None
        if graph.kind == "decoder":
            plot = LAYER_PLOT
            plot_layers(graph, plan_, tmp / plot)
        write_report(tmp / "report.md", m, measurements, graph, plan_, plot)
    return {"out": str(opts.out), "manifest": m, "measurements": measurements}


def _prediction(opts: ExportOptions, graph: Graph, profile: DeviceProfile, decisions: dict[str, Decision],
                inputs: dict[str, DecideInputs], artifacts: list) -> dict[str, Any] | None:
    """The manifest's `predicted`: what the latency profile predicts for the artifact of its backend."""
    if opts.latency_profile is None:
        return None
    backend = latency_profile_backend(opts.latency_profile)
    if backend not in decisions:
        raise EdgeqError(opts.latency_profile, f"this latency profile is for {backend}; the bundle has "
                                               f"{', '.join(decisions)}")
    t = inputs[backend].target
    return manifest_prediction(opts.latency_profile, graph, decisions[backend].plan, backend,
                               bundle_n_ctx(graph, profile, opts),
                               t.kv_cache_dtype(inputs[backend].preset, profile, opts.kv_dtype),
                               sum(a.path.stat().st_size for a in artifacts if a.backend == backend),
                               opts.prompt_tokens, opts.context_tokens)


def _check_budget(decisions: dict[str, Decision], artifacts: list) -> None:
    """Each backend's model files (error-branch adapters and external data included; users' adapters kept apart
    are not the base's) within its plan's budget: the size models are exact, so a failure here is a bug,
    caught before the bundle is renamed into place."""
    for b, d in decisions.items():
        written = sum(a.path.stat().st_size for a in artifacts
                      if a.backend == b and a.role in MODEL_ROLES)
        if d.plan.search and written > d.plan.search["budget_bytes"]:
            raise EdgeqError(None, f"{b} files are {written} bytes, over the budget of "
                                   f"{d.plan.search['budget_bytes']} bytes (predicted {d.plan.search['predicted_bytes']})")
