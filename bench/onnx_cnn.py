"""The digits CNN on onnxruntime: every ONNX preset's accuracy and latency, and where Q/DQ pairs pay off.

Trains the digits CNN (models/digits.py, seconds), exports f32 / f16 / int8 /
int8-dyn, plus int8 with the residual add kept float (the plan's
`activations` without the add's inputs and output), and measures on the 500
held-out images: accuracy, argmax agreement with the float reference
executor, and median latency per batch at batch 1 and batch 64, all variants
interleaved round by round with the same thread count, spinning off.

    python bench/onnx_cnn.py                       # 1 thread, 15 rounds
    python bench/onnx_cnn.py --threads 2 --rounds 30

Prints a table and writes bench/results/onnx_cnn.json and a plot beside it (onnx_cnn.png).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs-per-round", type=int, default=20)
    ap.add_argument("--out", default="bench/results/onnx_cnn.json")
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    from edgeq import export_module
    from edgeq.core.executor import Executor
    from edgeq.importers.torch_export import import_module
    from edgeq.models.recipes.digits import accuracy, train_digits_cnn
    from edgeq.runtime.onnx_backend import session_options

    model, data = train_digits_cnn(seed=0)
    example = torch.from_numpy(data.x_test[:1])
    graph = import_module(model, example, name="digits")
    ref = Executor(graph).run_inputs({"images": data.x_test})["logits"]
    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-cnn-"))
    files = {}
    for q in ("f32", "f16", "int8", "int8-dyn"):
        export_module(model, example, work / q, quant=q, calib_images=data.x_train if q == "int8" else None,
                      name="digits", check=False)
        files[q] = work / q / "model.onnx"
    # the residual add kept float: the calibrated plan minus the add's output and the inputs only it reads
    plan = json.loads((work / "int8" / "manifest.json").read_text())["plan"]
    adds = [n for n in graph.nodes if n.op == "add"]
    readers: dict[str, set] = {}
    for n in graph.nodes:
        for i in n.inputs:
            readers.setdefault(i, set()).add(n.op)
    drop = {i for n in adds for i in n.inputs if readers[i] == {"add"}} | {n.outputs[0] for n in adds}
    plan["activations"] = {k: v for k, v in plan["activations"].items() if k not in drop}
    (work / "plan_float_add.json").write_text(json.dumps(plan))
    export_module(model, example, work / "int8-float-add", quant="int8", plan=str(work / "plan_float_add.json"),
                  name="digits", check=False)
    files["int8, residual add float"] = work / "int8-float-add" / "model.onnx"

    sessions = {k: ort.InferenceSession(str(v), session_options(a.threads), providers=["CPUExecutionProvider"])
                for k, v in files.items()}
    rows = {}
    for k, s in sessions.items():
        got = s.run(["logits"], {"images": data.x_test})[0]
        rows[k] = {"variant": k, "file_bytes": files[k].stat().st_size, "accuracy": accuracy(got, data.y_test),
                   "agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
                   "logits_max_abs_diff": float(np.abs(got - ref).max())}
    for batch in (1, 64):
        feed = {"images": data.x_test[:batch]}
        times = {k: [] for k in sessions}
        for s in sessions.values():
            for _ in range(5):
                s.run(["logits"], feed)
        for r in range(a.rounds):
            order = list(sessions) if r % 2 == 0 else list(reversed(list(sessions)))
            for k in order:
                for _ in range(a.runs_per_round):
                    t0 = time.perf_counter()
                    sessions[k].run(["logits"], feed)
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        for k in sessions:
            rows[k][f"latency_us_batch{batch}"] = med[k]
            # on a loaded machine some variants' runs are bimodal (a run that yields the CPU waits a time slice)
            rows[k][f"latency_us_p10_batch{batch}"] = float(np.percentile(times[k], 10) * 1e6)
            rows[k][f"vs_f32_batch{batch}"] = med[k] / med["f32"]
    print(f"digits CNN, {len(data.x_test)} held-out images (float reference accuracy {accuracy(ref, data.y_test):.4f}), "
          f"{a.threads} thread(s), {a.rounds}x{a.runs_per_round} interleaved runs")
    print(f"{'variant':28s} {'bytes':>7s} {'acc':>7s} {'agree':>7s} {'us b1':>8s} {'x f32':>6s} {'us b64':>8s} {'x f32':>6s} "
          f"{'p10 b64':>8s}")
    for r in rows.values():
        print(f"{r['variant']:28s} {r['file_bytes']:7d} {r['accuracy']:7.4f} {r['agreement']:7.4f} "
              f"{r['latency_us_batch1']:8.1f} {r['vs_f32_batch1']:6.3f} {r['latency_us_batch64']:8.1f} "
              f"{r['vs_f32_batch64']:6.3f} {r['latency_us_p10_batch64']:8.1f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": a.threads, "rounds": a.rounds, "runs_per_round": a.runs_per_round,
                               "n_images": len(data.x_test), "accuracy_reference": accuracy(ref, data.y_test),
                               "onnxruntime": ort.__version__, "rows": list(rows.values()),
                               "load_avg": os.getloadavg()}, indent=1) + "\n")
    plot(list(rows.values()), out.with_suffix(".png"), a.threads)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(rows: list[dict], path: Path, threads: int) -> None:
    """Latency relative to f32 (batch 1 and 64) beside file size, one group per variant; accuracy in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.27, [r["vs_f32_batch1"] for r in rows], 0.27, label="latency, batch 1 (x f32)")
    ax.bar(x, [r["vs_f32_batch64"] for r in rows], 0.27, label="latency, batch 64 (x f32)")
    ax.bar(x + 0.27, [r["file_bytes"] / rows[0]["file_bytes"] for r in rows], 0.27, label="file size (x f32)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(x, [f"{r['variant']}\nacc {r['accuracy']:.3f}" for r in rows], fontsize=8)
    ax.set_ylabel(f"relative to f32 ({threads} thread(s))")
    ax.set_title("digits CNN on onnxruntime: ONNX presets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
