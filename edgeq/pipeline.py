"""`edgeq export`: import, decide (passes), lower (target), check, and write a bundle atomically."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeq import __version__
from edgeq.errors import EdgeqError
from edgeq.fsutil import check_output_dir, sha256_file, sha256_source, source_bytes, staged_dir
from edgeq.importers.loader import graph_tokenizer_spec, import_model, resolve_model_path
from edgeq.ir import Graph
from edgeq.passes import Context, run_passes
from edgeq.passes.apply_rules import ApplyRules
from edgeq.passes.assign_preset import AssignPreset
from edgeq.passes.legalize import Legalize
from edgeq.plan import Plan, load_plan
from edgeq.runtime.manifest import BUNDLE_FORMAT, BUNDLE_VERSION
from edgeq.targets.profiles import DeviceProfile, get_profile

MODEL_FILE = {"gguf": "model.gguf"}
RUNTIME_DISTS = {"gguf": ("llama-cpp-python", "gguf"), "onnx": ("onnxruntime", "onnx")}


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
    # calibration: presets and plans are calibration-aware unless turned off
    calibration: bool = True
    imatrix: str | None = None             # bring a llama.cpp imatrix file instead of calibrating
    calib_windows: int = 4                 # 512-token windows of calibration text
    calib_images: Any = None               # CNNs: .npz path (array `images`, NCHW float32) or an array, for static int8
    # budgeted mixed precision (`edgeq plan` and `edgeq export` share these)
    budget_mb: float | None = None         # 10^6 bytes of all model files written
    bpw: float | None = None               # 8 x those bytes / source parameters
    method: str = "ilp"
    formats: list[str] | None = None       # candidate formats (default: every format the backend carries)
    ranks: list[int] = field(default_factory=lambda: [0])
    lowrank_scaling: str = "exact"         # S of the low-rank branches: exact | diag | identity
    cost: str = "auto"                     # sensitivity cost: output error, or x output Fisher; auto: fisher when torch is here
    ties: list[str] = field(default_factory=list)   # "qkv", "gate_up": tensors that must share a format
    adapters: list[str] = field(default_factory=list)   # PEFT LoRA "DIR" or "DIR:WEIGHT", merged in this order
    ndk_clang: str | None = None           # tvm on android: the NDK clang that links a .so (else a .tar of objects)
    tune_trials: int = 0                   # tvm: meta-schedule trials (0: untuned, deterministic)


def manifest_head(graph: Graph, plan: Plan, versions: dict[str, str]) -> dict[str, Any]:
    """The manifest fields every backend writes the same way; bpw counts the bytes the formats really write."""
    from edgeq.formats import get_format

    weight_bytes = sum(get_format(plan.tensors[n].format).nbytes(t.shape) for n, t in graph.weights.items())
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "edgeq_version": __version__,
        "runtime_versions": versions,
        "model": {
            "name": graph.metadata.get("name"),
            "arch": graph.arch,
            "kind": graph.kind,
            "n_params": graph.n_params,
            "weight_bytes": weight_bytes,
            "bits_per_weight": 8 * weight_bytes / graph.n_params,
            "config": graph.config.to_json(),
        },
    }


def runtime_versions(dists: tuple[str, ...] = ("llama-cpp-python", "gguf")) -> dict[str, str]:
    """Versions of the runtime libraries a bundle was written and checked with (recorded in the manifest)."""
    from importlib import metadata

    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def import_and_merge(model: str | None, adapters: list[str], ctx: Context) -> tuple[Path, Graph]:
    """Import the source model and merge its LoRA adapters (lazily: nothing is loaded yet)."""
    model_path = resolve_model_path(model)
    graph = import_model(model_path)
    if adapters:
        from edgeq.passes.merge_adapters import MergeAdapters

        graph, _ = run_passes([MergeAdapters(adapters)], graph, Plan(), ctx)
    return model_path, graph


@dataclass
class Decision:
    plan: Plan
    calibration: Any = None          # a passes.calibrate.Calibration, or None (llama.cpp's plain behaviour)
    branches: dict = field(default_factory=dict)   # low-rank error branches {weight: (A, B)} (adapter GGUF)


def _preset_takes_imatrix(graph: Graph, preset: str) -> bool:
    """Whether any format of `preset` on this model uses an importance matrix (else calibrating is wasted)."""
    from edgeq.formats import get_format
    from edgeq.models import llama
    from edgeq.targets.gguf.presets import TensorInfo, preset_types

    cfg = graph.config
    infos = [TensorInfo(t.alias or llama.gguf_name(n), tuple(reversed(t.shape))) for n, t in graph.weights.items()]
    for has in (False, True):
        for c in preset_types(preset, infos, cfg.n_heads, cfg.n_kv_heads, has_imatrix=has).values():
            if get_format(c.type).takes_imatrix:
                return True
    return False


def budgeted(opts: ExportOptions) -> bool:
    return opts.budget_mb is not None or opts.bpw is not None


def decide(graph: Graph, backend: str, preset: str | None, user_plan: Plan | None, plan_path: str | None,
           ctx: Context, opts: ExportOptions | None = None, tokenizer: dict | None = None,
           branches: bool = True) -> Decision:
    """Run the passes that make the plan: calibrate, then a preset or a budgeted allocation, then the user's rules."""
    from edgeq.passes.calibrate import Calibrate

    opts = opts or ExportOptions(calibration=False)
    if opts.imatrix and not opts.calibration:
        raise EdgeqError(opts.imatrix, "--imatrix and --no-calibration contradict each other")
    search = budgeted(opts)
    if search and user_plan is not None:
        raise EdgeqError(plan_path, "give either --plan or a budget (--budget-mb / --bpw), not both")
    if search and opts.method not in ("ilp", "dynaquant"):
        raise EdgeqError(None, f"unknown --method {opts.method!r} (ilp, dynaquant)")
    passes = []
    ranks = search and any(opts.ranks) or user_plan is not None and any(t.rank for t in user_plan.tensors.values())
    if opts.calibration and (search or ranks or opts.imatrix or _takes_imatrix(graph, preset, user_plan)):
        # Only a budgeted search and low-rank branches read full input covariances; a preset needs the
        # importance matrix (their diagonals), and on a big model the covariances alone cost gigabytes.
        passes.append(Calibrate(n_windows=opts.calib_windows, imatrix_file=opts.imatrix,
                                **({} if search or ranks else {"max_full": 0})))
    if search:
        passes += _search_passes(graph, backend, opts, tokenizer, ctx)
    elif preset is not None:
        passes.append(_PresetAfterCalibration(preset))
    if user_plan is not None:
        passes.append(ApplyRules(user_plan, plan_path))
    passes.append(Legalize())
    if ranks and branches:         # (`edgeq plan` only writes the plan: no branch is needed)
        from edgeq.passes.lowrank_compensate import LowrankCompensate

        passes.append(LowrankCompensate(None if user_plan is not None else opts.lowrank_scaling))
    _, plan = run_passes(passes, graph, Plan(), ctx)
    cal = ctx.analysis.get("calibration")
    plan.calibration = None if cal is None else {**cal.to_json(), "calib_windows_requested": opts.calib_windows}
    return Decision(plan, cal, ctx.analysis.get("branches", {}))


