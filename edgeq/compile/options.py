"""What `edgeq export` and `edgeq plan` are asked to do, and the choices that follow from the options alone."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from edgeq.core.adapter import ADAPTER_MODES
from edgeq.core.errors import EdgeqError
from edgeq.core.plan import Plan
from edgeq.passes.search import SearchSettings
from edgeq.targets.base import Target
from edgeq.targets.profiles import DeviceProfile

CALIB_WINDOWS = 4
# A pruned export's channel orders and widths come from its calibration. On SmolLM2 at 15 % (bench/uniql.py, f32,
# held-out KLD, mean over 3 disjoint calibration subsets; uniql / wanda order): 4 windows 0.1209 / 0.1228, 8 windows
# 0.1129 / 0.1139 (every subset below every 4-window one), 16 windows 0.1112 / 0.1116 (no better beyond its
# subsets' spread, 0.009-0.010, at twice the calibration time). Calibration time grows with the windows.
PRUNING_CALIB_WINDOWS = 8
# GPTQ's writer inverts each linear's H = E[xxᵀ]; 4 windows (2,048 tokens) are ~1.3 samples per column of SmolLM2's
# 1536-wide down_proj inputs, and the damping then carries H. On the default model at 5.0 bpw (calibration-text proxy,
# 4,080 tokens) the plan's KLD went 0.0391 (4 windows) -> 0.0344 (16) -> 0.0333 (32); held-out at 5.46 bpw 0.0263 ->
# 0.0233. The planner keeps pricing through the calibration's windows (its cost table stays valid).
GPTQ_WINDOWS = 32


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
    reference: bool = True                 # write the reference inputs and float outputs (a device checks itself with them)
    # calibration: presets and plans are calibration-aware unless turned off
    calibration: bool = True
    imatrix: str | None = None             # bring a llama.cpp imatrix file instead of calibrating
    calib_windows: int | None = None       # 512-token windows of calibration text (None: see `windows`)
    calib_subset: tuple[int, int] = (0, 1)   # the i-th of n disjoint sets of calibration windows
    calib_images: Any = None               # CNNs: .npz path (array `images`, NCHW float32) or an array, for static int8
    calib_text: str | None = None          # the user's calibration text: a UTF-8 file or a folder of them
    calib_jsonl: str | None = None         # ... or chat conversations (JSON lines), rendered with the chat template
    allow_requantize: bool = True          # False: refuse a source whose weights are already quantized
    # budgeted mixed precision (`edgeq plan` and `edgeq export` share these)
    budget_mb: float | None = None         # 10^6 bytes of all model files written
    bpw: float | None = None               # 8 x those bytes / source parameters
    method: str = "ilp"                    # ilp | dynaquant | search (edgeq search: widths x formats, evolution)
    search: SearchSettings = field(default_factory=SearchSettings)   # method "search": how hard to search
    formats: list[str] | None = None       # candidate formats (default: every format the backend carries)
    ranks: list[int] = field(default_factory=lambda: [0])
    lowrank_scaling: str = "exact"         # S of the low-rank branches: exact | diag | identity
    # compensate each weight's block errors in its later columns (passes/gptq.py); None: on for budgeted plans
    # with calibration on a target that compensates by default (GGUF), off elsewhere
    gptq: bool | None = None
    gptq_act_order: bool = True            # GPTQ's blocks quantized in order of decreasing input energy
    gptq_sequential: bool = True           # GPTQ's H from the inputs the already-quantized layers produce
    gptq_windows: int | None = None        # the windows GPTQ's writer takes each layer's H from (None: calib_windows)
    gptq_conditional: bool = False         # GPTQ's quantizer weighted by what later columns cannot pay back
    gptq_aim: str = "quantized"            # GPTQ fits each layer to its output on the quantized inputs, or the float's
    gptq_tokens: str = "uniform"           # GPTQ's H: every token alike, or weighted by its output's Fisher (fisher)
    gptq_token_windows: int | None = None  # fisher: windows with a backward (None: all; the rest: mean weights)
    cost: str = "auto"                     # sensitivity cost: output error, or x output Fisher; auto: fisher when torch is here
    ties: list[str] = field(default_factory=list)   # "qkv", "gate_up": tensors that must share a format
    adapters: list[str] = field(default_factory=list)   # PEFT LoRA "DIR[:WEIGHT][=NAME]", merged in this order
    adapter_mode: str = "merged"           # merged: into the float base; separate: files beside the quantized base
    ndk_clang: str | None = None           # tvm on android: the NDK clang that links a .so (else a .tar of objects)
    tune_trials: int = 0                   # tvm: meta-schedule trials (0: untuned, deterministic)
    native: bool | None = None             # bin/edgeq-run in the bundle; None: where the profile has a native runner
    # latency: a profile measured by `edgeq profile` predicts the bundle (manifest `predicted`) and, with
    # latency_ms, bounds the plan's predicted decode step (or prefill of prompt_tokens) in the ILP
    latency_profile: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None       # with latency_ms: bound the prefill of this many tokens instead
    context_tokens: int | None = None      # tokens in the cache at the decode step predicted (default 64)

    # UniQL: one bundle, the MLP pruning rate chosen at load time (None: no pruning table)
    pruning_rates: list[float] | None = None
    prune_order: str = "uniql"             # uniql | leverage | magnitude | wanda | random
    prune_alloc: str = "uniql"             # uniql | uniform
    prune_ridge: float | None = None       # ridge/leverage orders: λ as a multiple of tr/n (None: uniql_sort.RIDGE)
    prune_temperature: float | None = None   # uniql alloc: softmax temperature (None: passes/uniql_alloc.TEMPERATURE)
    recover_steps: int = 0                 # masked LoRA steps over the pruning rates, merged back (needs torch)
    prune_attention: bool = False          # also the attention's head dimensions (Q/K RoPE pairs, V/O by SVD)
    # Q/K and V rates / the MLPs' rate (None: passes/uniql_alloc.ATTENTION_RATIO)
    prune_attention_ratio: tuple[float, float] | None = None
    # each rate's removed channels' mean output as a ffn_down bias (GGUF), covariance orders centered
    prune_compensate: bool = False

    @property
    def pruning(self) -> bool:
        return self.pruning_rates is not None

    def windows(self, user_plan: Plan | None = None) -> int:
        """The calibration windows used: --calib-windows, else CALIB_WINDOWS, or PRUNING_CALIB_WINDOWS when the export
        writes a pruning table (--pruning-rates, or a plan file carrying one: the windows that made it remake it)."""
        if self.calib_windows is not None:
            return self.calib_windows
        table = self.pruning or user_plan is not None and user_plan.pruning is not None
        return PRUNING_CALIB_WINDOWS if table else CALIB_WINDOWS

    @property
    def budgeted(self) -> bool:
        return self.budget_mb is not None or self.bpw is not None or self.latency_ms is not None

    @property
    def android_clang(self) -> str | None:
        """The NDK clang to link Android libraries with: --ndk-clang, else $EDGEQ_ANDROID_CLANG."""
        return self.ndk_clang or os.environ.get("EDGEQ_ANDROID_CLANG") or None

    def check_against(self, user_plan: Plan | None) -> None:
        """Options that contradict each other or the plan file, refused before anything is imported."""
        if self.quant and user_plan and user_plan.preset and user_plan.preset != self.quant:
            raise EdgeqError(self.plan, f"plan says preset {user_plan.preset!r} but --quant says {self.quant!r}")
        if self.quant and self.budgeted:
            raise EdgeqError(None, "give either --quant or a budget (--budget-mb / --bpw / --latency-ms), not both")
        if self.recover_steps and not self.pruning:
            raise EdgeqError(None, "--recover-steps fine-tunes for the bundle's pruning rates: give --pruning-rates")
        if self.prune_attention and not self.pruning:
            raise EdgeqError(None, "--prune-attention adds the attention to the table of --pruning-rates: give them")
        if self.prune_attention_ratio is not None and not self.prune_attention:
            raise EdgeqError(None, "--prune-attention-ratio is for --prune-attention")
        if self.prune_attention and self.recover_steps:
            raise EdgeqError(None, "--recover-steps masks the MLPs only; it is not combined with --prune-attention yet")
        if self.pruning and self.backend == "all":
            raise EdgeqError(None, "--pruning-rates writes one backend per bundle (the widths follow each backend's "
                                   "formats); export each backend with --backend gguf, onnx or tvm")
        if self.latency_ms is not None:
            if not self.latency_ms > 0:
                raise EdgeqError(None, "--latency-ms must be positive")
            if self.latency_profile is None:
                raise EdgeqError(None, "--latency-ms needs --latency-profile FILE (made by `edgeq profile`)")
        if self.prompt_tokens is not None and self.prompt_tokens < 1:
            raise EdgeqError(None, "--prompt-tokens must be at least 1")
        if self.context_tokens is not None and self.context_tokens < 0:
            raise EdgeqError(None, "--context-tokens must not be negative")
        if self.adapter_mode not in ADAPTER_MODES:
            raise EdgeqError(None, f"--adapter-mode must be one of {', '.join(ADAPTER_MODES)}, not "
                                   f"{self.adapter_mode!r}")
        if self.adapter_mode == "separate" and not self.adapters:
            raise EdgeqError(None, "--adapter-mode separate needs at least one --adapter DIR")
        if self.adapter_mode == "separate" and self.pruning:
            raise EdgeqError(None, "--adapter-mode separate with --pruning-rates is not supported yet (the adapters' "
                                   "shapes would have to follow each rate's widths)")

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters folded into the float weights (none when they are kept apart)."""
        return self.adapters if self.adapter_mode == "merged" else []


