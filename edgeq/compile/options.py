"""What `edgeq export` and `edgeq plan` are asked to do, and the choices that follow from the options alone."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from edgeq.core.adapter import ADAPTER_MODES
from edgeq.core.errors import EdgeqError
from edgeq.core.plan import Plan
from edgeq.targets.base import Target
from edgeq.targets.profiles import DeviceProfile


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
    calib_text: str | None = None          # the user's calibration text: a UTF-8 file or a folder of them
    calib_jsonl: str | None = None         # ... or chat conversations (JSON lines), rendered with the chat template
    allow_requantize: bool = True          # False: refuse a source whose weights are already quantized
    # budgeted mixed precision (`edgeq plan` and `edgeq export` share these)
    budget_mb: float | None = None         # 10^6 bytes of all model files written
    bpw: float | None = None               # 8 x those bytes / source parameters
    method: str = "ilp"
    formats: list[str] | None = None       # candidate formats (default: every format the backend carries)
    ranks: list[int] = field(default_factory=lambda: [0])
    lowrank_scaling: str = "exact"         # S of the low-rank branches: exact | diag | identity
    cost: str = "auto"                     # sensitivity cost: output error, or x output Fisher; auto: fisher when torch is here
    ties: list[str] = field(default_factory=list)   # "qkv", "gate_up": tensors that must share a format
    adapters: list[str] = field(default_factory=list)   # PEFT LoRA "DIR[:WEIGHT][=NAME]", merged in this order
    adapter_mode: str = "merged"           # merged: into the float base; separate: files beside the quantized base
    ndk_clang: str | None = None           # tvm on android: the NDK clang that links a .so (else a .tar of objects)
    tune_trials: int = 0                   # tvm: meta-schedule trials (0: untuned, deterministic)

    @property
    def budgeted(self) -> bool:
        return self.budget_mb is not None or self.bpw is not None

    @property
    def android_clang(self) -> str | None:
        """The NDK clang to link Android libraries with: --ndk-clang, else $EDGEQ_ANDROID_CLANG."""
        return self.ndk_clang or os.environ.get("EDGEQ_ANDROID_CLANG") or None

    def check_against(self, user_plan: Plan | None) -> None:
        """Options that contradict each other or the plan file, refused before anything is imported."""
        if self.quant and user_plan and user_plan.preset and user_plan.preset != self.quant:
            raise EdgeqError(self.plan, f"plan says preset {user_plan.preset!r} but --quant says {self.quant!r}")
        if self.quant and self.budgeted:
            raise EdgeqError(None, "give either --quant or a budget (--budget-mb / --bpw), not both")
        if self.adapter_mode not in ADAPTER_MODES:
            raise EdgeqError(None, f"--adapter-mode must be one of {', '.join(ADAPTER_MODES)}, not {self.adapter_mode!r}")
        if self.adapter_mode == "separate" and not self.adapters:
            raise EdgeqError(None, "--adapter-mode separate needs at least one --adapter DIR")

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters folded into the float weights (none when they are kept apart)."""
        return self.adapters if self.adapter_mode == "merged" else []


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
