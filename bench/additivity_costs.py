"""Re-score the additivity check's measured random plans under other cost models (no new measurement).

    python bench/additivity_costs.py [--results bench/results/additivity.json]

bench/mixed_precision.py --additivity-only draws its random plans from a seeded generator over the cached
cost table, so the same plans can be rebuilt here and their summed cost recomputed with:
  - output: tr(dW C dW^T) (what the ILP minimises; the ρ the additivity run reports),
  - fisher: Σ_o F_o (dW C dW^T)_oo (passes/fisher.py; needs the Fisher-weighted table in the cache, which
    `bench/search_methods.py --what fisher` leaves there),
and reports Spearman's ρ against the KLD llama.cpp measured for each plan. Writes JSON beside the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mixed_precision import FORMATS_A, FORMATS_B, random_choice, subset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "additivity.json"))
    args = ap.parse_args()
    from scipy.stats import spearmanr

    from edgeq.passes.calibrate import cache_dir
    from edgeq.passes.sensitivity import CostTable

    res = json.loads(Path(args.results).read_text())
    rand = [r for r in res["runs"] if r["kind"] == "random" and r["formats"] == "no_q4_1_q5_1"]
    budget = rand[0]["budget_bytes"]
    tables = {}
    for p in sorted((cache_dir() / "sensitivity").glob("*.json"), key=lambda p: p.stat().st_mtime):
        t = CostTable.from_json(json.loads(p.read_text()))
        if t.n_params < 100_000_000 or any(o.rank for v in t.options.values() for o in v):
            continue
        kind = "fisher" if "Fisher" in str(t.info.get("cost")) else "output"
        if kind == "output" and set(t.info.get("formats", [])) != set(FORMATS_B):
            continue
        tables[kind] = t
    base = tables["output"]
    # rebuild the plans exactly as the additivity run drew them (same table, same seeded generator)
    rng = np.random.default_rng(0)
    tb = subset(base, FORMATS_A)
    plans = []
    for r in rand:
        plans.append(random_choice(tb, budget, rng))
    out = {"n": len(rand), "budget_bytes": budget}
    kld = [r["kld_mean"] for r in rand]
    for kind, t in tables.items():
        summed = [sum(t.option(n, o.format).cost for n, o in ch.items()) for ch in plans]
        rho = spearmanr(summed, kld)
        out[kind] = {"rho": float(rho.statistic), "p": float(rho.pvalue)}
    check = [sum(o.cost for o in ch.values()) for ch in plans]
    out["rebuilt_matches_recorded"] = bool(np.allclose(check, [r["predicted_error"] for r in rand], rtol=1e-9))
    path = Path(args.results).with_name(Path(args.results).stem + "_costs.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
