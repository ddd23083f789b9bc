"""Latency budgets on SmolLM2 (GGUF): `--latency-ms X` against the best uniform preset that meets X.

For each limit X the ILP plans with `edgeq export --latency-ms X --latency-profile P` (default Fisher cost);
every plan and every preset is exported with the profile (so each manifest carries its prediction), timed on
this machine's `local` device in interleaved rounds (the runner's `latency` op: decode steps at 64 tokens of
context, as predicted; the profile's clock), and scored on held-out text (KLD against the float model, the
same windows for all). A limit is met when the measured decode step is within 10 % of X; the plan wins when
its KLD is below the KLD of the best preset whose measured decode step meets X.

    python bench/latency_budget.py --latency-profile ~/.cache/edgeq/profiles/XXXX-gguf-t1.json
    python bench/latency_budget.py --latency-profile P --limits 9,11 --presets q8_0,q4_0 --chunks 2   # quicker

Writes bench/results/latency_budget.json and latency_budget.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_PRESETS = ("q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0", "q3_k_m", "q2_k")
OUT = Path(__file__).resolve().parent / "results"
TOLERANCE = 0.10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export(work: Path, name: str, profile: str, **options) -> Path:
    from edgeq.api import ExportOptions
    from edgeq.api import export as run_export

    out = work / name
    if (out / "manifest.json").is_file():
        return out
    t0 = time.perf_counter()
    run_export(ExportOptions(out=str(out), force=True, latency_profile=profile, n_ctx=256, **options))
    log(f"exported {name} in {time.perf_counter() - t0:.0f} s")
    return out


def time_bundles(bundles: dict[str, Path], clock: str, rounds: int, threads: int) -> dict[str, dict[str, Any]]:
    """Interleaved rounds on the local device: the median decode step at 64 tokens of context, per round."""
    from edgeq.devices import open_device
    from edgeq.predictor.measure import median_ms, spread

    dev = open_device("local")
    per: dict[str, list[float]] = {k: [] for k in bundles}
    loads = []
    try:
        remote = {k: dev.push(b) for k, b in bundles.items()}
        names = list(bundles)
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                res = dev.run(remote[k], "latency", {"prefill": [], "decode": [64], "steps": 8, "warmup": 1},
                              threads=threads, n_ctx=256)
                if not res.ok:
                    raise RuntimeError(f"{k}: {res.error}")
                per[k].append(median_ms(res.result["decode"]["64"], clock))
                loads.append(res.result.get("load_average_before"))
            log(f"timing round {r + 1}/{rounds} done (load {loads[-1]})")
    finally:
        dev.close()
    return {k: {"decode_ms": float(np.median(v)), "spread": spread(v), "rounds": [round(x, 4) for x in v],
                "load_average": [x for x in loads if x]} for k, v in per.items()}


def score_rows(bundles: dict[str, Path], timed: dict[str, dict[str, Any]], chunks: int) -> list[dict[str, Any]]:
    """Per bundle: size, predicted and measured decode step, and held-out KLD against the float model (one float
    reference for all)."""
    from edgeq.evaluate.bundle import evaluate_bundle
    from presets import ReferenceCache, make_reference

    reference = ReferenceCache(make_reference)
    rows = []
    for name, b in bundles.items():
        m = json.loads((b / "manifest.json").read_text())
        ev = evaluate_bundle(b, chunks=chunks, reference_logits=reference, record=False, pareto=False)
        rows.append({"name": name, "mb": sum(x["bytes"] for x in m["artifacts"] if x["role"] != "tokenizer") / 1e6,
                     "bpw": m["model"]["bits_per_weight"], "predicted_ms": m["predicted"]["latency_ms_per_token"],
                     "measured_ms": timed[name]["decode_ms"], "spread": timed[name]["spread"],
                     "rounds_ms": timed[name]["rounds"], "kld": ev["kld_mean"], "top1": ev["top1"],
                     "limit_ms": m["plan"].get("search", {}) and m["plan"]["search"].get("predicted_latency_ms_limit")})
        log(f"{name}: {rows[-1]['measured_ms']:.3f} ms (predicted {rows[-1]['predicted_ms']:.3f}), KLD {ev['kld_mean']:.4f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-profile", required=True)
    ap.add_argument("--limits", help="comma-separated ms (default: between the presets' measured decode steps)")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    ap.add_argument("--chunks", type=int, default=4, help="held-out 512-token windows scored (default 4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/edgeq-latency-budget")
    ap.add_argument("--out", default=str(OUT / "latency_budget.json"))
    a = ap.parse_args(argv)

    from edgeq.predictor.profile import load_profile

    profile = load_profile(a.latency_profile)
    clock, threads = profile.clock, profile.threads
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    bundles = {p: export(work, f"preset-{p}", a.latency_profile, quant=p) for p in presets}
    first = time_bundles(bundles, clock, a.rounds, threads)
    if a.limits:
        limits = [float(x) for x in a.limits.split(",")]
    else:
        ms = sorted(v["decode_ms"] for v in first.values())
        limits = [round(float(x), 2) for x in np.quantile(ms, [0.25, 0.5, 0.75])]
    for x in limits:
        bundles[f"ilp@{x:g}ms"] = export(work, f"ilp-{x:g}ms", a.latency_profile, latency_ms=x)
    timed = time_bundles(bundles, clock, a.rounds, threads)
    rows = score_rows(bundles, timed, a.chunks)
    by = {r["name"]: r for r in rows}
    verdicts = []
    for x in limits:
        plan = by[f"ilp@{x:g}ms"]
        meeting = [by[p] for p in presets if by[p]["measured_ms"] <= x]
        best = min(meeting, key=lambda r: r["kld"]) if meeting else None
        verdicts.append({"limit_ms": x, "plan_measured_ms": plan["measured_ms"], "plan_predicted_ms": plan["predicted_ms"],
                         "meets_within_10pct": plan["measured_ms"] <= x * (1 + TOLERANCE), "plan_kld": plan["kld"],
                         "best_preset": best and best["name"], "best_preset_ms": best and best["measured_ms"],
                         "best_preset_kld": best and best["kld"],
                         "plan_beats_preset": best is None or plan["kld"] < best["kld"]})
    loads = [x for v in timed.values() for x in v["load_average"]]
    res = {"profile": {"path": a.latency_profile, "device": profile.device.get("cpu"), "clock": clock,
                       "threads": threads, "noise": profile.noise},
           "machine": {"cpu_flags": profile.device.get("flags"), "python": platform.python_version()},
           "load_average_max_1min": max((x[0] for x in loads), default=None), "chunks": a.chunks,
           "rows": rows, "limits": verdicts}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print("| limit ms | ILP plan measured ms (predicted) | ILP KLD | best preset meeting it | its ms | its KLD |")
    print("|---|---|---|---|---|---|")
    for v in verdicts:
        print(f"| {v['limit_ms']:g} | {v['plan_measured_ms']:.2f} ({v['plan_predicted_ms']:.2f}) | {v['plan_kld']:.4f} | "
              f"{v['best_preset'] or '-'} | {v['best_preset_ms'] or float('nan'):.2f} | "
              f"{v['best_preset_kld'] or float('nan'):.4f} |")
    plot(rows, limits, Path(a.out).with_suffix(".png"), f"{profile.describe()}; load max {res['load_average_max_1min']}")
    return 0


def plot(rows, limits, path: Path, title: str, planned: tuple[str, ...] = ("ilp",)) -> None:
    """Measured decode step against KLD; rows whose name starts with one of `planned` starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ilp = r["name"].startswith(planned)
        ax.scatter(r["measured_ms"], r["kld"], color="tab:red" if ilp else "tab:blue", marker="*" if ilp else "o")
        ax.annotate(r["name"], (r["measured_ms"], r["kld"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for x in limits:
        ax.axvline(x, color="0.7", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("measured decode step at 64 tokens of context (ms)")
    ax.set_ylabel("KLD vs float (held-out)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
