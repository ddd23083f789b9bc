"""SmolLM2-135M on TVM beside GGUF (llama.cpp): quality and decode speed of the same formats, in one run.

Variants: GGUF q4_0 vs TVM int4 (both ggml's Q4_0 codes and scales, so both hold
the same weights), GGUF q8_0 vs TVM int8 (per channel), and the TVM builds again
meta-schedule tuned with `--trials` trials in all (their own, fresh tuning
database, so the stated budget is what was spent).

Quality: every bundle is scored by `edgeq.evaluate.bundle` (llama-perplexity's
convention: 512-token windows of the held-out text, second halves scored,
KLD over the full vocabulary) against one shared float reference. The presets
are calibration-aware by default (q4_0 and int4 get the same importance matrix,
from the same Calibrate pass); for issue 6's check the q4_0/int4 pair is also
exported with `--no-calibration`.

Speed: greedy decode tokens/s through each runtime's KV cache (prefill a chat
prompt, untimed, then one token per call), variants interleaved round by round,
alternating the order, on the same thread count; the median per variant and its
ratio to the GGUF bundle of its format.

    python bench/tvm_decoder.py                             # int4 + int8, int4 tuned with 8 trials, 1 thread
    python bench/tvm_decoder.py --tune int4,int8 --trials 16 --threads 2

Prints tables and writes bench/results/tvm_decoder.json (after each stage, so a
run stopped during tuning keeps the quality rows).

With `--budgeted`, budgeted TVM plans instead (issue 7 on TVM): the ILP over
the TVM candidates (f32, f16, int8_wo, int4_g32; default cost, i.e. Fisher
when torch is here) at the true size of the `int4` preset's bundle (library +
params), without and (`--qera`) with low-rank branches (`--ranks 0,8,16`),
beside the int4 preset; KLD in the same convention. Writes
tvm_budgeted.json / .png (after each stage).

    python bench/tvm_decoder.py --budgeted --qera
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import ReferenceCache, log, make_reference, versions, window_progress  # noqa: E402

GGUF_OF = {"int4": "q4_0", "int8": "q8_0"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "tvm_decoder.json"


def decode_rate(session, prompt: list[int], n: int) -> float:
    """Greedy tokens/s over n single-token decode steps after a prefill (prefill not timed)."""
    b = session.backend
    b.reset()
    logits = b.feed(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = b.feed([int(np.argmax(logits))])
    return n / (time.perf_counter() - t0)


def export(out: Path, **kw) -> tuple[dict, float]:
    from edgeq.api import ExportOptions, export as run_export

    t0 = time.perf_counter()
    res = run_export(ExportOptions(target="cpu", out=str(out), force=True, check=False, **kw))
    return res["manifest"], time.perf_counter() - t0


def quality(bundle: Path, reference, args) -> dict:
    from edgeq.evaluate.bundle import evaluate_bundle

    ev = evaluate_bundle(bundle, ctx=args.ctx, chunks=args.chunks, threads=args.threads, record=False,
                         progress=window_progress, reference_logits=reference)
    return {k: ev[k] for k in ("kld_mean", "kld_p99", "top1", "ppl", "ppl_reference", "n_tokens_scored")}


def model_bytes(manifest: dict) -> int:
    return sum(a["bytes"] for a in manifest["artifacts"] if a["role"] in ("model", "params"))


def write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="int4,int8", help="TVM presets, each against its GGUF format")
    ap.add_argument("--tune", default="int4", help="TVM presets also built tuned ('' for none)")
    ap.add_argument("--trials", type=int, default=8, help="meta-schedule trials in all, per tuned build")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--chunks", type=int, default=8, help="512-token windows scored (8: 2,040 tokens)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--quality", default="all", help="variants to score: all, none, or names (comma-separated)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--budgeted", action="store_true", help="budgeted TVM plans at int4's bundle size vs the preset")
    ap.add_argument("--qera", action="store_true", help="with --budgeted: also the plan with --ranks 0,8,16")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    if a.budgeted:
        return budgeted(a, a.out if a.out != DEFAULT_OUT else DEFAULT_OUT.with_name("tvm_budgeted.json"))

    from edgeq import runtime

    formats = [q.strip() for q in a.formats.split(",") if q.strip()]
    tuned = [q.strip() for q in a.tune.split(",") if q.strip() and a.trials]
    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-tvmdec-"))
    os.environ["EDGEQ_TVM_TUNE_DIR"] = str(work / "tune")
    doc: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "threads": a.threads, "rounds": a.rounds,
                           "tokens_per_round": a.tokens, "tune_trials": a.trials, "tuned": tuned,
                           "ctx": a.ctx, "chunks": a.chunks, "versions": versions(), "quality": [], "speed": []}
    from importlib import metadata

    doc["versions"]["apache-tvm"] = metadata.version("apache-tvm")

    # (name, export options, its GGUF partner, timed for speed)
    variants: list[tuple[str, dict, str, bool]] = []
    for q in formats:
        g = GGUF_OF[q]
        variants += [(f"gguf {g}", dict(backend="gguf", quant=g), f"gguf {g}", True),
                     (f"tvm {q}", dict(backend="tvm", quant=q), f"gguf {g}", True)]
        if q == "int4":          # issue 6's check: both without an importance matrix
            variants += [(f"gguf {g} no-imatrix", dict(backend="gguf", quant=g, calibration=False),
                          f"gguf {g} no-imatrix", False),
                         (f"tvm {q} no-imatrix", dict(backend="tvm", quant=q, calibration=False),
                          f"gguf {g} no-imatrix", False)]
    variants += [(f"tvm {q} tuned {a.trials}", dict(backend="tvm", quant=q, tune_trials=a.trials), f"gguf {GGUF_OF[q]}",
                  True) for q in tuned]

    reference = ReferenceCache(make_reference)
    bundles: dict[str, tuple[Path, dict, float]] = {}
    partner = {name: p for name, _, p, _ in variants}
    for name, kw, _, speed in variants:
        if not speed and a.quality == "none":
            continue             # the no-imatrix pair is only scored, never timed
        out = work / name.replace(" ", "-")
        log(f"export {name}")
        manifest, secs = export(out, **kw)
        bundles[name] = (out, manifest, secs)
        log(f"exported {name} in {secs:.0f} s")
        if "tuned" in name or (a.quality != "all" and name not in a.quality.split(",")):
            continue             # tuned builds hold the untuned build's weights: scored once, untuned
        log(f"quality: {name}")
        cal = manifest.get("calibration") or {}
        doc["quality"].append({"variant": name, "model_mb": model_bytes(manifest) / 1e6,
                               "imatrix": bool(cal.get("enabled")), **quality(out, reference, a)})
        write(a.out, doc)
    by_name = {r["variant"]: r for r in doc["quality"]}
    for r in doc["quality"]:
        ref = by_name.get(partner[r["variant"]])
        r["kld_vs_gguf_same_format"] = r["kld_mean"] / ref["kld_mean"] if ref else None
    doc["reference_s"] = reference.seconds

    timed = [name for name, _, _, speed in variants if speed]
    sessions = {k: runtime.load(bundles[k][0], threads=a.threads, n_ctx=a.ctx) for k in timed}
    first = next(iter(sessions.values()))
    prompt = first.tokenize(first.chat_prompt("Explain in two sentences why the sky is blue."), parse_special=True)
    greedy = {k: s.generate_ids(prompt, max_tokens=16) for k, s in sessions.items()}
    for s in sessions.values():
        decode_rate(s, prompt, 4)                                        # warm-up
    rates: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(a.rounds):
        order = timed if r % 2 == 0 else timed[::-1]
        for k in order:
            rates[k].append(decode_rate(sessions[k], prompt, a.tokens))
        log(f"speed round {r + 1}/{a.rounds}")
    for s in sessions.values():
        s.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k in timed:
        m = bundles[k][1]
        doc["speed"].append({"variant": k, "model_mb": model_bytes(m) / 1e6, "decode_tok_s_median": med[k],
                             "decode_tok_s_all": rates[k], "vs_gguf_same_format": med[k] / med[partner[k]],
                             "export_s": bundles[k][2], "tune_trials": (m.get("tvm") or {}).get("tune_trials"),
                             "greedy_16_equal_gguf": greedy[k] == greedy[partner[k]]})
    doc["prompt_tokens"] = len(prompt)
    doc["load_avg"] = os.getloadavg()
    write(a.out, doc)

    print(f"\nSmolLM2-135M quality, held-out tokens scored at ctx {a.ctx}")
    print(f"{'variant':28s} {'MB':>6s} {'tokens':>6s} {'KLD':>9s} {'x GGUF':>7s} {'top1':>7s} {'ppl':>7s}")
    for r in doc["quality"]:
        ratio = r["kld_vs_gguf_same_format"]
        print(f"{r['variant']:28s} {r['model_mb']:6.1f} {r['n_tokens_scored']:6d} {r['kld_mean']:9.5f} "
              f"{'' if ratio is None else f'{ratio:7.3f}':>7s} {r['top1']:7.4f} {r['ppl']:7.3f}")
    print(f"\ndecode, {a.threads} thread(s), prompt {len(prompt)} tokens, {a.rounds} rounds x {a.tokens} tokens "
          f"interleaved; tuned = meta-schedule, {a.trials} trials in all")
    print(f"{'variant':28s} {'tok/s':>8s} {'x GGUF':>7s} {'export s':>9s}")
    for r in doc["speed"]:
        print(f"{r['variant']:28s} {r['decode_tok_s_median']:8.2f} {r['vs_gguf_same_format']:7.3f} "
              f"{r['export_s']:9.0f}")
    print(f"wrote {a.out}")
    return 0


def budgeted(a, out_json: Path) -> int:
    """The ILP at the int4 preset's true bundle size (library + params), +- QERA branches, vs the preset."""
    from importlib import metadata

    reference = ReferenceCache(make_reference)
    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-tvmbudget-"))
    doc: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "threads": a.threads, "ctx": a.ctx, "chunks": a.chunks,
                           "versions": {**versions(), "apache-tvm": metadata.version("apache-tvm")}, "rows": []}
    log("export tvm int4")
    m4, secs = export(work / "int4", backend="tvm", quant="int4")
    budget = model_bytes(m4)
    variants = [("preset int4", work / "int4", m4, secs)]
    for ranks, what in [([0], "ilp @ int4 size")] + ([([0, 8, 16], "ilp + qera r8/16 @ int4 size")] if a.qera else []):
        log(f"export {what}: budget {budget} bytes")
        out = work / what.split(" @")[0].replace(" ", "-").replace("/", "_").replace("+", "")
        m, secs = export(out, backend="tvm", budget_mb=budget / 1e6, ranks=ranks)
        variants.append((what, out, m, secs))
    for name, out, m, secs in variants:
        log(f"quality: {name}")
        search = m["plan"].get("search") or {}
        files = model_bytes(m)
        if search:
            assert files == search["predicted_bytes"] <= search["budget_bytes"], (name, files, search)
        lib = sum(x["bytes"] for x in m["artifacts"] if x["role"] == "model")
        doc["rows"].append({"variant": name, "bytes": files, "library_bytes": lib, "bpw": 8 * files / m["model"]["n_params"],
                            "budget_bytes": search.get("budget_bytes"), "branches": search.get("branches", 0),
                            "cost": search.get("cost"), "formats": _formats(m), "export_s": secs,
                            **quality(out, reference, a)})
        write(out_json, doc)
    base = doc["rows"][0]["kld_mean"]
    for r in doc["rows"]:
        r["kld_vs_preset_int4"] = r["kld_mean"] / base
    doc["load_avg"] = os.getloadavg()
    write(out_json, doc)
    print(f"{'variant':32s} {'MB':>9s} {'bpw':>6s} {'br':>4s} {'KLD':>9s} {'x int4':>7s} {'top1':>7s}")
    for r in doc["rows"]:
        print(f"{r['variant']:32s} {r['bytes'] / 1e6:9.3f} {r['bpw']:6.3f} {r['branches']:4d} {r['kld_mean']:9.5f} "
              f"{r['kld_vs_preset_int4']:7.3f} {r['top1']:7.4f}")
    _plot_budgeted(doc["rows"], out_json.with_suffix(".png"))
    print(f"wrote {out_json}")
    return 0


def _formats(m: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in m["plan"]["tensors"].values():
        key = t["format"] + (f"+r{t['rank']}" if t.get("rank") else "")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _plot_budgeted(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r["variant"] for r in rows]
    ax.barh(names, [r["kld_mean"] for r in rows], color=["tab:gray" if n.startswith("preset") else "tab:blue"
                                                          for n in names])
    for i, r in enumerate(rows):
        ax.annotate(f"{r['kld_mean']:.4f}, {r['bytes'] / 1e6:.3f} MB", (r["kld_mean"], i), fontsize=8)
    ax.set_xlabel("KLD vs float reference (mean, held-out tokens)")
    ax.set_title("SmolLM2-135M on TVM at the int4 preset's bundle size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
