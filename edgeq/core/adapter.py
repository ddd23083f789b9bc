"""A LoRA adapter kept apart from the base (`--adapter-mode separate`), as the targets receive it.

The compiler reads PEFT folders (passes/merge_adapters.py); a target only needs each changed weight's
factors, so this is plain data: targets write it in their runtime's adapter format without knowing PEFT.
Factors are canonical (Hugging Face layout): A (r, in) and B (out, r), with PEFT's per-module scale
(alpha / r, or alpha / √r with rsLoRA, rank_pattern and alpha_pattern included) already folded into B, so
the runtime's one per-adapter scale is the user's weight alone (1 = the adapter as trained).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edgeq.core.errors import EdgeqError

# An adapter's name becomes part of a file name and a manifest key: keep it to a safe alphabet.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
ADAPTER_MODES = ("merged", "separate")


def check_adapter_name(name: str, where=None) -> str:
    if not ADAPTER_NAME.match(name) or name.endswith("."):
        raise EdgeqError(where, f"adapter name {name!r} must be 1-64 letters, digits, '_', '-' or '.' (starting with "
                                "a letter or digit); name it with DIR=NAME")
    return name


@dataclass
class LoraAdapter:
    """One unmerged adapter: what each target writes beside its base artifact and the manifest lists."""

    name: str
    scale: float                          # the default weight the runtime applies it with
    rank: int                             # the largest rank of its modules
    targets: list[str]                    # canonical weights it changes, in graph order
    modules: list[str]                    # PEFT's module leaf names (q_proj, down_proj, ...), sorted
    source_sha256: str                    # adapter_model.safetensors
    config_sha256: str                    # adapter_config.json
    dtype: str                            # what the factors are stored as: f32, or f16 for half-precision sources
    load_factors: Callable[[], dict[str, tuple[np.ndarray, np.ndarray]]] = field(repr=False)

    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{canonical weight: (A (r, in), B·scale (out, r))} float32, loaded now."""
        return self.load_factors()

    def entry(self) -> dict[str, Any]:
        """The fields every backend's artifact entry for this adapter carries."""
        return {"name": self.name, "method": "lora", "rank": self.rank, "scale": self.scale, "modules": self.modules,
                "tensors": len(self.targets), "dtype": self.dtype,
                "source_sha256": self.source_sha256,
                "config_sha256": self.config_sha256}


@dataclass
class SparseAdapter:
    """A SHiRA adapter kept apart: a few base weights changed, applied in place over the base on the device and
    undone exactly (the values it overwrote are kept)."""

    name: str
    scale: float
    targets: list[str]
    modules: list[str]
    nnz: int                              # entries in all
    source_sha256: str
    config_sha256: str
    load_entries: Callable[[], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = field(repr=False)

    def entries(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """{canonical weight: (rows, cols, values)}: int64, int64, float32 (PEFT's scaling folded in)."""
        return self.load_entries()

    def entry(self) -> dict[str, Any]:
        return {"name": self.name, "method": "shira", "nnz": self.nnz, "scale": self.scale, "modules": self.modules,
                "tensors": len(self.targets), "source_sha256": self.source_sha256,
                "config_sha256": self.config_sha256}


UserAdapter = LoraAdapter | SparseAdapter


def lora_slots(weights: list[str], adapters: list[UserAdapter]) -> list[str]:
    """The weights a backend gives run-time LoRA inputs: every weight some LoRA adapter of the bundle changes, in
    graph order (`weights`). An adapter added later (edgeq add-adapter) must change only these."""
    wanted = {t for a in adapters if isinstance(a, LoraAdapter) for t in a.targets}
    return [n for n in weights if n in wanted]
