"""The Pareto plot of an export: a budgeted plan's measured (bits per weight, KLD) beside the presets'.

An export of a budgeted plan measures the plan itself with the same settings as the most-populated cached
series of the source model (edgeq/evaluate/points.py) and plots it beside the cached presets: both axes are
measured, under one convention (edgeq/evaluate/decoder.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeq.evaluate.bundle import evaluate_bundle
from edgeq.evaluate.points import bundle_bpw, bundle_label, cached_presets


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
    cached_ctx, chunks, presets = cached_presets(manifest["source"]["sha256"], ctx)
    ctx, chunks = cached_ctx or ctx, chunks or 2
    res = evaluate_bundle(bundle, ctx=ctx, chunks=chunks, reference=reference, adapters=adapters, threads=threads,
                          record=False, pareto=False)
    point = {"bpw": bundle_bpw(bundle, manifest), "kld_mean": res["kld_mean"], "top1": res["top1"]}
    label, _ = bundle_label(manifest)
    plot(presets, label, point, chunks, ctx, bundle / "pareto.png")
    return {"plot": "pareto.png", "chunks": chunks, "ctx": ctx, "plan": {label: point}, "presets": presets,
            "eval": {k: res[k] for k in ("kld_mean", "top1", "ppl", "n_tokens_scored", "text")}}
