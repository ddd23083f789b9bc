"""The human report of a bundle (report.md) and its plot (bits per layer and format)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgeq.bundle.source import FLOAT_SOURCES, requantized_tensors
from edgeq.core.formats import get_format
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan


def format_table(graph: Graph, plan: Plan) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for name, t in graph.weights.items():
        f = plan.tensors[name].format
        r = rows.setdefault(f, {"format": f, "tensors": 0, "params": 0, "bytes": 0})
        r["tensors"] += 1
        r["params"] += t.n_elements
        r["bytes"] += get_format(f).nbytes(t.shape)
    return [rows[k] for k in sorted(rows)]


def plot_layers(graph: Graph, plan: Plan, path: Path) -> None:
    """Bits per weight of every 2-D tensor, by layer: shows where a preset or a search spent its bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for name, t in graph.weights.items():
        if len(t.shape) != 2:
            continue
        m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.", name)
        if not m:
            continue
        fmt = get_format(plan.tensors[name].format)
        series.setdefault(m.group(2), []).append((int(m.group(1)), 8 * fmt.nbytes(t.shape) / t.n_elements))
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    for k in sorted(series):
        xs, ys = zip(*sorted(series[k]))
        ax.plot(xs, ys, marker="o", ms=3, lw=1, label=k)
    ax.set_xlabel("layer")
    ax.set_ylabel("bits per weight (scales included)")
    ax.set_title("Per-tensor format by layer")
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _requantized_section(graph: Graph, plan: Plan, src: dict[str, Any]) -> list[str]:
    """Which tensors of a quantized source went onto another grid (their error adds up), and which kept their bytes."""
    if not src.get("formats"):
        return []
    moved = requantized_tensors(graph, plan)
    kept = sum(1 for n, t in graph.weights.items() if plan.tensors[n].format == t.source_format
               and t.source_format not in FLOAT_SOURCES)
    held = ", ".join(f"{k} {v}" for k, v in src["formats"].items())
    lines = ["", "## Requantized tensors", "",
             f"The source is already quantized ({held}). {kept} quantized tensors keep their source format and are "
             f"written byte for byte; {sum(map(len, moved.values()))} are requantized onto another grid"
             + (", which adds to the error they already carry (a float source of the same model avoids it):"
                if moved else "."), ""]
    for change, names in moved.items():
        shown = ", ".join(f"`{n}`" for n in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        lines.append(f"- {change}: {len(names)} tensors ({shown})")
    return lines


def _speed_section(speed: dict[str, Any] | None) -> list[str]:
    """A budgeted plan's speed beside the preset of the nearest bytes: bytes bought for quality can cost speed
    (formats without repacked kernels, slower kernels per byte), and a user should see it before shipping."""
    if not speed:
        return []
    p, q = speed["plan"], speed["preset"]
    rows = [("this plan", p), (q["name"], q)]
    return ["", "## Speed beside the preset of the nearest bytes", "",
            f"Measured in {speed['runtime']}'s runtime on this machine, {speed['threads']} thread(s), the two files "
            f"timed interleaved (medians; spread = interquartile range / median): decode "
            f"{speed['decode_ratio']:.2f}x and prefill {speed['prefill_ratio']:.2f}x the preset's speed.", "",
            "| model | bytes | prefill tokens/s | decode tokens/s | spread (prefill / decode) |",
            "|---|---:|---:|---:|---:|",
            *[f"| {k} | {v['bytes']:,} | {v['prefill_tps']:.1f} | {v['decode_tps']:.1f} | "
              f"{v['prefill_spread']:.1%} / {v['decode_spread']:.1%} |" for k, v in rows]]


def write_report(path: Path, manifest: dict[str, Any], measurements: dict[str, Any], graph: Graph, plan: Plan,
                 plot_name: str | None) -> None:
    src = manifest["source"]
    art = manifest["artifacts"][0]
    lines = [
        f"# edgeq bundle: {manifest['model']['name']}",
        "",
        f"- target: `{manifest['target']['name']}` ({manifest['target']['description']})",
        f"- backend: `{art['backend']}`; preset: `{plan.preset}`; n_ctx {manifest['n_ctx']}, "
        f"KV cache {manifest['kv_cache_dtype']}",
        f"- source: `{src['name']}` (sha256 {src['sha256'][:16]}..., licence {src.get('license')})",
        *[f"- merged LoRA adapter: `{a['name']}` × {a['weight']:g} (r {a['r']}, alpha {a['lora_alpha']}, "
          f"{a['modules']} modules, sha256 {a['sha256'][:16]}...)" for a in src.get("adapters") or []],
        f"- model file: `{art['path']}`, {art['bytes'] / 2**20:.1f} MiB, "
        f"{manifest['model']['bits_per_weight']:.3f} bits per weight over {manifest['model']['n_params']:,} parameters",
        "",
        "## Formats",
        "",
        "| format | tensors | parameters | bytes | bits/weight |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in format_table(graph, plan):
        lines.append(f"| {r['format']} | {r['tensors']} | {r['params']:,} | {r['bytes']:,} | "
                     f"{8 * r['bytes'] / r['params']:.3f} |")
    for a in manifest["artifacts"]:
        if a.get("role") == "adapter":
            ranked = sorted({t.rank for t in plan.tensors.values() if t.rank})
            lines += ["", f"Low-rank error branches (ranks {', '.join(map(str, ranked))}) on "
                          f"{sum(1 for t in plan.tensors.values() if t.rank)} tensors: `{a['path']}`, {a['bytes']:,} "
                          "bytes, a LoRA-adapter GGUF llama.cpp applies at load (counted in the budget). edgeq's "
                          "runtime applies it; stock llama.cpp needs it named: `llama-cli -m "
                          f"{a.get('applies_to', 'model.gguf')} --lora {a['path']}` (`llama-server` likewise)."]
    fallbacks = [(n, t) for n, t in plan.tensors.items() if t.requested and t.requested != t.format]
    if fallbacks:
        lines += ["", f"{len(fallbacks)} tensors could not take the requested format and fell back "
                      f"(the plan in manifest.json records each), e.g. `{fallbacks[0][0]}`: {fallbacks[0][1].reason}."]
    lines += _requantized_section(graph, plan, src)
    fid = measurements.get("reference_check")
    if fid and "cosine_mean" in fid:
        lines += ["", "## Fidelity on the bundled reference sentences", "",
                  f"Measured in the target runtime against the float reference executor: cosine mean "
                  f"{fid['cosine_mean']:.6f} (min {fid['cosine_min']:.6f}) over {fid['n_inputs']} sentences. "
                  f"Run `edgeq eval` for the full figures."]
    elif fid and "skipped" in fid:
        lines += ["", "## Fidelity", "", f"Not checked at export: {fid['skipped']}. Run `edgeq eval` on the device "
                                           "(e.g. `--device rpc://HOST:PORT`)."]
    elif fid and "agreement" in fid:
        lines += ["", "## Fidelity on the bundled reference images", "",
                  f"Measured in the target runtime against the float reference executor: argmax agreement "
                  f"{fid['agreement']:.3f}, max |logit difference| {fid['max_abs_diff']:.3g} over {fid['n_inputs']} "
                  f"images. Run `edgeq eval --images` for accuracy on labelled images."]
    elif fid:
        lines += ["", "## Fidelity on the bundled reference prompts", "",
                  f"Measured in the target runtime against the float reference executor: KLD mean "
                  f"{fid['kld_mean']:.3g} (max {fid['kld_max']:.3g}), top-1 agreement {fid['top1']:.3f} over "
                  f"{fid['n_positions']} positions. Run `edgeq eval` for the full figures."]
    par = measurements.get("pareto")
    if par:
        (label, point), = par["plan"].items()
        lines += ["", "## Size and fidelity beside the presets", "",
                  f"This plan (`{label}`): {point['bpw']:.3f} bits per weight (all model files), KLD "
                  f"{point['kld_mean']:.4g}, top-1 {point['top1']:.3f} on {par['chunks']} held-out {par['ctx']}-token "
                  f"windows, measured in llama.cpp against the float reference."]
        if par["presets"]:
            lines += ["", "| preset | bits/weight | KLD |", "|---|---:|---:|"]
            lines += [f"| {k} | {v['bpw']:.3f} | {v['kld_mean']:.4g} |"
                      for k, v in sorted(par["presets"].items(), key=lambda kv: kv[1]["bpw"])]
            lines += ["", "Preset points are earlier `edgeq eval` measurements of this source model with the same "
                          "text and windows (cached)."]
        else:
            lines += ["", "No preset of this model has been measured yet with these settings: `edgeq eval` a preset "
                          f"bundle (`--chunks {par['chunks']}`) and export again to see them beside the plan."]
        lines += ["", f"![bits per weight vs KLD]({par['plot']})"]
    lines += _speed_section(measurements.get("speed"))
    lines += ["", "## Timings", "", "| step | seconds |", "|---|---:|"]
    for k, v in measurements.get("timings_s", {}).items():
        lines.append(f"| {k} | {v:.2f} |")
    if plot_name:
        lines += ["", f"![bits per weight by layer]({plot_name})"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