def bundle_n_ctx(graph, profile: DeviceProfile, opts: ExportOptions) -> int | None:
    """The context length a bundle records for the device: a decoder's --n-ctx or the profile's (within the
    model's); an encoder's own length; none for a CNN."""
    if graph.kind == "decoder":
        return int(opts.n_ctx or min(profile.n_ctx, graph.config.context_length))
    return int(getattr(graph.config, "context_length", 0)) or None


def choose_preset(opts: ExportOptions, user_plan: Plan | None, profile: DeviceProfile, backend: str) -> str | None:
    """The preset a backend starts from: --quant, the plan file's, or the profile's default; None when a budget
    or a budgeted plan decides every tensor itself."""
    if opts.budgeted:
        return None
    if user_plan is not None and user_plan.preset is None and user_plan.search is not None:
        return None
    return (opts.quant or (user_plan.preset if user_plan else None) or profile.default_quant[backend]).lower()


def backend_preset(opts: ExportOptions, user_plan: Plan | None, profile: DeviceProfile, target: Target,
                   several: bool) -> str | None:
    """The preset of one backend; with several backends `--quant` may be `gguf=q4_0,onnx=int4` (one per backend), a
    preset every backend knows (f32, f16), or absent (each backend's profile default)."""
    quant = opts.quant or ""
    if "=" in quant:
        pairs = dict(p.split("=", 1) for p in quant.split(",") if "=" in p)
        if target.name not in pairs:
            raise EdgeqError(None, f"--quant {quant} names no preset for backend {target.name}")
        return choose_preset(replace(opts, quant=pairs[target.name]), user_plan, profile, target.name)
    preset = choose_preset(opts, user_plan, profile, target.name)
    if several and opts.quant and preset not in target.presets:
        raise EdgeqError(None, f"--quant {opts.quant} is not a {target.name} preset; with several backends give one "
                               "per backend, e.g. --quant gguf=q4_0,onnx=int4")
    return preset