def _takes_imatrix(graph: Graph, preset: str | None, user_plan: Plan | None) -> bool:
    from edgeq.formats import get_format

    if preset is not None and _preset_takes_imatrix(graph, preset):
        return True
    if user_plan is not None:
        used = [t.format for t in user_plan.tensors.values()] + [r.format for r in user_plan.rules]
        return any(get_format(f).takes_imatrix for f in used)
    return False


class _PresetAfterCalibration(AssignPreset):
    """AssignPreset that knows whether calibration ran (llama.cpp picks some types differently with an imatrix)."""

    def run(self, graph, plan, ctx):
        self.has_imatrix = "calibration" in ctx.analysis
        return super().run(graph, plan, ctx)


def file_layout(graph: Graph, backend: str, opts: ExportOptions, tokenizer: dict | None):
    """The backend's size model (passes/sensitivity.FileLayout) for the candidate formats and ranks of `opts`."""
    with_branches = any(r > 0 for r in opts.ranks)
    if backend == "gguf":
        from edgeq.targets.gguf.layout import gguf_layout

        if tokenizer is None:
            from edgeq.tokenizer import spec_to_json

            tokenizer = spec_to_json(graph_tokenizer_spec(graph))
        return gguf_layout(graph, tokenizer, with_branches)
    if backend == "onnx" and graph.kind == "decoder":
        from edgeq.passes.sensitivity import candidate_formats
        from edgeq.targets.onnx.layout import onnx_layout

        return onnx_layout(graph, candidate_formats(backend, opts.formats), opts.ranks)
    if backend == "tvm" and graph.kind == "decoder":
        from edgeq.passes.sensitivity import candidate_formats
        from edgeq.targets.tvm.layout import tvm_layout

        if opts.tune_trials:
            raise EdgeqError(None, "--tune-trials with a budget: a tuned library's size is not known when the plan "
                                   "is sized; export the budgeted plan untuned")
        return tvm_layout(graph, candidate_formats(backend, opts.formats), opts.ranks, get_profile(opts.target),
                          opts.ndk_clang or os.environ.get("EDGEQ_ANDROID_CLANG") or None)
    raise EdgeqError(None, f"budgeted plans for backend {backend!r} ({graph.kind}s) are not available yet "
                           "(gguf, onnx and tvm decoders are)")


