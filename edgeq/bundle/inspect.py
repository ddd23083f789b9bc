"""`edgeq inspect`: what is in a bundle, a GGUF file (model or imatrix), a Hugging Face folder, a PEFT adapter
folder, a .pt2 program or a plan, in a few flat fields. It is the command-line face of every reader: each input
gives its fields or one line naming the file and the problem (exit status 2)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.importers import hf_bert
from edgeq.importers.gguf_metadata import open_gguf, read_metadata
from edgeq.importers.hf import hf_tensors, import_hf, read_config
from edgeq.core.plan import load_plan
from edgeq.importers.safetensors_io import SafetensorsFile
from edgeq.importers.torch_export import import_pt2
from edgeq.passes.merge_adapters import WEIGHTS, adapter_config
from edgeq.runtime.manifest import read_manifest, verify_artifacts


def inspect_gguf(path: Path) -> dict[str, Any]:
    r = open_gguf(path)
    meta = read_metadata(r)
    types: dict[str, int] = {}
    n_params = 0
    nbytes = 0
    for t in r.tensors:
        types[t.tensor_type.name.lower()] = types.get(t.tensor_type.name.lower(), 0) + 1
        n_params += int(t.n_elements)
        nbytes += int(t.n_bytes)
    return {
        "kind": "gguf",
        "path": str(path),
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "license": meta.get("general.license"),
        "file_type": meta.get("general.file_type"),
        "n_tensors": len(r.tensors),
        "n_params": n_params,
        "tensor_bytes": nbytes,
        "bits_per_weight": round(8 * nbytes / max(n_params, 1), 4),
        "tensor_types": dict(sorted(types.items())),
        "tokenizer": meta.get("tokenizer.ggml.model"),
        "context_length": meta.get(f"{meta.get('general.architecture')}.context_length"),
    }


def inspect_hf(path: Path) -> dict[str, Any]:
    """A Hugging Face model folder: what edgeq reads from it (headers only, no weights loaded)."""
    tensors = hf_tensors(path)
    dtypes: dict[str, int] = {}
    for t in tensors.values():
        dtypes[t.dtype.lower()] = dtypes.get(t.dtype.lower(), 0) + 1
    out: dict[str, Any] = {
        "kind": "hf",
        "path": str(path),
        "model_type": read_config(path).get("model_type"),
        "n_params": sum(int(np.prod(t.shape)) for t in tensors.values()),
        "tensor_bytes": sum(t.nbytes for t in tensors.values()),
        "tensor_dtypes": dict(sorted(dtypes.items())),
        "shards": len({t.path.name for t in tensors.values()}),
    }
    if hf_bert.is_bert_folder(path):
        return out
    g = import_hf(path)
    spec = g.metadata["tokenizer_spec"]
    out.update({"name": g.metadata.get("name"), "license": g.metadata.get("license"), "n_params": g.n_params,
                "tokenizer": f"{spec.model} (pre {spec.pre}), {len(spec.tokens)} tokens",
                "context_length": g.config.context_length})
    return out


def _field(d: Any, *keys: str) -> Any:
    """d[k1][k2]... or None where a level is missing or not an object (a manifest edited by hand, say)."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _number(v: Any, digits: int = 4) -> Any:
    return round(v, digits) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def inspect_bundle(path: Path) -> dict[str, Any]:
    import json

    m = read_manifest(path)
    try:
        verify_artifacts(path, m)
        verified = "ok"
    except EdgeqError as exc:
        verified = f"FAILED: {exc}"
    meas_path = path / "measurements.json"
    try:
        meas = json.loads(meas_path.read_text(encoding="utf-8")) if meas_path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        meas = {}
    meas = meas if isinstance(meas, dict) else {}
    models = [a for a in m["artifacts"] if a.get("role", "model") == "model"]
    out = {
        "kind": "bundle",
        "path": str(path),
        "model": _field(m, "model", "name"),
        "target": _field(m, "target", "name"),
        "backends": [a["backend"] for a in models],
        "preset": _field(m, "plan", "preset"),
        "bits_per_weight": _number(_field(m, "model", "bits_per_weight")),
        "model_bytes": sum(a["bytes"] for a in m["artifacts"] if a.get("role", "model") in ("model", "model_data", "params")),
        "formats": (models[0].get("formats") if models else None) or {},
        "n_ctx": m.get("n_ctx"),
        "kv_cache_dtype": m.get("kv_cache_dtype"),
        "source": _field(m, "source", "name"),
        "checksums": verified,
    }
    if _field(m, "tvm", "target") is not None:
        out["tvm_target"] = m["tvm"]["target"]
    adapters = [a for a in m["artifacts"] if a.get("role") == "lora"]
    if adapters:      # kept apart from the base (--adapter-mode separate, add-adapter)
        out["adapters"] = ", ".join(
            f"{a.get('name')} ({a['backend']} {a.get('method', 'lora')}, "
            f"{'rank ' + str(a.get('rank')) if 'rank' in a else str(a.get('nnz')) + ' entries'}, scale "
            f"{a.get('scale')}, {a['bytes'] / 2**20:.2f} MiB)" for a in adapters)
    pr = m.get("pruning_rates")
    if isinstance(pr, dict) and isinstance(pr.get("rates"), list):
        try:
            out["pruning_rates"] = ", ".join(f"{e['rate']:g} ({e['achieved']:.4f} of MLP channels, widths "
                                             f"{min(e['widths'])}-{max(e['widths'])})" for e in pr["rates"])
            out["pruning"] = (f"{pr['order']} order, {pr['alloc']} allocation, MLP widths in steps of "
                              f"{sorted(set(pr['align']))}"
                              + (", removed channels' mean output as a ffn_down bias per rate" if pr.get("compensate")
                                 else ""))
            if pr.get("attention"):
                out["pruning_attention"] = ", ".join(
                    f"{e['rate']:g} ({e['achieved_attention']:.4f} of head dimensions, Q/K {min(e['qk'])}-"
                    f"{max(e['qk'])}, V {min(e['v'])}-{max(e['v'])})" for e in pr["rates"])
        except (KeyError, TypeError, ValueError):
            out["pruning_rates"] = "(unreadable)"
    adapters = _field(m, "source", "adapters")
    if isinstance(adapters, list) and adapters:
        out["adapters"] = ", ".join(f"{_field(a, 'name')}:{_field(a, 'weight')}" for a in adapters)
    chk = meas.get("reference_check") if isinstance(meas.get("reference_check"), dict) else {}
    for key, name in (("kld_mean", "reference_kld"), ("cosine_mean", "reference_cosine"),
                      ("agreement", "reference_agreement")):
        if key in chk:
            out[name] = chk[key]
    evals = meas.get("eval")
    if isinstance(evals, list) and evals and isinstance(evals[-1], dict):
        last = evals[-1]
        keys = ("cosine_mean", "cosine_min", "n_sentences") if "cosine_mean" in last else \
            ("agreement", "accuracy", "accuracy_reference", "n_images") if "agreement" in last else \
            ("ppl", "kld_mean", "top1", "n_tokens_scored")
        out.update({f"eval_{k}": last[k] for k in keys if k in last})
    return out


