"""`edgeq inspect`: what is in a bundle or a GGUF file, in a few flat fields."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.importers import hf_bert
from edgeq.importers.gguf_metadata import open_gguf, read_metadata
from edgeq.importers.hf import hf_tensors, import_hf, read_config
from edgeq.importers.torch_export import import_pt2
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


def inspect_bundle(path: Path) -> dict[str, Any]:
    import json

    m = read_manifest(path)
    try:
        verify_artifacts(path, m)
        verified = "ok"
    except EdgeqError as exc:
        verified = f"FAILED: {exc}"
    meas_path = path / "measurements.json"
    meas = json.loads(meas_path.read_text(encoding="utf-8")) if meas_path.is_file() else {}
    models = [a for a in m["artifacts"] if a.get("role", "model") == "model"]
    out = {
        "kind": "bundle",
        "path": str(path),
        "model": m["model"]["name"],
        "target": m["target"]["name"],
        "backends": [a["backend"] for a in models],
        "preset": m["plan"].get("preset"),
        "bits_per_weight": round(m["model"]["bits_per_weight"], 4),
        "model_bytes": sum(a["bytes"] for a in m["artifacts"] if a.get("role", "model") in ("model", "model_data", "params")),
        "formats": models[0]["formats"] if models else {},
        "n_ctx": m["n_ctx"],
        "kv_cache_dtype": m["kv_cache_dtype"],
        "source": m["source"]["name"],
        "checksums": verified,
    }
    if m.get("tvm"):
        out["tvm_target"] = m["tvm"]["target"]
    if m.get("pruning_rates"):
        pr = m["pruning_rates"]
        out["pruning_rates"] = ", ".join(f"{e['rate']:g} ({e['achieved']:.4f} of MLP channels, widths "
                                         f"{min(e['widths'])}-{max(e['widths'])})" for e in pr["rates"])
        out["pruning"] = f"{pr['order']} order, {pr['alloc']} allocation, MLP widths in steps of {sorted(set(pr['align']))}"
    if m["source"].get("adapters"):
        out["adapters"] = ", ".join(f"{a['name']}:{a['weight']:g}" for a in m["source"]["adapters"])
    chk = meas.get("reference_check") or {}
    if "kld_mean" in chk:
        out["reference_kld"] = chk["kld_mean"]
    if "cosine_mean" in chk:
        out["reference_cosine"] = chk["cosine_mean"]
    if "agreement" in chk:
        out["reference_agreement"] = chk["agreement"]
    if meas.get("eval"):
        last = meas["eval"][-1]
        keys = ("cosine_mean", "cosine_min", "n_sentences") if "cosine_mean" in last else \
            ("agreement", "accuracy", "accuracy_reference", "n_images") if "agreement" in last else \
            ("ppl", "kld_mean", "top1", "n_tokens_scored")
        out.update({f"eval_{k}": last[k] for k in keys if k in last})
    return out


def inspect_path(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        if not (p / "manifest.json").exists() and (p / "config.json").is_file():
            return inspect_hf(p)
        return inspect_bundle(p)
    if p.is_file() and p.suffix == ".pt2":
        g = import_pt2(p)
        return {"kind": "torch.export program (CNN)", "path": str(p), "input": ["batch", *g.config.image_shape],
                "classes": g.config.n_classes, "n_params": g.n_params,
                "ops": dict(sorted({o: sum(n.op == o for n in g.nodes) for o in {n.op for n in g.nodes}}.items()))}
    if p.is_file():
        return inspect_gguf(p)
    raise EdgeqError(p, "no such file or folder")
