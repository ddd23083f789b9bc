"""Device profiles: what `--target` names.

A profile says what the device is (ISA, OS), which backend serves each model
kind there, the default preset per backend, and run-time defaults (context
length, KV-cache type, threads) that the manifest records for the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgeq.core.errors import EdgeqError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    isa: str
    os: str
    tvm_target: Any
    backends: dict[str, str] = field(default_factory=dict)          # model kind -> preferred backend
    default_quant: dict[str, str] = field(default_factory=dict)     # backend -> preset
    n_ctx: int = 2048
    kv_cache_dtype: str = "f16"
    threads: int = 4
    # arm64 profiles: the -march edgeq's native runner (bin/edgeq-run) is built for; None: no native runner
    native_march: str | None = None
    # what `--backend all` writes per model kind (one artifact each, the preferred backend first)
    all_backends: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "decoder": ("gguf", "onnx"), "encoder": ("onnx",), "cnn": ("onnx",)})

    def to_json(self) -> dict[str, Any]:
        """The manifest's `target`. The native runner's -march is left out: a bundle that carries the runner
        records it in its `native` section, and the other bundles' manifests stay as they were."""
        d = asdict(self)
        del d["native_march"]
        return d

    def backend_for(self, kind: str) -> str:
        return self.backends.get(kind, "gguf")

    def backends_to_export(self, kind: str, backend: str | None) -> list[str]:
        """The backends an export writes: the one asked for, the profile's choice, or with "all" every one the
        profile lists for this model kind (its preferred backend first)."""
        if backend != "all":
            return [backend or self.backend_for(kind)]
        listed = list(self.all_backends.get(kind, (self.backend_for(kind),)))
        first = self.backend_for(kind)
        return ([first] if first in listed else []) + [b for b in listed if b != first]


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in [
        DeviceProfile(
            name="cpu", description="the host's x86-64 CPU", isa="x86_64", os="linux", tvm_target="llvm",
            backends={"decoder": "gguf", "encoder": "onnx", "cnn": "onnx"},
            default_quant={"gguf": "q8_0", "onnx": "int8", "tvm": "int8"},
            n_ctx=4096, threads=4,
        ),
        DeviceProfile(
            name="android", description="Android phone, arm64-v8a (NEON, dotprod)", isa="arm64", os="android",
            tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
            backends={"decoder": "gguf", "encoder": "onnx", "cnn": "onnx"},
            # q4_k_m, not q4_0: on the default model q4_0 measures KLD 0.24 vs 0.054 for +0.8 bpw
            # (bench/presets.py). q4_0 stays the speed-first choice (llama.cpp repacks it for arm64).
            default_quant={"gguf": "q4_k_m", "onnx": "int8", "tvm": "int4"},
            n_ctx=2048, threads=4, native_march="armv8.2-a+dotprod",
        ),
        DeviceProfile(
            name="linux-arm64", description="arm64 Linux board (Raspberry Pi 5 class)", isa="arm64", os="linux",
            tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
            backends={"decoder": "gguf", "encoder": "onnx", "cnn": "onnx"},
            default_quant={"gguf": "q4_k_m", "onnx": "int8", "tvm": "int4"},
            n_ctx=2048, threads=4, native_march="armv8.2-a+dotprod",     # Cortex-A76 (Pi 5): dotprod
        ),
        DeviceProfile(
            name="cuda", description="NVIDIA GPU", isa="x86_64", os="linux", tvm_target="cuda",
            backends={"decoder": "gguf", "encoder": "onnx", "cnn": "onnx"},
            default_quant={"gguf": "q8_0", "onnx": "f16", "tvm": "int4"},
            n_ctx=4096, threads=1,
        ),
    ]
}


def get_profile(name: str) -> DeviceProfile:
    p = PROFILES.get(name)
    if p is None:
        raise EdgeqError(None, f"unknown --target {name!r}; device profiles: {', '.join(PROFILES)}")
    return p