def search_cost(opts: ExportOptions, ctx: Context) -> str:
    """The sensitivity cost a budgeted plan uses. By default the Fisher-weighted output error (in KLD units,
    bench/results/additivity_groups.json), which needs torch at plan time; without torch, or without
    calibration, the plain output error, with a one-line note."""
    if opts.cost != "auto":
        return opts.cost
    if not opts.calibration:
        return "output"
    try:
        import torch  # noqa: F401
        return "fisher"
    except ImportError:
        pass
    note = ("note: torch is not installed, so the plan's costs are the plain output error tr(dW C dW^T) "
            "(pip install 'edgeq[search]' for Fisher-weighted costs)")
    ctx.record("sensitivity", note=note)
    if ctx.progress is not None:
        import sys

        print(note, file=sys.stderr)
    return "output"


def _search_passes(graph: Graph, backend: str, opts: ExportOptions, tokenizer: dict | None, ctx: Context) -> list:
    from edgeq.models import llama
    from edgeq.passes.allocate import Allocate, budget_bytes, budget_error, min_feasible_bytes
    from edgeq.passes.sensitivity import CostTable, Sensitivity, bytes_table

    if any(r < 0 for r in opts.ranks):
        raise EdgeqError(None, "--ranks must be non-negative integers")
    # the budget in bytes needs only the parameter count: check it before anything is sized
    budget = budget_bytes(CostTable({}, 0, graph.n_params), opts.budget_mb, opts.bpw)
    layout = file_layout(graph, backend, opts, tokenizer)
    ties = llama.fused_groups(graph, opts.ties)
    # feasibility needs only the bytes: check it before any calibration or cost is computed
    sizes = bytes_table(graph, layout, opts.formats)
    if budget < min_feasible_bytes(sizes, ties):
        raise budget_error(sizes, budget, ties)
    passes = []
    cost = search_cost(opts, ctx)
    if cost == "fisher":
        from edgeq.passes.fisher import Fisher

        passes.append(Fisher())
    elif cost != "output":
        raise EdgeqError(None, f"unknown --cost {opts.cost!r} (auto, output, fisher)")
    passes.append(Sensitivity(layout, formats=opts.formats, ranks=opts.ranks, scaling=opts.lowrank_scaling))
    if opts.method == "dynaquant":
        from edgeq.passes.allocate_dynaquant import AllocateDynaQuant

        if any(opts.ranks):
            raise EdgeqError(None, "--method dynaquant chooses formats only; use --ranks with --method ilp")
        passes.append(AllocateDynaQuant(budget, ties, exact_bytes=layout.exact_bytes))
        return passes
    passes.append(Allocate(budget, ties, adapter_overhead=layout.branch_overhead, exact_bytes=layout.exact_bytes))
    return passes


