"""MLP channel orders compared on a cheap proxy: the down projection's output error, across calibration subsets.

bench/uniql.py scores an order by exporting and running a bundle (minutes per order and subset); this reads only the
calibration statistics (the same cached entries a pruned export of subset i of `--subsets` writes) and measures what
the ranking is built to minimise. For each order and subset s: the ranking from subset s's statistics, each layer
cut to its `--rate` width (`--prune-alloc uniql` from subset s's layer importances, as in bench/uniql.py), and the
share of the MLP output's energy the removed channels S carry on subset t's statistics,
1_Sᵀ G_t 1_S / 1ᵀ G_t 1 with G_t = C_t ⊙ W_downᵀW_down (no refit), averaged over layers. t = s is in-sample; t ≠ s
is what the order does on tokens it has not seen. The held-out text is never read.

Orders: `wanda`, `uniql` (greedy removal on G), `ridge` on G and `leverage` on C at several λ (× tr/n), the
ridge leverage of D C D with D = diag(‖W_down[:, j]‖) (each channel's activation scaled by its down column's norm:
G without the cross terms' directions), and greedy removal on G with its off-diagonal halved (shrinkage).

    python bench/uniql_proxy.py --calib-windows 16 --subsets-run 0,1 --layer-step 3

Writes bench/results/uniql_proxy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import log, versions  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "uniql_proxy.json"


def orders(c: np.ndarray, w: np.ndarray, wtw: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate ranking of one layer (best first) from its down projection's input covariance C."""
    from edgeq.passes.uniql_sort import greedy_removal, ridge_leverage, sort_order

    g = c * wtw
    norms = np.linalg.norm(w, axis=0)
    dcd = c * np.outer(norms, norms)
    out = {"wanda": sort_order(norms * np.sqrt(np.maximum(np.diag(c), 0.0))),
           "uniql": sort_order(greedy_removal(g)),
           "greedy-shrink0.5": sort_order(greedy_removal(0.5 * g + 0.5 * np.diag(np.diag(g))))}
    for lam in (10.0, 100.0):
        out[f"ridge-G-{lam:g}"] = sort_order(ridge_leverage(g, lam))
    out["leverage-C-1"] = sort_order(ridge_leverage(c, 1.0))
    for lam in (1.0, 10.0, 100.0):
        out[f"ridge-DCD-{lam:g}"] = sort_order(ridge_leverage(dcd, lam))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-windows", type=int, default=None, help="per subset (default: a pruned export's)")
    ap.add_argument("--subsets", type=int, default=3)
    ap.add_argument("--subsets-run", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--rate", type=float, default=0.15)
    ap.add_argument("--layer-step", type=int, default=1, help="every k-th layer (the proxy's cost)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    from edgeq.compile.options import PRUNING_CALIB_WINDOWS
    from edgeq.importers.gguf import import_gguf
    from edgeq.models import llama
    from edgeq.models.recipes.default import default_model_path
    from edgeq.passes.calibrate import calibrate
    from edgeq.passes.uniql_alloc import layer_shares, widths_for

    windows = a.calib_windows or PRUNING_CALIB_WINDOWS
    subs = a.subsets_run if a.subsets_run is not None else list(range(a.subsets))
    t0 = time.perf_counter()
    graph = import_gguf(default_model_path())
    n = graph.config.n_layers
    full = llama.mlp_widths(graph)
    layers = list(range(0, n, a.layer_step))
    downs = {i: llama.mlp_weights(i)[2] for i in layers}
    w = {i: graph.weights[downs[i]].numpy().astype(np.float64) for i in layers}
    wtw = {i: w[i].T @ w[i] for i in layers}
    cov, widths = {}, {}
    every_down = frozenset(llama.mlp_weights(i)[2] for i in range(n))
    for s in subs:
        # the key a pruned f32 export of this subset uses: its cached statistics are read, not recomputed
        cal = calibrate(graph, windows, max_full=0, full_for=every_down, subset=(s, a.subsets))
        importance = 1.0 - np.asarray(cal.layer_cos, dtype=np.float64)
        widths[s] = widths_for(full, [1] * n, layer_shares(importance, a.rate, "uniql"), a.rate)
        for i in layers:
            cov[s, i] = cal.full(downs[i])
        log(f"subset {s}: statistics ({time.perf_counter() - t0:.0f} s)")
    err: dict[str, dict[str, list[float]]] = {}
    for s in subs:
        for i in layers:
            for name, o in orders(cov[s, i], w[i], wtw[i]).items():
                cut = o[widths[s][i]:]
                for t in subs:
                    g = cov[t, i] * wtw[i]
                    share = float(g[np.ix_(cut, cut)].sum() / g.sum())
                    err.setdefault(name, {}).setdefault(f"{s}->{t}", []).append(share)
        log(f"subset {s}: orders scored ({time.perf_counter() - t0:.0f} s)")
    table = {}
    for name, per in err.items():
        means = {k: float(np.mean(v)) for k, v in per.items()}
        outside = [v for k, v in means.items() if k.split("->")[0] != k.split("->")[1]]
        table[name] = {"per_pair": means, "out_of_sample_mean": float(np.mean(outside)) if outside else None,
                       "in_sample_mean": float(np.mean([means[f"{s}->{s}"] for s in subs]))}
    ref = table["wanda"]
    print(f"{'order':18} {'in-sample':>10} {'out-of-sample':>14} {'vs wanda (out)':>15}")
    for name, r in table.items():
        rel = (r["out_of_sample_mean"] / ref["out_of_sample_mean"] - 1) if r["out_of_sample_mean"] else float("nan")
        r["out_of_sample_vs_wanda"] = rel
        print(f"{name:18} {r['in_sample_mean']:10.6f} {r['out_of_sample_mean'] or float('nan'):14.6f} {rel:+15.2%}")
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    doc = {"run": {"versions": versions(), "calib_windows": windows, "subsets": a.subsets, "subsets_run": subs,
                   "rate": a.rate, "layers": layers, "load_average_at_end": os.getloadavg(),
                   "cpu_flags": [f for f in flags if f.startswith(("avx", "fma"))]},
           "output_error_share": table}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
