"""all-MiniLM-L6-v2, float: edgeq's TVM build (llvm for this host, untuned) vs onnxruntime, side by side.

Batch 1, sequence 128, the same thread count for both (TVM's thread pool,
onnxruntime's intra-op threads with spinning off), variants interleaved round by
round; median latency per variant and their ratio. TVM's int8/int4 builds are
timed too (weight-only: smaller files, same float compute). Fidelity: cosine to
edgeq's float reference executor on held-out sentences.

    python bench/tvm_encoder.py                      # 2 threads, 10 rounds
    python bench/tvm_encoder.py --quants f32 --rounds 3 --sentences 16

Prints a table and writes bench/results/tvm_encoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from shared import encoder_fixture, fidelity, interleaved_times, latency_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs-per-round", type=int, default=3)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--quants", default="f32,int8,int4", help="TVM presets to build and time")
    ap.add_argument("--out", default="bench/results/tvm_encoder.json")
    a = ap.parse_args()

    import onnxruntime as ort

    from edgeq import runtime
    from edgeq.api import ExportOptions, export

    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-tvm-"))
    export_s: dict[str, float] = {}
    bundles: dict[str, Path] = {}
    t0 = time.perf_counter()
    export(ExportOptions(model="all-MiniLM-L6-v2", backend="onnx", quant="f32", out=str(work / "onnx-f32"), check=False))
    export_s["onnxruntime f32"] = time.perf_counter() - t0
    bundles["onnxruntime f32"] = work / "onnx-f32"
    for q in [q.strip() for q in a.quants.split(",") if q.strip()]:
        t0 = time.perf_counter()
        export(ExportOptions(model="all-MiniLM-L6-v2", backend="tvm", quant=q, out=str(work / f"tvm-{q}"), check=False))
        export_s[f"tvm {q}"] = time.perf_counter() - t0
        bundles[f"tvm {q}"] = work / f"tvm-{q}"
    sessions = {k: runtime.load(v, threads=a.threads) for k, v in bundles.items()}

    fx = encoder_fixture("all-MiniLM-L6-v2", a.seq, a.sentences)
    ids = fx.sentence_ids
    quality = {k: fidelity(fx.reference, np.concatenate([s.embed_ids(ids[i:i + 16]) for i in range(0, len(ids), 16)], 0))
               for k, s in sessions.items()}
    times = interleaved_times({k: (lambda s=s: s.embed_ids([fx.long_ids])) for k, s in sessions.items()},
                              a.rounds, a.runs_per_round)
    base = "onnxruntime f32"
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = []
    for k, b in bundles.items():
        m = json.loads((b / "manifest.json").read_text())
        size = sum(x["bytes"] for x in m["artifacts"] if x["role"] in ("model", "model_data", "params"))
        rows.append({"variant": k, "files_mb": size / 1e6, **latency_ms(times[k]),
                     "vs_onnxruntime": med[k] / med[base], "export_s": export_s[k], **quality[k]})
    print(f"MiniLM-L6-v2, batch 1, seq {a.seq}, {a.threads} threads, {a.rounds}x{a.runs_per_round} interleaved runs "
          f"(TVM untuned: edgeq's fixed schedule)")
    print(f"{'variant':18s} {'MB':>6s} {'ms':>8s} {'x ORT':>7s} {'cos mean':>9s} {'cos min':>8s}")
    for r in rows:
        print(f"{r['variant']:18s} {r['files_mb']:6.1f} {r['latency_ms_median']:8.2f} {r['vs_onnxruntime']:7.2f} "
              f"{r['cosine_mean']:9.6f} {r['cosine_min']:8.6f}")
    for s in sessions.values():
        s.close()
    from importlib import metadata

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": a.threads, "seq": a.seq, "batch": 1, "rounds": a.rounds,
                               "runs_per_round": a.runs_per_round, "baseline": base, "n_sentences": len(ids),
                               "onnxruntime": ort.__version__, "apache-tvm": metadata.version("apache-tvm"),
                               "tvm_target": json.loads((bundles[next(k for k in bundles if k.startswith("tvm"))]
                                                         / "manifest.json").read_text())["tvm"]["target"]
                               if len(bundles) > 1 else None,
                               "rows": rows, "load_avg": os.getloadavg()}, indent=1) + "\n")
    plot(out)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(json_path: Path) -> None:
    """Latency (ratio to onnxruntime) and files size per variant, cosine in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(json_path).read_text())
    rows = d["rows"]
    names = [r["variant"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.bar(names, [r["vs_onnxruntime"] for r in rows], color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    a1.set_ylabel("latency / onnxruntime f32")
    a1.set_title(f"MiniLM, batch 1, seq {d['seq']}, {d['threads']} threads")
    a2.bar(names, [r["files_mb"] for r in rows], color=["tab:gray"] + ["tab:green"] * (len(rows) - 1))
    a2.set_ylabel("model files, MB")
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=20)
    for i, r in enumerate(rows):
        a2.text(i, r["files_mb"], f"cos {r['cosine_mean']:.4f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(json_path).with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