def inspect_adapter(path: Path) -> dict[str, Any]:
    """A PEFT LoRA adapter folder: its config (checked as a merge would) and its weights' header."""
    c = adapter_config(path)
    w = path / WEIGHTS
    if not w.is_file():
        raise EdgeqError(w, "missing (a PEFT adapter folder needs adapter_model.safetensors)")
    st = SafetensorsFile(w)
    modules = sorted({n.split(".lora_")[0] for n in st.keys() if ".lora_" in n})
    return {"kind": "peft adapter", "path": str(path), "r": c["r"], "lora_alpha": c["lora_alpha"],
            "use_rslora": bool(c.get("use_rslora")), "target_modules": c["target_modules"],
            "base_model": c.get("base_model_name_or_path"), "n_tensors": len(st.tensors), "modules": len(modules),
            "tensor_dtypes": dict(sorted(Counter(t.dtype.lower() for t in st.tensors.values()).items()))}


def inspect_plan(path: Path) -> dict[str, Any]:
    plan = load_plan(path)
    return {"kind": "plan", "path": str(path), "preset": plan.preset, "backend": plan.backend,
            "rules": len(plan.rules), "tensors": len(plan.tensors), "formats": plan.format_counts(),
            "budget_mb": (plan.search or {}).get("budget_mb")}


def inspect_path(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        if not (p / "manifest.json").exists() and (p / "config.json").is_file():
            return inspect_hf(p)
        if not (p / "manifest.json").exists() and (p / "adapter_config.json").is_file():
            return inspect_adapter(p)
        return inspect_bundle(p)
    if p.is_file() and p.suffix == ".json":
        return inspect_plan(p)
    if p.is_file() and p.suffix == ".pt2":
        g = import_pt2(p)
        return {"kind": "torch.export program (CNN)", "path": str(p), "input": ["batch", *g.config.image_shape],
                "classes": g.config.n_classes, "n_params": g.n_params,
                "ops": dict(sorted({o: sum(n.op == o for n in g.nodes) for o in {n.op for n in g.nodes}}.items()))}
    if p.is_file():
        return inspect_gguf(p)
    raise EdgeqError(p, "no such file or folder")
