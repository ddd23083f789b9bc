"""The latency predictor's memory model, term by term, against the real runner's peak across contexts and prompts.

`edgeq profile --validate` checks peak memory on held-out plans at one context (256) and one prompt (128 tokens);
this varies what the other terms depend on: for SmolLM2 in several presets (the repacked Q4_0/Q4_K ones among
them), each (n_ctx, prompt) is run by the on-device runner in a fresh process (`python -m edgeq.runtime.remote`,
its `latency` op: a prefill of the prompt and decode steps, as `--validate` runs them), its peak (VmHWM) beside
the prediction of `--latency-profile` (edgeq/predictor/memory.py) and each of its terms: the file once, the KV
cache of the padded context, one graph's activations for the largest batch, the logits, the tokenizer, the base.
Prints a table, writes bench/results/resident_terms.json and a predicted-vs-measured plot.

    python bench/resident_terms.py --latency-profile P
    python bench/resident_terms.py --latency-profile P --presets q4_0,q8_0 --contexts 256,4096 --prompts 32,512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import isa_flags  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "resident_terms.json"
MIB = 2**20
CONTEXT = 16        # decode steps after a 16-token prefill: the prompt is the largest batch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-profile", required=True, help="GGUF latency profile (edgeq profile) of this machine")
    ap.add_argument("--presets", default="q4_0,q4_k_m,q8_0,f16")
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--prompts", default="32,128,512")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-resident-terms"))
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()

    from edgeq.api import ExportOptions, export
    from edgeq.devices import open_device
    from edgeq.predictor.predict import open_profile
    from edgeq.predictor.workload import bundle_workload

    _, profile, fitted = open_profile(a.latency_profile, "gguf", None)
    doc: dict[str, Any] = {"cpu_flags": isa_flags(), "load_before": os.getloadavg(),
                           "profile": profile.digest(), "memory_fit": fitted.memory.report, "rows": []}
    dev = open_device("local")
    try:
        for preset in a.presets.split(","):
            bundle = a.work / preset
            if not (bundle / "manifest.json").is_file():
                log(f"exporting SmolLM2 {preset} ...")
                export(ExportOptions(backend="gguf", quant=preset, out=str(bundle), check=False, force=True,
                                     calibration=False))
            remote = dev.push(bundle)
            w = bundle_workload(bundle, "gguf")[0]
            for n_ctx in (int(c) for c in a.contexts.split(",")):
                for prompt in (int(p) for p in a.prompts.split(",")):
                    if prompt + CONTEXT > n_ctx:
                        continue
                    r = dev.run(remote, "latency", {"prefill": [prompt], "decode": [CONTEXT], "steps": 4,
                                                    "prefill_steps": 1}, threads=1, n_ctx=n_ctx)
                    if not r.ok:
                        raise SystemExit(f"{preset} n_ctx {n_ctx} prompt {prompt}: {r.error}")
                    w.n_ctx = n_ctx
                    terms = fitted.memory.terms(w, max(prompt, CONTEXT + 1))     # as `edgeq predict`
                    pred = sum(terms.values())
                    row = {"preset": preset, "n_ctx": n_ctx, "prompt": prompt,
                           "measured_mib": round(r.peak_rss_bytes / MIB, 2), "predicted_mib": round(pred / MIB, 2),
                           "error": round(pred / r.peak_rss_bytes - 1, 4),
                           "terms_mib": {k: round(v / MIB, 2) for k, v in terms.items()}}
                    doc["rows"].append(row)
                    log(f"{preset} n_ctx {n_ctx} prompt {prompt}: measured {row['measured_mib']} MiB, predicted "
                        f"{row['predicted_mib']} ({row['error']:+.1%})")
    finally:
        dev.close()
    err = np.array([r["error"] for r in doc["rows"]])
    doc["summary"] = {"cases": len(err), "mape": round(float(np.mean(np.abs(err))), 4),
                      "share_within_10pct": round(float(np.mean(np.abs(err) <= 0.10)), 4),
                      "worst_error": round(float(err[np.argmax(np.abs(err))]), 4)}
    doc["load_after"] = os.getloadavg()
    print("| preset | n_ctx | prompt | measured MiB | predicted MiB | error | base + file + KV + activations + "
          "logits + tokenizer (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in doc["rows"]:
        t = r["terms_mib"]
        print(f"| {r['preset']} | {r['n_ctx']} | {r['prompt']} | {r['measured_mib']} | {r['predicted_mib']} | "
              f"{r['error']:+.1%} | {' + '.join(str(v) for v in t.values())} |")
    print(f"MAPE {doc['summary']['mape']:.1%}, {doc['summary']['share_within_10pct']:.0%} within 10 %, worst "
          f"{doc['summary']['worst_error']:+.1%} ({len(err)} cases); CPU flags {' '.join(doc['cpu_flags'])}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, a.out.with_suffix(".png"))
    return 0


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    presets = sorted({r["preset"] for r in doc["rows"]})
    for i, p in enumerate(presets):
        rows = [r for r in doc["rows"] if r["preset"] == p]
        ax.scatter([r["measured_mib"] for r in rows], [r["predicted_mib"] for r in rows], s=18, color=f"C{i}", label=p,
                   zorder=3)
    m = [r["measured_mib"] for r in doc["rows"]]
    xs = np.linspace(0.9 * min(m), 1.1 * max(m), 10)
    ax.fill_between(xs, 0.9 * xs, 1.1 * xs, color="0.9", label="±10 %")
    ax.plot(xs, xs, color="0.5", lw=1)
    ax.set_xlabel("measured peak (MiB)")
    ax.set_ylabel("predicted peak (MiB)")
    s = doc["summary"]
    ax.set_title(f"SmolLM2 GGUF, n_ctx x prompt: MAPE {s['mape']:.1%}, {s['share_within_10pct']:.0%} within 10 %",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
