"""Re-score the additivity check's measured random plans under each cost model (no new llama.cpp run).

    python bench/additivity_costs.py [--results bench/results/additivity_4w.json] [--groups]

Takes the random plans `bench/mixed_precision.py --additivity-only` measured (each row records its choice of
format per tensor; older results without it are rebuilt from the same seeded generator) and recomputes each
plan's summed predicted cost with:
  - output: tr(dW C dW^T) (the plain ILP's cost),
  - fisher-diag: Σ_o F_o (dW C dW^T)_oo (F per output row from passes/fisher.py, C the calibration's E[xxᵀ]),
  - fisher: Σ_o F_o (dW C_F dW^T)_oo with each token weighted by its output-gradient energy (C_F, passes/fisher.py;
    what `--cost fisher` uses),
then reports Spearman's ρ against the KLD llama.cpp measured, and per tensor group (embedding, q/k/v/o, gate,
up, down) its mean share of the summed cost and the ρ left when that group is dropped (which group moves
against the measurement).

--groups also checks each cost against the truth per group: every tensor of one group in one format, the
rest float, KLD measured in float (edgeq's executor, dequantized weights) on one
calibration window, against Σ predicted / 2 (the costs are 2·KLD to second order). Writes JSON beside the
results (…_costs.json, and additivity_groups.json for --groups).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mixed_precision import FORMATS_A, FORMATS_B, random_choice, subset  # noqa: E402

GROUPS = ["embed", "q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down"]


def group(name: str) -> str:
    return next((g for g in GROUPS if g in name), name)


def cost_tables(graph, model, formats: list[str]):
    """{'output', 'fisher-diag', 'fisher'}: CostTable, all from one calibration and one Fisher pass (cached)."""
    from edgeq.core.progress import make_progress
    from edgeq.passes import Context
    from edgeq.passes.calibrate import Calibrate
    from edgeq.passes.fisher import Fisher
    from edgeq.passes.sensitivity import Sensitivity
    from edgeq.runtime.tokenizer import spec_from_gguf_metadata, spec_to_json
    from edgeq.targets.gguf.layout import gguf_layout

    ctx = Context(backend="gguf", progress=make_progress(False))
    Calibrate().run(graph, None, ctx)
    cal = ctx.analysis["calibration"]
    layout = gguf_layout(graph, spec_to_json(spec_from_gguf_metadata(graph.metadata["gguf"], model)))
    Fisher().run(graph, None, ctx)
    full = ctx.analysis["fisher"].collect()
    variants = {"output": None, "fisher-diag": {k: v for k, v in full.items() if not k.startswith(("cov:", "lookup_tokens:"))},
                "fisher": full}
    out = {}
    for name, fisher in variants.items():
        c = Context(backend="gguf", analysis={"calibration": cal, **({"fisher": fisher} if fisher else {})},
                    progress=ctx.progress)
        Sensitivity(layout, formats=formats).run(graph, None, c)
        out[name] = c.analysis["costs"]
    return out, cal, full


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "additivity_4w.json"))
    ap.add_argument("--groups", action="store_true", help="also the per-group check against float KLD")
    ap.add_argument("--reuse-tables", action="store_true",
                    help="reuse the cost tables an earlier run left in the cache (skips the Fisher pass)")
    ap.add_argument("--what-if", default=None, metavar="GROUP=FACTOR",
                    help="score with one group's costs multiplied by FACTOR (e.g. v_proj=1.86, the coherence factor "
                         "bench/fisher_attention.py measures): what correcting that group would do to ρ")
    args = ap.parse_args()
    from scipy.stats import spearmanr

    factor = np.ones(len(GROUPS))
    if args.what_if:
        g, f = args.what_if.split("=")
        factor[GROUPS.index(g)] = float(f)

    from edgeq.core.cache import cache_dir
    from edgeq.importers.gguf import import_gguf
    from edgeq.models.recipes.default import default_model_path
    from edgeq.passes.sensitivity import CostTable

    model = default_model_path()
    graph = import_gguf(model)
    saved = (cache_dir() or Path("/tmp")) / "bench-additivity-tables.json"
    if args.reuse_tables and saved.is_file() and not args.groups:
        tables = {k: CostTable.from_json(v) for k, v in json.loads(saved.read_text()).items()}
    else:
        tables, cal, _ = cost_tables(graph, model, FORMATS_B)
        saved.write_text(json.dumps({k: t.to_json() for k, t in tables.items()}))
    res = json.loads(Path(args.results).read_text())
    rand = [r for r in res["runs"] if r["kind"] == "random" and r["formats"] == "no_q4_1_q5_1"]
    if all("choice" in r for r in rand):
        plans = [r["choice"] for r in rand]
    else:       # older results: the same seeded generator over the same table rebuilds the plans
        rng = np.random.default_rng(0)
        tb = subset(tables["output"], FORMATS_A)
        plans = [{n: o.format for n, o in random_choice(tb, rand[0]["budget_bytes"], rng).items()} for _ in rand]
    kld = np.array([r["kld_mean"] for r in rand])
    out = {"results": str(Path(args.results).relative_to(ROOT)) if Path(args.results).is_absolute() else args.results,
           "n_plans": len(rand), "n_tokens_scored": rand[0]["n_tokens_scored"], "budget_bytes": rand[0]["budget_bytes"],
           "bytes_range": [min(r["bytes"] for r in rand), max(r["bytes"] for r in rand)],
           "kld_range": [float(kld.min()), float(kld.max())], "what_if": args.what_if, "costs": {}}
    for kind, t in tables.items():
        per = np.array([[sum(t.option(n, f).cost for n, f in ch.items() if group(n) == g) for g in GROUPS]
                        for ch in plans]) * factor
        total = per.sum(1)
        rho = spearmanr(total, kld)
        row = {"cost": t.info.get("cost"), "rho": float(rho.statistic), "p": float(rho.pvalue),
               "pearson_r": float(np.corrcoef(total, kld)[0, 1]), "groups": {}}
        for gi, g in enumerate(GROUPS):
            row["groups"][g] = {"mean_share": float(np.mean(per[:, gi] / total)),
                                "rho_alone": float(spearmanr(per[:, gi], kld).statistic),
                                "rho_without": float(spearmanr(total - per[:, gi], kld).statistic)}
        if "fisher" in kind:    # the costs are 2·KLD to second order
            row["predicted_kld_mean"] = float(np.mean(total) / 2)
        out["costs"][kind] = row
        print(f"{kind:12s} rho {row['rho']:+.3f} (p {row['p']:.2g})  pearson {row['pearson_r']:+.3f}", flush=True)
    out["measured_kld_mean"] = float(kld.mean())
    suffix = f"_costs_{args.what_if.replace('=', '')}" if args.what_if else "_costs"
    path = Path(args.results).with_name(Path(args.results).stem + suffix + ".json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    if not args.what_if:
        _plot(tables, plans, kld, out, path.with_suffix(".png"))
    print(json.dumps(out, indent=1))
    if args.groups:
        groups_check(graph, cal, tables, ROOT / "bench" / "results" / "additivity_groups.json")
    return 0


def _plot(tables, plans, kld, out: dict, path: Path) -> None:
    """Summed predicted cost vs measured KLD, one panel per cost model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4 * len(tables), 3.6), dpi=110)
    for ax, (kind, t) in zip(np.atleast_1d(axes), tables.items()):
        total = [sum(t.option(n, f).cost for n, f in ch.items()) for ch in plans]
        ax.scatter(total, kld, s=14, c="C1")
        ax.set_title(f"{kind}: Spearman rho {out['costs'][kind]['rho']:+.2f}", fontsize=9)
        ax.set_xlabel("summed predicted cost", fontsize=8)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("KLD measured in llama.cpp", fontsize=8)
    fig.suptitle(f"{out['n_plans']} random plans within 2% of {out['budget_bytes'] / 1e6:.1f} MB "
                 f"({out['n_tokens_scored']} tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def groups_check(graph, cal, tables, path: Path) -> None:
    """Per group and format: float KLD of quantizing that group alone vs each cost's Σ predicted / 2."""
    from dataclasses import replace

    from edgeq.core.executor import Executor
    from edgeq.core.formats import get_format
    from edgeq.evaluate.decoder import log_softmax64
    from edgeq.passes.calibrate import calibration_tokens, calibration_windows

    tokens, bos, add_bos = calibration_tokens(graph)
    win = calibration_windows(tokens, 512, 4, bos, add_bos)[1]
    imatrix = cal.imatrix()

    def logp(g):
        return log_softmax64(Executor(g).logits(win))

    ref = logp(graph)
    rows = []
    cases = [(g, "q4_0") for g in GROUPS] + [("down", "q3_k"), ("down", "q2_k"), ("embed", "q5_0")]
    for g, fmt in cases:
        t0 = time.perf_counter()
        f = get_format(fmt)
        names = [n for n, t in graph.weights.items() if len(t.shape) == 2 and group(n) == g]
        ws = dict(graph.weights)
        for n in names:
            w = np.array(graph.weights[n].numpy(), dtype=np.float32)
            q = f.roundtrip(w, imatrix.get(n) if f.takes_imatrix else None).astype(np.float32)
            ws[n] = replace(ws[n], load=lambda q=q: q)
        kld = float((np.exp(ref) * (ref - logp(replace(graph, weights=ws)))).sum(-1)[1:].mean())
        row = {"group": g, "format": fmt, "tensors": len(names), "float_kld": kld,
               **{f"{k}_predicted": sum(t.option(n, fmt).cost for n in names) / 2 for k, t in tables.items()}}
        for k in tables:
            if k != "output":
                row[f"{k}_over_float"] = row[f"{k}_predicted"] / kld
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps({"window": "calibration window 1 of 4 (512 tokens)", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
