"""The budgeted planner's frontier below 6 bits, as README command 1 installs it (no torch), against llama.cpp's
presets with edgeq's importance matrix.

    python bench/planner_frontier.py [--bpw 6.27,5.46,5.0,4.5] [--chunks 4] [--presets q4_k_m,q3_k_m,iq4_nl]
                                     [--gptq-windows N] [--gptq-conditional] [--text heldout|calibration]

Each budget is one `edgeq export --bpw X --formats <every GGUF candidate but Q4_1/Q5_1>` of the default model
(SmolLM2-135M-Instruct; its weights come from a Q4_1 file, which Q4_1 reproduces exactly, hence the exclusion),
with the default cost (`--cost auto`: the numpy Fisher) and the default candidates (i-quants included), scored
as `edgeq eval` scores it: llama.cpp's logits against the float reference executor on --chunks 512-token
windows of held-out text (`--text calibration`: the second half of the calibration text instead, the proxy
to choose settings on, as `edgeq search`'s labels do; the held-out text is for final numbers only). The export's own speed measurement (llama.cpp, interleaved with the preset of the
nearest bytes) is kept beside each row. Writes bench/results/planner_frontier.json and a plot (bpw vs KLD).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(have & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "f16c", "fma"})
    except OSError:
        pass
    return []


def main() -> int:
    from edgeq.api import ExportOptions, export
    from edgeq.core.formats.registry import candidate_formats
    from edgeq.evaluate.bundle import evaluate_bundle
    from edgeq.evaluate.texts import calibration_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpw", default="6.27,5.46,5.0,4.5")
    ap.add_argument("--presets", default="q4_k_m,q3_k_m,iq4_nl", help="calibrated presets measured beside")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                    help="GPTQ (passes/gptq.py) on or off (default: edgeq's, on for budgeted GGUF plans)")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ's blocks in order of decreasing input energy (edgeq's default)")
    ap.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ's H from the already-quantized layers' outputs (default), or the float model's")
    ap.add_argument("--calib-windows", type=int, default=4, help="512-token calibration windows (edgeq's default 4)")
    ap.add_argument("--gptq-windows", type=int, help="windows GPTQ's writer takes each H from (default: calib's)")
    ap.add_argument("--gptq-tokens", choices=["uniform", "fisher"], default="uniform",
                    help="GPTQ's H: tokens alike or weighted by their output's Fisher")
    ap.add_argument("--gptq-token-windows", type=int, help="fisher tokens: the backward over N writer windows only")
    ap.add_argument("--gptq-aim", choices=["quantized", "float"], default="quantized",
                    help="what GPTQ fits each layer's output to (float: GPTAQ's objective)")
    ap.add_argument("--gptq-conditional", action="store_true",
                    help="GPTQ's quantizer weighted by the Schur complement's diagonal, not E[x^2]")
    ap.add_argument("--text", choices=["heldout", "calibration"], default="heldout",
                    help="score on the held-out text (final numbers) or on the calibration text's second half (the "
                         "proxy settings are chosen on)")
    ap.add_argument("--no-speed", action="store_true", help="skip each export's check and speed measurement")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner_frontier.json"))
    a = ap.parse_args()

    formats = [f.name for f in candidate_formats("gguf") if f.name not in ("q4_1", "q5_1")]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"cpu_flags": cpu_flags(), "machine": platform.machine(), "chunks": a.chunks, "threads": a.threads,
           "formats": formats, "gptq": a.gptq, "act_order": a.act_order, "sequential": a.sequential,
           "calib_windows": a.calib_windows, "gptq_windows": a.gptq_windows,
           "gptq_conditional": a.gptq_conditional, "gptq_aim": a.gptq_aim, "gptq_tokens": a.gptq_tokens,
           "gptq_token_windows": a.gptq_token_windows, "text": a.text, "rows": []}

    def save() -> None:
        out.write_text(json.dumps(res, indent=1) + "\n")

    work = Path(tempfile.mkdtemp(prefix="edgeq-frontier-"))
    text_file = None
    if a.text == "calibration":
        text = calibration_text()
        text_file = work / "calibration-second-half.txt"
        text_file.write_text(text[len(text) // 2:], encoding="utf-8")
    jobs = [("preset", q) for q in a.presets.split(",") if q] + [("plan", float(b)) for b in a.bpw.split(",") if b]
    for kind, what in jobs:
        t0 = time.perf_counter()
        bundle = work / f"{kind}-{what}"
        opts = (ExportOptions(quant=what, out=str(bundle), force=True, check=False, calib_windows=a.calib_windows)
                if kind == "preset" else
                ExportOptions(bpw=what, formats=formats, out=str(bundle), force=True, gptq=a.gptq,
                              gptq_act_order=a.act_order, gptq_sequential=a.sequential,
                              gptq_windows=a.gptq_windows, gptq_conditional=a.gptq_conditional, gptq_aim=a.gptq_aim, gptq_tokens=a.gptq_tokens,
                              gptq_token_windows=a.gptq_token_windows,
                              calib_windows=a.calib_windows, check=not a.no_speed))
        r = export(opts, log=lambda s: print(s, file=sys.stderr))
        ev = evaluate_bundle(bundle, None if text_file is None else str(text_file), chunks=a.chunks,
                             threads=a.threads, record=False, pareto=False)
        m = r["manifest"]
        row = {"kind": kind, "what": what, "bpw": m["model"]["bits_per_weight"],
               "bytes": sum(x["bytes"] for x in m["artifacts"] if x["role"] == "model"),
               "kld_mean": ev["kld_mean"], "top1": ev["top1"], "ppl": ev["ppl"],
               "n_tokens": ev["n_tokens_scored"], "formats": next(x["formats"] for x in m["artifacts"]
                                                                  if x["role"] == "model"),
               "speed": r["measurements"].get("speed"), "seconds": round(time.perf_counter() - t0, 1)}
        res["rows"].append(row)
        sp = row["speed"]
        print(f"{kind} {what}: {row['bpw']:.3f} bpw, KLD {row['kld_mean']:.4f}, top-1 {row['top1']:.3f}"
              + (f", decode {sp['decode_ratio']:.2f}x / prefill {sp['prefill_ratio']:.2f}x {sp['preset']['name']}"
                 if sp else ""), flush=True)
        save()
    plot(res, out.with_suffix(".png"))
    return 0


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("preset", "s"), ("plan", "o-")):
        rows = sorted((r for r in res["rows"] if r["kind"] == kind), key=lambda r: r["bpw"])
        ax.plot([r["bpw"] for r in rows], [r["kld_mean"] for r in rows], style,
                label="llama.cpp presets + imatrix" if kind == "preset" else "edgeq budgeted plan (no torch)")
        if kind == "preset":
            for r in rows:
                ax.annotate(r["what"], (r["bpw"], r["kld_mean"]), fontsize=8)
    ax.set_xlabel("bits per weight (model file)")
    which = "held-out" if res.get("text", "heldout") == "heldout" else "calibration-text (proxy)"
    ax.set_ylabel(f"KLD vs float ({res['chunks']} {which} windows)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
