"""The TVM target: a library built for the device profile (llvm x86/arm64/android, cuda) plus its weights.

A TVM artifact is two files: the compiled library (`.so`, or a `.tar` of objects for Android without an
NDK) and its weights (`params.safetensors`), which the entry function takes as parameters after the model
inputs. The manifest's `tvm` section says how to call it. Presets are weight-only (presets.py); each model
kind has its lowering (lower.py); build.py compiles and exports; tune.py runs meta-schedule.

TVM is a heavy import: this module imports it only when a TVM export, plan or size model runs.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from edgeq.bundle.manifest import Artifact
from edgeq.core.adapter import SparseAdapter, UserAdapter, lora_slots
from edgeq.core.errors import EdgeqError
from edgeq.core.formats import Format
from edgeq.core.ir import Graph
from edgeq.core.layout import FileLayout
from edgeq.core.plan import TensorPlan
from edgeq.targets.base import Lowered, LowerRequest, Target
from edgeq.targets.tvm.panel import PANEL
from edgeq.targets.tvm.presets import TVM_PRESETS, preset_formats

LIBRARY_STEM = "model"
PARAMS_FILE = "params.safetensors"


def save_params(params: dict[str, np.ndarray], path: Path) -> None:
    """safetensors (no pickle; the reader bounds every length); its layout depends only on names and arrays."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(path))


def lora_file(name: str) -> str:
    return f"lora-{name}.safetensors"


def shira_file(name: str) -> str:
    return f"shira-{name}.safetensors"