def export(opts: ExportOptions, progress: Callable | None = None, log: Callable[[str], None] = lambda s: None,
           graph: Graph | None = None) -> dict:
    """Export `opts.model`, or `graph` when the caller imported it already (export_module)."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    profile: DeviceProfile = get_profile(opts.target)
    check_output_dir(opts.out, opts.force)
    user_plan = load_plan(opts.plan) if opts.plan else None
    if opts.quant and user_plan and user_plan.preset and user_plan.preset != opts.quant:
        raise EdgeqError(opts.plan, f"plan says preset {user_plan.preset!r} but --quant says {opts.quant!r}")
    if opts.quant and budgeted(opts):
        raise EdgeqError(None, "give either --quant or a budget (--budget-mb / --bpw), not both")

    t0 = time.perf_counter()
    # every family lowers to gguf today; the context's backend is set again once the graph is known
    ctx = Context(backend=opts.backend or "gguf", profile=profile, progress=progress)
    if graph is None:
        model_path, graph = import_and_merge(opts.model, opts.adapters, ctx)
    else:
        model_path = None
    timings["import"] = time.perf_counter() - t0

    backends = profile.backends_to_export(graph.kind, opts.backend)
    for b in backends:
        if b not in ("gguf", "onnx", "tvm"):
            raise EdgeqError(None, f"--backend {b} is not available yet (available: gguf, onnx, tvm, all)")
    ctx.backend = backends[0]
    if backends == ["tvm"]:
        preset = choose_preset(opts, user_plan, profile, "tvm")
        decision = None
        if preset is None:      # a budget, or a budgeted plan: the passes every backend's search shares
            if graph.kind != "decoder":
                raise EdgeqError(None, f"budgeted plans (--budget-mb / --bpw) are for decoders only for now; use "
                                       f"--quant with this {graph.kind}")
            from edgeq.tokenizer import spec_to_json

            t0 = time.perf_counter()
            decision = decide(graph, "tvm", None, user_plan, opts.plan, ctx, opts,
                              spec_to_json(graph_tokenizer_spec(graph)))
            timings["passes"] = time.perf_counter() - t0
        from edgeq.export_tvm import export_tvm

        return export_tvm(opts, graph, model_path, profile, user_plan, preset, progress, log, timings, t_start,
                          decision=decision, ctx=ctx if decision is not None else None)
    if "tvm" in backends:
        raise EdgeqError(None, "a bundle with several backends cannot include tvm yet; export it with --backend tvm")
    if graph.kind != "decoder":
        if backends != ["onnx"]:
            raise EdgeqError(model_path, f"the gguf backend carries decoders; this is an {graph.kind} (use --backend onnx)")
        preset = choose_preset(opts, user_plan, profile, "onnx")
        if preset is None:
            raise EdgeqError(None, f"budgeted plans (--budget-mb / --bpw) are for decoders only for now; use --quant "
                                   f"with this {graph.kind}")
        from edgeq.export_onnx import export_onnx

        return export_onnx(opts, graph, model_path, profile, user_plan, preset, progress, log, timings, t_start)
    presets = {b: backend_preset(opts, user_plan, profile, b, len(backends) > 1) for b in backends}
    kv_dtype = opts.kv_dtype or ("f32" if presets.get("gguf", "f32") == "f32" else profile.kv_cache_dtype)
    n_ctx = int(opts.n_ctx or min(profile.n_ctx, graph.config.context_length))

    from edgeq.tokenizer import spec_to_json

    spec = graph_tokenizer_spec(graph)
    t0 = time.perf_counter()
    decisions: dict[str, Decision] = {}
    for b in backends:
        ctx.backend = b
        first = len(ctx.records)
        if b == "gguf" or presets[b] is None:     # a preset, or for every backend a budget or a searched plan
            decisions[b] = decide(graph, b, presets[b], user_plan, opts.plan, ctx, opts, spec_to_json(spec))
        else:
            from edgeq.export_onnx import decide_onnx

            onnx_plan = decide_onnx(graph, presets[b], user_plan, opts.plan, ctx, opts=opts)
            decisions[b] = Decision(onnx_plan, ctx.analysis.get("calibration") if onnx_plan.calibration else None)
        for r in ctx.records[first:]:
            r.setdefault("backend", b)
    backend = backends[0]
    decision = decisions[backend]
    plan = decision.plan
    timings["passes"] = time.perf_counter() - t0
    what = (f"{plan.search['method']} plan for {plan.search['budget_mb']:.3f} MB" if plan.search and budgeted(opts)
            else " + ".join(f"{b} {presets[b] or 'plan'}" for b in backends))
    log(f"exporting {graph.metadata.get('name')} ({graph.n_params:,} params) for {profile.name} as {what}")

    with staged_dir(opts.out, opts.force) as tmp:
        t0 = time.perf_counter()
        artifacts: list[dict[str, Any]] = []
        for b in backends:
            if b == "gguf":
                from edgeq.targets.gguf import write_gguf

                model_file = tmp / MODEL_FILE[b]
                cal = decisions[b].calibration
                imatrix = cal.imatrix() if cal is not None else None
                written = write_gguf(graph, decisions[b].plan, model_file, spec_to_json(spec), imatrix=imatrix,
                                     progress=progress)
                artifacts.append({"role": "model", "backend": b, "path": model_file.name,
                                  "sha256": sha256_file(model_file), "bytes": model_file.stat().st_size,
                                  "formats": written})
                if decisions[b].branches:
                    from edgeq.targets.gguf.adapter import ADAPTER_FILE, write_adapter

                    adapter = tmp / ADAPTER_FILE
                    write_adapter(graph, decisions[b].branches, adapter)
                    artifacts.append({"role": "adapter", "backend": b, "path": adapter.name,
                                      "sha256": sha256_file(adapter), "bytes": adapter.stat().st_size,
                                      "formats": {"f16": 2 * len(decisions[b].branches)},
                                      "applies_to": model_file.name, "kind": "lora (low-rank error compensation)"})
            else:
                from edgeq.export_onnx import write_onnx

                cal = decisions[b].calibration
                artifacts += write_onnx(graph, decisions[b].plan, tmp, progress,
                                        **({"imatrix": cal.imatrix()} if cal is not None else {}),
                                        **({"branches": decisions[b].branches} if decisions[b].branches else {}))
        timings["lower"] = time.perf_counter() - t0
        if budgeted(opts):
            _check_budget(decisions, artifacts)

        spec_file = tmp / "tokenizer_spec.json"
        spec_file.write_text(json.dumps(spec_to_json(spec), ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
        artifacts.append({"role": "tokenizer", "backend": "any", "path": spec_file.name,
                          "sha256": sha256_file(spec_file), "bytes": spec_file.stat().st_size, "formats": {}})

        src_sha = sha256_source(model_path)
        manifest: dict[str, Any] = {
            **manifest_head(graph, plan, runtime_versions(sum((RUNTIME_DISTS[b] for b in backends), ()))),
            "source": {
                "name": _source_name(model_path, opts.model),
                "sha256": src_sha,
                "bytes": source_bytes(model_path),
                "license": graph.metadata.get("license"),
                "adapters": graph.metadata.get("adapters", []),
            },
            "target": profile.to_json(),
            "n_ctx": n_ctx,
            "kv_cache_dtype": kv_dtype if "gguf" in backends else "f32",
            "artifacts": artifacts,
            "tokenizer": {"spec": spec_file.name, "bos_id": spec.bos_id, "eos_id": spec.eos_id, "eot_id": spec.eot_id,
                          "add_bos": spec.add_bos, "chat_template": spec.chat_template is not None},
            "calibration": calibration_record(decision, opts),
            "plan": plan.to_json(),
            "passes": ctx.records,
            "predicted": {"latency_ms_per_token": None, "peak_memory_bytes": None},
            "pruning_rates": None,
            "reference": {"path": "reference", "prompts": 2},
        }
        if len(backends) > 1:   # each artifact's own plan (the first is also `plan`)
            manifest["plans"] = {b: decisions[b].plan.to_json() for b in backends}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n", encoding="utf-8")

        t0 = time.perf_counter()
        measurements = {"host": {"machine": platform.machine(), "python": platform.python_version()},
                        "timings_s": {}}
        _reference_and_check(graph, tmp, manifest, measurements, opts.check)
        timings["reference_and_check"] = time.perf_counter() - t0
        if budgeted(opts) and opts.check:      # the plan's measured point beside the presets' (edgeq/pareto.py)
            from edgeq.pareto import plan_pareto

            t0 = time.perf_counter()
            measurements["pareto"] = plan_pareto(tmp, manifest, str(model_path), opts.adapters,
                                                 ctx=min(512, graph.config.context_length))
            timings["pareto_eval"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        measurements["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        (tmp / "measurements.json").write_text(json.dumps(measurements, indent=1) + "\n", encoding="utf-8")

        from edgeq.report import plot_layers, write_report

        plot = "formats_by_layer.png"
        plot_layers(graph, plan, tmp / plot)
        write_report(tmp / "report.md", manifest, measurements, graph, plan, plot)
    return {"out": str(opts.out), "manifest": manifest, "measurements": measurements}


def _check_budget(decisions: dict[str, Decision], artifacts: list[dict[str, Any]]) -> None:
    """Each backend's model files (adapters and external data included) within its plan's budget: the size
    models are exact, so a failure here is a bug, caught before the bundle is renamed into place."""
    for b, d in decisions.items():
        written = sum(a["bytes"] for a in artifacts if a["backend"] == b and a["role"] != "tokenizer")
        if d.plan.search and written > d.plan.search["budget_bytes"]:
            raise EdgeqError(None, f"{b} files are {written} bytes, over the budget of "
                                   f"{d.plan.search['budget_bytes']} bytes (predicted {d.plan.search['predicted_bytes']})")


def export_module(module, example, out: str | os.PathLike, quant: str | None = None, calib_images=None,
                  target: str = "cpu", plan: str | None = None, force: bool = False, check: bool = True,
                  name: str | None = None, progress: Callable | None = None, backend: str = "onnx") -> dict:
    """Export a torch CNN (eval mode, `example` one NCHW float32 batch) to an ONNX (or `backend="tvm"`) bundle,
    like `edgeq export`.

    `calib_images`: an .npz path (array `images`) or an (n, C, H, W) array; static `int8` needs it."""
    from edgeq.importers.torch_export import import_module

    graph = import_module(module, example, name=name or type(module).__name__)
    opts = ExportOptions(target=target, backend=backend, quant=quant, plan=plan, out=os.fspath(out), force=force,
                         check=check, calib_images=calib_images)
    return export(opts, progress=progress, graph=graph)


def backend_preset(opts: ExportOptions, user_plan: Plan | None, profile: DeviceProfile, backend: str,
                   several: bool) -> str | None:
    """The preset of one backend; with several backends `--quant` may be `gguf=q4_0,onnx=int4` (one per backend), a
    preset every backend knows (f32, f16), or absent (each backend's profile default)."""
    quant = opts.quant or ""
    if "=" in quant:
        pairs = dict(p.split("=", 1) for p in quant.split(",") if "=" in p)
        if backend not in pairs:
            raise EdgeqError(None, f"--quant {quant} names no preset for backend {backend}")
        from dataclasses import replace as _replace

        return choose_preset(_replace(opts, quant=pairs[backend]), user_plan, profile, backend)
    preset = choose_preset(opts, user_plan, profile, backend)
    if several and opts.quant and preset not in known_presets(backend):
        raise EdgeqError(None, f"--quant {opts.quant} is not a {backend} preset; with several backends give one per "
                               "backend, e.g. --quant gguf=q4_0,onnx=int4")
    return preset


def known_presets(backend: str) -> tuple[str, ...]:
    if backend == "onnx":
        from edgeq.targets.onnx.presets import ONNX_PRESETS

        return ONNX_PRESETS
    if backend == "tvm":
        from edgeq.targets.tvm.presets import TVM_PRESETS

        return TVM_PRESETS
    from edgeq.targets.gguf.presets import GGUF_PRESETS

    return GGUF_PRESETS


def choose_preset(opts: ExportOptions, user_plan: Plan | None, profile: DeviceProfile, backend: str) -> str | None:
    if budgeted(opts):
        return None
    if user_plan is not None and user_plan.preset is None and user_plan.search is not None:
        return None          # a budgeted plan decides every tensor itself
    return (opts.quant or (user_plan.preset if user_plan else None) or profile.default_quant[backend]).lower()


def calibration_record(decision: Decision, opts: ExportOptions) -> dict[str, Any]:
    cal = decision.calibration
    if cal is not None:
        return {"enabled": True, "imatrix": "importance matrix (E[x^2] per input channel) passed to ggml's "
                                            "quantizer for every type that takes one", **cal.to_json()}
    if not opts.calibration:
        return {"enabled": False, "reason": "--no-calibration: llama.cpp's plain quantization (no imatrix)"}
    return {"enabled": False, "reason": "no format in this plan uses an importance matrix"}


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
        # streamed: each weight is loaded once for all prompts and dropped, so a model far larger than
        # the RAM left beside the runtime's own mapping of the exported file still gets its reference
        ref = Executor(graph, cache_weights=False).logits_many(ids)
        write_reference(bundle / "reference", ids, ref)
        if check:
            got = [session.logits(i) for i in ids]
            measurements["reference_check"] = {"backend": session.backend_name, **compare_logits(ref, got)}
    finally:
        session.close()
    others = [a["backend"] for a in manifest["artifacts"] if a.get("role") == "model"][1:]
    if check and others:   # every artifact of a multi-backend bundle, on the same ids
        checks = {measurements["reference_check"]["backend"]: measurements["reference_check"]}
        for b in others:
            with runtime.load(bundle, backend=b, threads=max(1, min(4, os.cpu_count() or 1)), n_ctx=256,
                              verify=False) as s:
                checks[b] = {"backend": b, **compare_logits(ref, [s.logits(i) for i in ids])}
        measurements["reference_checks"] = checks
