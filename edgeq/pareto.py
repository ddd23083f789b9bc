"""Measured (bits per weight, KLD) points per source model, and the Pareto plot of a plan beside the presets.

Measuring the presets in every export would cost minutes; predicted cost is
not KLD. So every `edgeq eval` of a GGUF decoder bundle (and the benches,
which go through the same evaluation) records its point in a small cache
keyed by the source model's SHA-256, the evaluation text and the window
settings (EDGEQ_CACHE; 'off' disables it). An export of a budgeted plan
measures the plan itself with the same settings as the most-populated
cached series, and plots it beside the cached presets: both axes are
measured, under one convention (edgeq/evaluation.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PARETO_VERSION = 1


def _path(source_sha: str) -> Path | None:
    from edgeq.passes.calibrate import cache_dir

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
        data = json.loads(path.read_text()) if path.is_file() else {"version": PARETO_VERSION, "series": {}}
        series = data["series"].setdefault(_series(res), {})
        series[label] = {"bpw": bundle_bpw(bundle, manifest), "kld_mean": res["kld_mean"], "kind": kind,
                         "top1": res.get("top1")}
        from edgeq.fsutil import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except (OSError, ValueError, KeyError, TypeError):
        pass


def cached_presets(source_sha: str, max_ctx: int) -> tuple[int | None, int | None, dict[str, dict[str, Any]]]:
    """(ctx, chunks, {label: point}) of the held-out-text series with the most preset points, or (None, None, {})."""
    from edgeq.texts import EVALUATION_TEXT_NAME

    path = _path(source_sha)
    if path is None or not path.is_file():
        return None, None, {}
    try:
        data = json.loads(path.read_text())
        series = [(k, v) for k, v in data["series"].items() if k.split("|")[0] == EVALUATION_TEXT_NAME
                  and int(k.split("|")[1][3:]) <= max_ctx]
        if not series:
            return None, None, {}
        key, points = max(series, key=lambda kv: (sum(p["kind"] == "preset" for p in kv[1].values()), kv[0]))
        _, ctx, chunks = key.split("|")
        return int(ctx[3:]), int(chunks[6:]), {k: v for k, v in points.items() if v["kind"] == "preset"}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None, None, {}


def plot(presets: dict[str, dict[str, Any]], plan_label: str, plan_point: dict[str, Any], chunks: int, ctx: int,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if presets:
        items = sorted(presets.items(), key=lambda kv: kv[1]["bpw"])
        ax.scatter([p["bpw"] for _, p in items], [p["kld_mean"] for _, p in items], marker="s", c="C0",
                   label="llama.cpp presets (cached edgeq eval)")
        for name, p in items:
            ax.annotate(name, (p["bpw"], p["kld_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.scatter([plan_point["bpw"]], [plan_point["kld_mean"]], marker="*", s=160, c="C3", label=plan_label)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (8 x bytes of all model files / source parameters)")
    ax.set_ylabel(f"KLD vs float reference (llama.cpp logits,\n{chunks} held-out {ctx}-token windows)")
    ax.set_title("This plan beside the presets (measured, same evaluation)" if presets
                 else "This plan (no preset measured yet: `edgeq eval` preset bundles to add them)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plan_pareto(bundle: Path, manifest: dict[str, Any], reference: str, adapters: list[str],
                threads: int = 1, ctx: int = 512) -> dict[str, Any]:
    """Measure the staged bundle like the cached presets were measured and write pareto.png beside it."""
    from edgeq.evaluate_bundle import evaluate_bundle

    cached_ctx, chunks, presets = cached_presets(manifest["source"]["sha256"], ctx)
    ctx, chunks = cached_ctx or ctx, chunks or 2
    res = evaluate_bundle(bundle, ctx=ctx, chunks=chunks, reference=reference, adapters=adapters, threads=threads,
                          record=False, pareto=False)
    point = {"bpw": bundle_bpw(bundle, manifest), "kld_mean": res["kld_mean"], "top1": res["top1"]}
    label, _ = bundle_label(manifest)
    plot(presets, label, point, chunks, ctx, bundle / "pareto.png")
    return {"plot": "pareto.png", "chunks": chunks, "ctx": ctx, "plan": {label: point}, "presets": presets,
            "eval": {k: res[k] for k in ("kld_mean", "top1", "ppl", "n_tokens_scored", "text")}}