class TvmTarget(Target):
    name = "tvm"
    presets = TVM_PRESETS
    kinds = frozenset({"decoder", "encoder", "cnn"})
    budget_kinds = frozenset({"decoder"})
    runtime_dists = ("apache-tvm", "apache-tvm-ffi")
    joins_bundles = False         # its runtime selection beside other artifacts is not built yet
    sparse_adapters = True        # SHiRA entries added in place to f32/f16 parameters (runtime/tvm_decoder.py)
    prunes_mlp = True             # MLP widths symbolic in the library; the runtime slices the weights at load
    mlp_channel_multiple = PANEL  # a pruned gate or up keeps whole weight panels
    prunes_budgeted = False       # the size model builds static-width libraries, a pruning bundle's is symbolic
    prunes_attention_why = ("its library's head size and RoPE tables are fixed at build (symbolic widths cover the "
                            "MLP only)")

    def preset_formats(self, graph: Graph, preset: str, has_imatrix: bool = False) -> dict[str, TensorPlan]:
        return preset_formats(graph, preset)

    def check(self, graph: Graph, profile, *, budgeted: bool, n_ctx: int | None, tune_trials: int) -> None:
        super().check(graph, profile, budgeted=budgeted, n_ctx=n_ctx, tune_trials=tune_trials)
        if budgeted and tune_trials:
            raise EdgeqError(None, "--tune-trials with a budget: a tuned library's size is not known when the plan "
                                   "is sized; export the budgeted plan untuned")
        if graph.kind == "decoder" and n_ctx is not None and n_ctx > graph.config.context_length:
            raise EdgeqError(None, f"--n-ctx {n_ctx} exceeds the model's context length {graph.config.context_length}")

    def layout(self, graph: Graph, formats: list[Format], ranks: list[int], profile, *, spec=None,
               ndk_clang: str | None = None) -> FileLayout:
        from edgeq.targets.tvm.layout import tvm_layout

        return tvm_layout(graph, formats, ranks, profile, ndk_clang)

    def describe(self, profile, ndk_clang: str | None) -> str:
        from edgeq.targets.tvm.build import library_kind, resolve_target

        return f"({json.dumps(resolve_target(profile), sort_keys=True)}, {library_kind(profile, ndk_clang)})"

    def cannot_run_here(self, profile) -> str | None:
        from edgeq.targets.tvm.build import resolve_target

        t = resolve_target(profile)
        if t["kind"] == "cuda":
            import tvm

            runs = bool(tvm.cuda(0).exist)
        else:
            runs = "mtriple" not in t and profile.os == platform.system().lower()
        return None if runs else f"library is for {profile.name}, not this host"

    def lower_adapter(self, graph: Graph, adapter: UserAdapter, folder) -> Artifact:
        """A LoRA adapter's factors as the library's LoRA parameters take them: `<weight>.lora_a` Aᵀ (in, r) and
        `.lora_b` (B·scale)ᵀ (r, out), float32, in safetensors like the base's params. A SHiRA adapter's entries,
        `<weight>.shira_indices` (2, nnz) int32 (row, column of the (out, in) weight) and `.shira_weight`
        (nnz,) float32, which the runtime adds in place to the f32/f16 parameter (and takes back)."""
        from edgeq.targets.tvm.ops import lora_param_names

        if graph.kind != "decoder":
            raise EdgeqError(None, f"LoRA adapters apply to decoders; this is an {graph.kind}")
        if isinstance(adapter, SparseAdapter):
            entries = adapter.entries()
            arrays = {}
            for name in graph.weights:
                if name in entries:
                    rows, cols, vals = entries[name]
                    arrays[name + ".shira_indices"] = np.stack([rows, cols]).astype(np.int32)
                    arrays[name + ".shira_weight"] = np.ascontiguousarray(vals, np.float32)
            path = folder / shira_file(adapter.name)
            save_params(arrays, path)
            return Artifact("lora", path, self.name, {"f32": len(adapter.targets)},
                            {"applies_to": PARAMS_FILE, **adapter.entry()})
        factors = adapter.factors()
        arrays = {}
        for name in graph.weights:
            if name in factors:
                a, b = factors[name]
                an, bn = lora_param_names(name)
                arrays[an], arrays[bn] = np.ascontiguousarray(a.T, np.float32), np.ascontiguousarray(b.T, np.float32)
        path = folder / lora_file(adapter.name)
        save_params(arrays, path)
        return Artifact("lora", path, self.name, {"f32": 2 * len(adapter.targets)},
                        {"applies_to": PARAMS_FILE, **adapter.entry(), "dtype": "f32"})

    def lower(self, req: LowerRequest) -> Lowered:
        from edgeq.targets.tvm.build import compile_module, export_library, resolve_target
        from edgeq.targets.tvm.amx import amx_target, uses_amx
        from edgeq.targets.tvm.dot import dot_kind
        from edgeq.targets.tvm.lower import ENTRY, lower_tvm

        graph, plan, timings = req.graph, req.plan, {}
        target = resolve_target(req.profile)
        t0 = time.perf_counter()
        slots = lora_slots(list(graph.weights), req.adapters)
        dot = dot_kind(target)
        amx = amx_target(target, req.profile.tvm_target == "llvm") if graph.kind == "encoder" else None
        if dot == "vnni" and amx is not None:
            target, dot = amx, "amx"   # many-row linears on AMX tiles (amx.py); decoders' one-row decode stays VNNI
        lowered = lower_tvm(graph, plan, progress=req.progress, imatrix=req.imatrix, branches=req.branches or None,
                            lora_slots=slots, dot=dot,
                            fused_attention=target.get("kind") == "llvm", gpu=target.get("kind") == "cuda")
        timings["lower"] = time.perf_counter() - t0
        tuning_db = None
        if req.tune_trials:
            from edgeq.targets.tvm.tune import tune, tuning_target

            t0 = time.perf_counter()
            target = tuning_target(target)
            tuning_db = tune(lowered.mod, target, req.profile, req.tune_trials,
                             self.cannot_run_here(req.profile) is None, req.log)
            timings["tune"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        executable = compile_module(lowered.mod, target, tuning_db)
        timings["compile"] = time.perf_counter() - t0
        lib = export_library(executable, req.folder / LIBRARY_STEM, req.profile, req.ndk_clang)
        save_params(lowered.params, req.folder / PARAMS_FILE)
        entries: dict = {"entry": ENTRY}
        if graph.kind == "decoder":
            from edgeq.targets.tvm.decoder import ENTRIES, KV_CACHE, LAST_ONLY

            entries = {"entry": ENTRIES[0], "decode_entry": ENTRIES[1], "feed_entry": LAST_ONLY,
                       "max_positions": graph.config.context_length, "kv_cache": KV_CACHE}
        section = {"library": lib.name, "params": PARAMS_FILE, **entries, "target": target,
                   "tune_trials": req.tune_trials, "inputs": lowered.inputs, "outputs": lowered.outputs,
                   "param_names": lowered.param_names, **({"lora_slots": slots} if slots else {}),
                   **({"int8_kernels": "amx"} if uses_amx(lowered.mod) else {})}
        if graph.kind == "decoder" and plan.pruning:
            from edgeq.targets.tvm.decoder import pruning_recipe

            section["pruning"] = pruning_recipe(graph, lowered.params)
        return Lowered([Artifact("model", lib, self.name, plan.format_counts()),
                        Artifact("params", req.folder / PARAMS_FILE, self.name,
                                 {"f16": 2 * len(req.branches)} if req.branches else {})], section, timings)

