"""The bundle's manifest.json: one function writes every field, for every backend and model kind.

The manifest is part of what must be byte-identical for the same inputs, so its fields and their order
are decided here once; a target contributes its artifacts and its own section, nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeq import __version__
from edgeq.core.formats import get_format
from edgeq.core.fs import sha256_file
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.runtime.manifest import BUNDLE_FORMAT, BUNDLE_VERSION

MANIFEST_FILE = "manifest.json"
# the roles of the files that hold the model (what a budget counts); beside them: tokenizer and config files
MODEL_ROLES = ("model", "model_data", "params", "adapter")


@dataclass
class Artifact:
    """A file a target (or the bundle writer) put in the staged bundle, as the manifest lists it."""

    role: str                    # model, model_data, params, adapter (MODEL_ROLES), tokenizer, config, runner,
                                 # licences, launcher (a native runner and its files: edgeq/bundle/native.py)
    path: Path
    backend: str                 # the target's name, or "any"
    formats: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)   # role-specific fields (an adapter's applies_to, kind)
    rel: str | None = None       # its path in the bundle when not at the top (bin/edgeq-run)

    def entry(self) -> dict[str, Any]:
        return {"role": self.role, "backend": self.backend, "path": self.rel or self.path.name,
                "sha256": sha256_file(self.path),
                "bytes": self.path.stat().st_size, "formats": self.formats, **self.extra}


@dataclass
class ManifestParts:
    """What an export decided and wrote; `manifest()` lays it out."""

    graph: Graph
    plan: Plan                             # the first backend's plan (also `plans` per backend when several)
    plans: dict[str, Plan]
    versions: dict[str, str]
    source: dict[str, Any]
    target: dict[str, Any]                 # the device profile
    n_ctx: int | None
    kv_cache_dtype: str | None
    artifacts: list[dict[str, Any]]
    tokenizer: dict[str, Any]
    calibration: dict[str, Any] | None     # decoders: what the plan was calibrated on (or why not)
    sections: dict[str, Any]               # each target's own section, under its name
    passes: list[dict[str, Any]]
    reference: dict[str, Any] | None      # None: a bundle made without reference outputs (latency measurements)
    predicted: dict[str, Any] | None = None   # a latency profile's prediction (edgeq/predictor), else nulls


def manifest(p: ManifestParts) -> dict[str, Any]:
    """The manifest of a bundle; bits per weight count the bytes the formats really write."""
    graph = p.graph
    weight_bytes = sum(get_format(p.plan.tensors[n].format).nbytes(t.shape) for n, t in graph.weights.items())
    m: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "edgeq_version": __version__,
        "runtime_versions": p.versions,
        "model": {
            "name": graph.metadata.get("name"),
            "arch": graph.arch,
            "kind": graph.kind,
            "n_params": graph.n_params,
            "weight_bytes": weight_bytes,
            "bits_per_weight": 8 * weight_bytes / graph.n_params,
            "config": graph.config.to_json(),
        },
        "source": p.source,
        "target": p.target,
        "n_ctx": p.n_ctx,
        "kv_cache_dtype": p.kv_cache_dtype,
        "artifacts": p.artifacts,
        "tokenizer": p.tokenizer,
        **({} if p.calibration is None else {"calibration": p.calibration}),
        **p.sections,
        "plan": p.plan.to_json(),
        "passes": p.passes,
        "predicted": p.predicted or {"latency_ms_per_token": None, "peak_memory_bytes": None},
        "pruning_rates": pruning_rates(p.plan),
        "reference": p.reference,
    }
    if len(p.plans) > 1:   # each artifact's own plan (the first is also `plan`)
        m["plans"] = {b: plan.to_json() for b, plan in p.plans.items()}
    return m


def pruning_rates(plan: Plan) -> dict[str, Any] | None:
    """What a runtime needs to load the bundle at a pruning rate: per rate, each layer's MLP width (a prefix of the
    sorted channels), and each layer's alignment (a width is a multiple of it: whole blocks of every MLP format)."""
    t = plan.pruning
    if not t or not t.get("rates"):
        return None
    att = t.get("attention")
    out = {"what": t["what"], "order": t["order"], "alloc": t["alloc"], "full": t["full"], "align": t["align"],
           "rates": [{"rate": r["rate"], "achieved": r["achieved"], "widths": r["widths"],
                      **({"qk": r["qk"], "v": r["v"], "achieved_attention": r["achieved_attention"]} if att else {}),
                      **({"bias": r["bias"]} if "bias" in r else {})}
                     for r in t["rates"]]}
    if t.get("compensate"):   # --prune-compensate: each rate's per-layer ffn_down bias (runtime/manifest.py reads it)
        out["compensate"] = t["compensate"]
    if att:            # --prune-attention: each layer's Q/K and V head widths too (dimensions per head)
        out["attention"] = att
    return out


def write_manifest(folder: Path, m: dict[str, Any]) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(m, indent=1) + "\n", encoding="utf-8")


def calibration_record(calibration, enabled: bool) -> dict[str, Any]:
    """The manifest's `calibration`: what the importance matrix came from, or why there is none."""
    if calibration is not None:
        return {"enabled": True, "imatrix": "importance matrix (E[x^2] per input channel) passed to ggml's "
                                            "quantizer for every type that takes one", **calibration.to_json()}
    if not enabled:
        return {"enabled": False, "reason": "--no-calibration: llama.cpp's plain quantization (no imatrix)"}
    return {"enabled": False, "reason": "no format in this plan uses an importance matrix"}
