"""Measured (bits per weight, KLD) points per source model, kept so export reports can plot a plan beside them.

Measuring the presets in every export would cost minutes; predicted cost is not KLD. So every `edgeq eval`
of a decoder bundle (and the benches, which go through the same evaluation) records its point in a small
cache keyed by the source model's SHA-256, the evaluation text and the window settings (EDGEQ_CACHE; 'off'
disables it). edgeq/bundle/pareto.py plots a budgeted plan beside the cached presets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeq.core.cache import cache_dir, read_json_entry, write_json_entry
from edgeq.evaluate.texts import EVALUATION_TEXT_NAME

PARETO_VERSION = 1


def _path(source_sha: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / "pareto" / f"{source_sha[:32]}.json"


def _series(res: dict[str, Any]) -> str:
    return f"{res.get('text')}|ctx{res.get('ctx')}|chunks{res.get('n_chunks')}"


def bundle_label(manifest: dict[str, Any]) -> tuple[str, str]:
    """(label, kind) of a bundle: its preset, or its search method and budget."""
    plan = manifest.get("plan") or {}
    s = plan.get("search")
    cal = (manifest.get("calibration") or {}).get("enabled")
    if plan.get("preset"):
        return f"{plan['preset']}{'' if cal else ' (no imatrix)'}", "preset"
    if s:
        return f"{s.get('method')} @ {s.get('budget_mb', 0):.2f} MB", "plan"
    return "custom plan", "plan"


def bundle_bpw(bundle: Path, manifest: dict[str, Any]) -> float:
    """8 × bytes of all model files (adapters included) / source parameters: the budget's unit."""
    total = sum(a["bytes"] for a in manifest["artifacts"] if a.get("role", "model") in ("model", "adapter"))
    return 8 * total / manifest["model"]["n_params"]


def record_point(bundle: Path, manifest: dict[str, Any], res: dict[str, Any]) -> None:
    """Add one measured point to the source model's cache (best effort: a cache only)."""
    path = _path(manifest["source"]["sha256"])
    if path is None or "kld_mean" not in res or manifest["model"].get("kind") != "decoder":
        return
    label, kind = bundle_label(manifest)
    try:
        data = read_json_entry(path)        # None when absent, or torn (then removed): started again
        if not isinstance(data, dict) or not isinstance(data.get("series"), dict):
            data = {"version": PARETO_VERSION, "series": {}}
        series = data["series"].setdefault(_series(res), {})
        series[label] = {"bpw": bundle_bpw(bundle, manifest), "kld_mean": res["kld_mean"], "kind": kind,
                         "top1": res.get("top1")}
        write_json_entry(path, data)
    except (ValueError, KeyError, TypeError, AttributeError):
        pass


def cached_presets(source_sha: str, max_ctx: int) -> tuple[int | None, int | None, dict[str, dict[str, Any]]]:
    """(ctx, chunks, {label: point}) of the held-out-text series with the most preset points, or (None, None, {})."""
    data = read_json_entry(_path(source_sha))
    if data is None:
        return None, None, {}
    try:
        series = [(k, v) for k, v in data["series"].items() if k.split("|")[0] == EVALUATION_TEXT_NAME
                  and int(k.split("|")[1][3:]) <= max_ctx]
        if not series:
            return None, None, {}
        key, points = max(series, key=lambda kv: (sum(p["kind"] == "preset" for p in kv[1].values()), kv[0]))
        _, ctx, chunks = key.split("|")
        return int(ctx[3:]), int(chunks[6:]), {k: v for k, v in points.items() if v["kind"] == "preset"}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None, None, {}
