"""UniQL on the default model: one bundle, the MLP pruning rate chosen at load.

Quality (`--stage quality`): for each channel order (uniql, ridge, leverage, magnitude, wanda, random) and each of `--subsets`
disjoint calibration subsets, an f32 GGUF bundle with `--pruning-rates` is exported and evaluated in llama.cpp at
every rate against the unpruned float source (edgeq eval's convention: KLD, PPL, top-1 on held-out text); the
uniql order with `--prune-alloc uniform` too. f32 keeps quantization out of the comparison. `--ridge` (the
`ridge` and `leverage` orders) and `--temperature` sweep the two method constants on subset 0 (what their defaults were chosen on).

Speed and memory (`--stage speed`): a q4-class bundle per runtime (GGUF q4_0 in llama.cpp, ONNX int4 in
onnxruntime, TVM int4), each loaded at each rate in a fresh process, round after round with the rates' order
alternating: the bytes of the model files loaded, resident memory after load and after decoding, and greedy decode
tokens/s (1 thread).

    python bench/uniql.py --stage select        # the constants' sweep (calibration text only)
    python bench/uniql.py                       # quality and speed (about an hour on the 2-core machine)
    python bench/uniql.py --stage speed --rounds 5
    python bench/uniql.py --stage attention --out bench/results/uniql_attention.json   # --prune-attention, ONNX f32
    python bench/uniql.py --stage attention-parts --out bench/results/uniql_attention.json   # Q/K against V

Writes bench/results/uniql.json (after each step) and uniql.png.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import ReferenceCache, log, make_reference, versions  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "uniql.json"
ORDERS = ("uniql", "ridge", "leverage", "magnitude", "wanda", "random")


def export(out: Path, **kw) -> dict:
    from edgeq.api import ExportOptions, export as run_export

    t0 = time.perf_counter()
    res = run_export(ExportOptions(target="cpu", out=str(out), force=True, check=False, **kw))
    log(f"  exported {out.name} in {time.perf_counter() - t0:.0f} s")
    return res["manifest"]


def quality(bundle: Path, rate: float, reference, a, text: Path | None = None, chunks: int | None = None) -> dict:
    from edgeq.evaluate.bundle import evaluate_bundle

    ev = evaluate_bundle(bundle, text_file=None if text is None else str(text), ctx=a.ctx,
                         chunks=a.chunks if chunks is None else chunks, threads=a.threads, record=False,
                         pareto=False, progress=None, reference_logits=reference, pruning_rate=rate)
    return {k: ev[k] for k in ("kld_mean", "kld_p99", "top1", "ppl", "ppl_reference", "n_tokens_scored")}


def write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def run_variant(work: Path, name: str, reference, a, doc: dict, out: Path, section: str = "quality",
                rates: list[float] | None = None, text: Path | None = None, chunks: int | None = None,
                **opts) -> dict:
    """Export one f32 bundle with a pruning table and score `rates` in its runtime (llama.cpp unless `opts` names a
    backend; on `text`, else the held-out text)."""
    rates = a.rates if rates is None else rates
    bundle = work / name.replace("/", "_")
    m = export(bundle, quant="f32", pruning_rates=rates, calib_windows=a.calib_windows, **opts)
    table = {r["rate"]: r for r in m["pruning_rates"]["rates"]}
    res: dict[str, Any] = {"options": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
                                       "calib_windows": a.calib_windows},
                           "rates": {}}
    for r in rates:
        q = quality(bundle, r, reference, a, text, chunks)
        q["achieved"] = table[r]["achieved"]
        q["widths"] = table[r]["widths"]
        if "qk" in table[r]:
            q.update(achieved_attention=table[r]["achieved_attention"], qk=table[r]["qk"], v=table[r]["v"])
        res["rates"][str(r)] = q
        log(f"  {name} rate {r}: KLD {q['kld_mean']:.4f} ppl {q['ppl']:.3f} top-1 {q['top1']:.3f}")
    shutil.rmtree(bundle, ignore_errors=True)
    doc.setdefault(section, {})[name] = res
    write(out, doc)
    return res


def stage_quality(a, doc: dict, out: Path) -> None:
    reference = ReferenceCache(make_reference)
    doc.setdefault("quality", {})
    with tempfile.TemporaryDirectory(prefix="edgeq-uniql-", dir=a.workdir) as d:
        work = Path(d)
        for s in range(a.subsets):
            for variant in a.orders:
                name = f"{variant}/s{s}"
                if name in doc["quality"]:
                    continue
                log(f"{name}")
                # rate 0 is the source whatever the order: scored once (the f32 check; with biases too)
                rates = a.rates if name in ("uniql/s0", "uniql+comp/s0") else [r for r in a.rates if r > 0]
                order, comp = (variant[:-len("+comp")], True) if variant.endswith("+comp") else (variant, False)
                run_variant(work, name, reference, a, doc, out, rates=rates, prune_order=order, prune_alloc="uniql",
                            calib_subset=(s, a.subsets), **({"prune_compensate": True} if comp else {}))
            name = f"uniql+uniform/s{s}"
            if name not in doc["quality"] and "uniql" in a.orders and not a.no_uniform:
                log(name)
                run_variant(work, name, reference, a, doc, out, rates=[r for r in a.rates if r > 0],
                            prune_order="uniql", prune_alloc="uniform", calib_subset=(s, a.subsets))
    doc["summary"] = summary(doc["quality"], a.rates, a.subsets)
    write(out, doc)


def mlp_share() -> float:
    """The MLPs' share of the default model's prunable parameters (MLP and attention projections)."""
    from edgeq.importers.gguf import import_gguf
    from edgeq.models.recipes.default import default_model_path

    c = import_gguf(default_model_path()).config
    mlp = 3 * c.hidden_size * c.intermediate_size
    return mlp / (mlp + 2 * c.hidden_size * c.head_dim * (c.n_heads + c.n_kv_heads))


def stage_attention(a, doc: dict, out: Path) -> None:
    """--prune-attention on ONNX f32 (the only runtime that carries it), two questions:
    - the split (calibration text only, as `select`): at equal parameters removed (the rate counts the MLPs' and the
      attention's), the MLPs alone (at rate r / the MLPs' share of the parameters) against Q/K and V pruned at each
      `--attention-ratios` pair of multiples of the MLPs' rate (uniql_alloc.ATTENTION_RATIO is chosen here);
    - the held-out figures: KLD at each rate with and without attention pruning (with it the rate counts the
      attention's parameters too, so that model is smaller at the same rate)."""
    from edgeq.evaluate.texts import calibration_text

    reference = ReferenceCache(make_reference)
    doc.setdefault("attention", {})
    share = mlp_share()
    doc["attention_mlp_share"] = share
    rates = a.attention_rates
    with tempfile.TemporaryDirectory(prefix="edgeq-uniql-", dir=a.workdir) as d:
        work = Path(d)
        text = work / "calibration.txt"
        text.write_text(calibration_text(), encoding="utf-8")
        sel = dict(section="attention", text=text, chunks=a.select_chunks, calib_subset=(1, 3), backend="onnx")
        from edgeq.passes.uniql_alloc import ATTENTION_RATIO

        variants = [("select/mlp-only-same-params", dict(rates=[round(r / share, 6) for r in rates], **sel))]
        variants += [(f"select/mlp+attention ratio={qk:g}:{v:g}", dict(rates=rates, prune_attention=True,
                                                                         prune_attention_ratio=(qk, v), **sel))
                     for qk, v in a.attention_ratios]
        variants += [("heldout/mlp-only", dict(section="attention", rates=rates, backend="onnx")),
                     ("heldout/mlp+attention ratio={:g}:{:g}".format(*ATTENTION_RATIO),
                      dict(section="attention", rates=rates, backend="onnx", prune_attention=True))]
        for name, kw in variants:
            if name not in doc["attention"]:
                log(name)
                run_variant(work, name, reference, a, doc, out, **kw)


def stage_attention_parts(a, doc: dict, out: Path) -> None:
    """What each half of attention pruning costs, in the reference executor on calibration text only: covariances
    from 4 windows of 256 tokens, KLD on a fifth, every layer's heads narrowed from 64 to 56 dimensions: Q/K sorted,
    in the source's order and in reverse; V rotated by the SVD and unrotated."""
    from edgeq.core.executor import Executor
    from edgeq.importers.gguf import import_gguf
    from edgeq.models import llama
    from edgeq.models.recipes.default import default_model_path
    from edgeq.passes.calibrate import calibration_tokens, calibration_windows, collect
    from edgeq.passes.uniql_attention import pair_order, value_rotation

    g = import_gguf(default_model_path())
    c = g.config
    tokens, bos, add_bos = calibration_tokens(g)
    wins = calibration_windows(tokens, 256, 5, bos, add_bos)
    cal = collect(g, wins[:4], max_full=0, full_for=frozenset(llama.attention_weights(i)[0] for i in range(c.n_layers)))
    pairs, rots = {}, {}
    for i in range(c.n_layers):
        q, k, v, _ = (g.weights[n].numpy() for n in llama.attention_weights(i))
        cov = cal.stats(llama.attention_weights(i)[0]).full()
        pairs[i] = pair_order(q, k, cov, c.n_heads, c.n_kv_heads)
        rots[i] = value_rotation(v, cov, c.n_kv_heads)
    s = llama.reshape_attention(g, pairs, rots)
    ref = Executor(g).logits(wins[4])
    n, d, keep = c.n_layers, c.head_dim, c.head_dim - 8
    variants = {"qk sorted": (s, [keep] * n, [d] * n), "qk source order": (g, [keep] * n, [d] * n),
                "qk reversed": (llama.reshape_attention(g, {i: p[:, ::-1].copy() for i, p in pairs.items()}),
                                [keep] * n, [d] * n),
                "v svd": (s, [d] * n, [keep] * n), "v unrotated": (g, [d] * n, [keep] * n)}
    res = {}
    for name, (base, qk, vw) in variants.items():
        res[name] = kld_mean(ref, Executor(llama.reshape_attention(base, keep=(qk, vw))).logits(wins[4]))
        log(f"  {name}: KLD {res[name]:.4f}")
    doc["attention_parts"] = {"kept": f"{keep} of {d} dimensions per head, every layer", "kld": res}
    write(out, doc)


def kld_mean(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) over positions, from logits."""
    lp = p_logits - p_logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q_logits - q_logits.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def stage_select(a, doc: dict, out: Path) -> None:
    """The two method constants, chosen on calibration text only: calibration subset 1 of 3 (its windows start at
    the 11th), scored on the calibration text's first `--select-chunks` windows (none of them in that subset); the
    held-out half is never looked at here."""
    from edgeq.evaluate.texts import calibration_text

    reference = ReferenceCache(make_reference)
    doc.setdefault("select", {})
    with tempfile.TemporaryDirectory(prefix="edgeq-uniql-", dir=a.workdir) as d:
        work = Path(d)
        text = work / "calibration.txt"
        text.write_text(calibration_text(), encoding="utf-8")
        kw = dict(section="select", rates=a.select_rates, text=text, chunks=a.select_chunks,
                  calib_subset=(1, 3))
        for order, ridges in (("leverage", a.ridge), ("ridge", a.ridge)):
            for ridge in ridges:
                name = f"{order} ridge={ridge:g}"
                if name not in doc["select"]:
                    log(name)
                    run_variant(work, name, reference, a, doc, out, prune_order=order, prune_alloc="uniform",
                                prune_ridge=ridge, **kw)
        if "wanda" not in doc["select"]:
            log("wanda")
            run_variant(work, "wanda", reference, a, doc, out, prune_order="wanda", prune_alloc="uniform", **kw)
        for t in a.temperature:
            name = f"temperature={t:g}"
            if name not in doc["select"]:
                log(name)
                run_variant(work, name, reference, a, doc, out, prune_order="leverage", prune_alloc="uniql",
                            prune_temperature=t, **kw)


def summary(q: dict, rates: list[float], subsets: int) -> dict:
    """Per variant and rate: mean KLD over the calibration subsets and its spread (max - min)."""
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(k.rsplit("/", 1)[0] for k in q):
        runs = [q[f"{variant}/s{s}"] for s in range(subsets) if f"{variant}/s{s}" in q]
        if not runs:
            continue
        out[variant] = {}
        for r in rates:
            if not all(str(r) in x["rates"] for x in runs):
                continue
            klds = [x["rates"][str(r)]["kld_mean"] for x in runs]
            ppls = [x["rates"][str(r)]["ppl"] for x in runs]
            out[variant][str(r)] = {"kld_mean": float(np.mean(klds)), "kld_spread": float(max(klds) - min(klds)),
                                    "kld_min": min(klds), "kld_max": max(klds), "ppl_mean": float(np.mean(ppls)),
                                    "subsets": len(klds), "kld_per_subset": klds}
            # paired with wanda (the same subset's statistics; with +comp, wanda+comp's): the order's own effect
            base = "wanda+comp" if variant.endswith("+comp") else "wanda"
            pairs = [(x["rates"][str(r)]["kld_mean"], q[f"{base}/s{s}"]["rates"][str(r)]["kld_mean"])
                     for s, x in ((s, q.get(f"{variant}/s{s}")) for s in range(subsets))
                     if x is not None and str(r) in x["rates"] and str(r) in q.get(f"{base}/s{s}", {}).get("rates", {})]
            if variant != base and pairs:
                d = [a - b for a, b in pairs]
                out[variant][str(r)][f"minus_{base}_per_subset"] = d
    return out


# --- speed and memory --------------------------------------------------------------------------------------

def rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def pruned_bytes(bundle: Path, m: dict, rate: float) -> int:
    """Bytes of the model files the runtime loads at `rate` (the narrowed file, or the narrowed params + library)."""
    from edgeq.runtime import gguf_slice, onnx_slice
    from edgeq.runtime.manifest import artifact_path, pick_pruning
    from edgeq.runtime.tvm_backend import pruning_cuts

    art = next(x for x in m["artifacts"] if x["role"] == "model")
    full = sum(x["bytes"] for x in m["artifacts"] if x["role"] in ("model", "params", "model_data"))
    pr = pick_pruning(bundle, m, rate)
    if pr is None:
        return full
    if art["backend"] == "gguf":
        return gguf_slice.sliced_bytes(artifact_path(bundle, art["path"]), pr.widths, pr.align)
    if art["backend"] == "onnx":
        with tempfile.TemporaryDirectory() as d:
            onnx_slice.slice_mlp(artifact_path(bundle, art["path"]), Path(d) / "m.onnx", pr.widths, pr.full,
                                 m["onnx"]["pruning"])
            return (Path(d) / "m.onnx").stat().st_size
    from safetensors import safe_open

    cuts = pruning_cuts(bundle, m["tvm"], pr)
    removed = 0
    with safe_open(str(artifact_path(bundle, m["tvm"]["params"])), framework="np") as f:
        for name, (axis, keep) in cuts.items():
            sl = f.get_slice(name)
            shape = sl.get_shape()
            itemsize = np.dtype({"F32": "f4", "F16": "f2", "I8": "i1", "U8": "u1"}[sl.get_dtype()]).itemsize
            removed += (shape[axis] - keep) * int(np.prod(shape)) // shape[axis] * itemsize
    return full - removed


def child_speed(bundle: str, rate: float, tokens: int, threads: int) -> None:
    """One fresh process: load at `rate`, report memory after load and after decoding, and decode tokens/s."""
    from edgeq import runtime
    from edgeq.evaluate.texts import evaluation_text
    from edgeq.runtime.manifest import read_manifest

    b = Path(bundle)
    m = read_manifest(b)
    file_bytes = pruned_bytes(b, m, rate)
    backend = next(x["backend"] for x in m["artifacts"] if x["role"] == "model")
    importlib.import_module({"gguf": "llama_cpp", "onnx": "onnxruntime", "tvm": "tvm"}[backend])   # not timed
    before = rss_kib()
    t0 = time.perf_counter()
    s = runtime.load(bundle, threads=threads, n_ctx=512, pruning_rate=rate)
    load_s = time.perf_counter() - t0
    after_load = rss_kib()
    prompt = s.tokenize(evaluation_text()[:2000])[:64]
    be = s.backend
    be.reset()
    logits = be.feed(prompt)
    after_prefill = rss_kib()
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = be.feed([int(np.argmax(logits))])
    tps = tokens / (time.perf_counter() - t0)
    after = rss_kib()
    s.close()
    print(json.dumps({"rate": rate, "file_bytes": file_bytes, "load_s": load_s, "rss_before_kib": before,
                      "rss_after_load_kib": after_load, "rss_after_prefill_kib": after_prefill,
                      "rss_after_decode_kib": after, "tokens_per_s": tps}))


def stage_speed(a, doc: dict, out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="edgeq-uniql-speed-", dir=a.workdir))
    try:
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TVM_NUM_THREADS": str(a.threads)}
        bundles = {}
        for backend, quant in a.speed:
            bundle = work / f"{backend}-{quant}"
            bundles[backend] = (bundle, quant, export(bundle, backend=backend, quant=quant,
                                                      pruning_rates=a.speed_rates))
            for r in a.speed_rates:      # the first load at a rate may slice into the cache: not timed below
                subprocess.run([sys.executable, __file__, "--child-speed", str(bundle), str(r), "1", str(a.threads)],
                               check=True, capture_output=True, env=env)
        runs: dict[str, dict[str, list[dict]]] = {b: {str(r): [] for r in a.speed_rates} for b in bundles}
        for rnd in range(a.rounds):
            for backend, (bundle, quant, _) in bundles.items():
                order = a.speed_rates if rnd % 2 == 0 else list(reversed(a.speed_rates))
                for r in order:
                    p = subprocess.run([sys.executable, __file__, "--child-speed", str(bundle), str(r),
                                        str(a.tokens), str(a.threads)], check=True, capture_output=True, text=True,
                                       env=env)
                    res = json.loads(p.stdout.strip().splitlines()[-1])
                    runs[backend][str(r)].append(res)
                    log(f"  round {rnd} {backend} rate {r}: {res['tokens_per_s']:.1f} tok/s, RSS after load "
                        f"{res['rss_after_load_kib']['VmRSS'] / 1024:.0f} MiB")
        doc["speed"] = {"threads": a.threads, "rounds": a.rounds, "tokens": a.tokens, "backends": {}}
        reference = ReferenceCache(make_reference) if a.speed_quality else None
        for backend, (bundle, quant, m) in bundles.items():
            per_rate = {}
            for r, rs in runs[backend].items():
                tps = [x["tokens_per_s"] for x in rs]
                med = lambda key: statistics.median(x[key]["VmRSS"] / 1024 for x in rs)   # noqa: E731
                per_rate[r] = {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps),
                               "tokens_per_s_max": max(tps), "file_bytes": rs[0]["file_bytes"],
                               "rss_after_load_mib_median": med("rss_after_load_kib"),
                               "rss_after_prefill_mib_median": med("rss_after_prefill_kib"),
                               "rss_after_decode_mib_median": med("rss_after_decode_kib"),
                               "load_s_median": statistics.median(x["load_s"] for x in rs), "runs": rs}
            base = per_rate[str(a.speed_rates[0])]
            for r, v in per_rate.items():
                pruned_mib = (base["file_bytes"] - v["file_bytes"]) / 2**20
                v["model_mib_pruned"] = pruned_mib
                for when in ("load", "decode"):
                    freed = base[f"rss_after_{when}_mib_median"] - v[f"rss_after_{when}_mib_median"]
                    v[f"rss_freed_after_{when}_share_of_pruned"] = freed / pruned_mib if pruned_mib else None
                v["decode_speedup"] = v["tokens_per_s_median"] / base["tokens_per_s_median"]
                if reference is not None:
                    v["quality"] = quality(bundle, float(r), reference, a)
            doc["speed"]["backends"][backend] = {"quant": quant, "rates": per_rate}
            write(out, doc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    summ = doc.get("summary") or {}
    for variant, per in summ.items():
        rates = sorted(float(r) for r in per)
        kld = [per[str(r)]["kld_mean"] for r in rates]
        err = [per[str(r)]["kld_spread"] / 2 for r in rates]
        axes[0].errorbar([100 * r for r in rates], kld, yerr=err, marker="o", capsize=3, label=variant)
        axes[1].plot([100 * r for r in rates], [per[str(r)]["ppl_mean"] for r in rates], marker="o", label=variant)
    axes[0].set(xlabel="MLP channels pruned (%)", ylabel="KLD vs float source (f32 GGUF)", yscale="log",
                title="KLD by channel order (bars: spread over calibration subsets)")
    axes[1].set(xlabel="MLP channels pruned (%)", ylabel="perplexity (held-out)", title="perplexity")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    sp = doc.get("speed")
    if sp:
        ax = axes[2]
        ax2 = ax.twinx()
        for c, (backend, v) in enumerate(sp["backends"].items()):
            rates = sorted(float(r) for r in v["rates"])
            x = [100 * r for r in rates]
            ax.plot(x, [v["rates"][str(r)]["decode_speedup"] for r in rates], "o-", color=f"C{c}",
                    label=f"{backend} {v['quant']}: decode tok/s (x rate 0)")
            ax2.plot(x, [v["rates"][str(r)]["rss_after_load_mib_median"] / v["rates"][str(rates[0])][
                "rss_after_load_mib_median"] for r in rates], "s--", color=f"C{c}", alpha=0.6,
                     label=f"{backend}: resident after load (x rate 0)")
        ax.set(xlabel="MLP channels pruned (%)", ylabel="decode tokens/s, x rate 0 (1 thread)",
               title="speed and memory in each runtime")
        ax2.set_ylabel("resident memory after load, x rate 0")
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(doc: dict) -> None:
    summ = doc.get("summary") or {}
    if summ:
        rates = sorted({float(r) for per in summ.values() for r in per})
        print(f"{'variant':16}" + "".join(f" {'KLD @' + format(100 * r, 'g') + '%':>18}" for r in rates))
        for variant, per in summ.items():
            print(f"{variant:16}" + "".join(f" {per[str(r)]['kld_mean']:10.4f} ±{per[str(r)]['kld_spread'] / 2:.4f}"
                                            if str(r) in per else f" {'':>18}" for r in rates))
    sp = doc.get("speed")
    if sp:
        print(f"\nspeed and memory, {sp['threads']} thread(s), median of {sp['rounds']} interleaved rounds")
        print(f"{'backend':8} {'rate':>5} {'files MiB':>9} {'RSS load':>9} {'RSS dec':>8} {'freed/pruned':>13} "
              f"{'tok/s':>7} {'x':>6}")
        for backend, v in sp["backends"].items():
            for r, x in v["rates"].items():
                share = x["rss_freed_after_load_share_of_pruned"]
                print(f"{backend:8} {float(r):5.2f} {x['file_bytes'] / 2**20:9.1f} {x['rss_after_load_mib_median']:9.1f} "
                      f"{x['rss_after_decode_mib_median']:8.1f} {'' if share is None else format(share, '.2f'):>13} "
                      f"{x['tokens_per_s_median']:7.1f} {x['decode_speedup']:6.3f}")
    att = doc.get("attention")
    if att:
        print(f"\n--prune-attention (ONNX f32; MLPs {doc['attention_mlp_share']:.3f} of the prunable parameters)")
        print(f"{'variant':30} {'rate':>7} {'MLP':>7} {'attn':>7} {'KLD':>8} {'ppl':>8} {'top-1':>6}")
        for name, res in att.items():
            for r, q in res["rates"].items():
                print(f"{name:30} {float(r):7.4f} {q['achieved']:7.4f} {q.get('achieved_attention', 0.0):7.4f} "
                      f"{q['kld_mean']:8.4f} {q['ppl']:8.3f} {q['top1']:6.3f}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-speed":
        child_speed(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: [float(x) for x in s.split(",") if x.strip()]                 # noqa: E731
    ap.add_argument("--stage", default="all",
                    choices=["all", "select", "quality", "speed", "attention", "attention-parts"],
                    help="select: sweep --ridge/--temperature on calibration text; all: quality then speed; "
                         "attention: --prune-attention on ONNX f32 (the split on calibration text, held-out KLD)")
    ap.add_argument("--attention-rates", type=floats, default=[0.15, 0.25, 0.35])
    ap.add_argument("--attention-ratios", type=lambda t: [tuple(float(x) for x in p.split(":")) for p in t.split(",")],
                    default=[(1, 1), (0.5, 0.5), (0.25, 0.25), (1, 0), (0.5, 0)],
                    help="attention: the Q/K:V rate ratios (to the MLPs') tried on calibration text; the MLPs alone "
                         "at equal parameters always are")
    ap.add_argument("--rates", type=floats, default=[0.0, 0.05, 0.15, 0.25, 0.35])
    ap.add_argument("--orders", type=lambda s: s.split(","), default=list(ORDERS),
                    help="channel orders; ORDER+comp: with --prune-compensate (each rate's ffn_down bias)")
    ap.add_argument("--no-uniform", action="store_true", help="quality: skip the uniql+uniform allocation")
    ap.add_argument("--subsets", type=int, default=3, help="disjoint calibration subsets (the spread)")
    ap.add_argument("--calib-windows", type=int, default=None,
                    help="512-token calibration windows per subset (the channel statistics' sample; default: a "
                         "pruned export's, edgeq.compile.options.PRUNING_CALIB_WINDOWS; the default calibration "
                         "text has 120 windows)")
    ap.add_argument("--ridge", type=floats, default=[0.01, 0.1, 1.0, 10.0],
                    help="select: the ridge and leverage orders' ridge factors (uniform widths)")
    ap.add_argument("--temperature", type=floats, default=[0.5, 1.0, 2.0, 4.0],
                    help="select: uniql allocation's temperatures (uniql order)")
    ap.add_argument("--select-rates", type=floats, default=[0.15, 0.35])
    ap.add_argument("--select-chunks", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=8, help="512-token windows scored (8: 2,040 tokens)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed", type=lambda t: [tuple(p.split("=")) for p in t.split(",")],
                    default=[("gguf", "q4_0"), ("onnx", "int4"), ("tvm", "int4")],
                    help="backend=preset pairs for the speed stage")
    ap.add_argument("--speed-rates", type=floats, default=[0.0, 0.15, 0.25, 0.35])
    ap.add_argument("--speed-quality", action="store_true", help="also score each speed bundle at each rate")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per load")
    ap.add_argument("--workdir", default=None, help="where the bundles are written (default: the temp folder)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--fresh", action="store_true", help="ignore results already in --out")
    a = ap.parse_args()
    if a.calib_windows is None:
        from edgeq.compile.options import PRUNING_CALIB_WINDOWS

        a.calib_windows = PRUNING_CALIB_WINDOWS
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    doc: dict[str, Any] = {}
    if a.out.is_file() and not a.fresh:
        doc = json.loads(a.out.read_text())
    load = os.getloadavg()
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    doc["run"] = {"versions": versions(), "load_average_at_start": load, "cpu_count": os.cpu_count(),
                  "cpu_flags": [f for f in flags if f.startswith(("avx", "fma", "f16c", "sse4"))],
                  "rates": a.rates, "chunks": a.chunks, "ctx": a.ctx, "threads": a.threads}
    if a.stage == "select":
        stage_select(a, doc, a.out)
    if a.stage in ("all", "quality"):
        stage_quality(a, doc, a.out)
    if a.stage in ("all", "speed"):
        stage_speed(a, doc, a.out)
    if a.stage == "attention":
        stage_attention(a, doc, a.out)
    if a.stage == "attention-parts":
        stage_attention_parts(a, doc, a.out)
    doc["run"]["load_average_at_end"] = os.getloadavg()
    write(a.out, doc)
    if doc.get("summary") or doc.get("speed"):
        plot(doc, a.out.with_suffix(".png"))
    print_table(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
