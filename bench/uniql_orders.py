"""Screening MLP channel orders for `--prune-order` on the default model, in torch, on calibration text only.

Exporting and scoring a bundle in llama.cpp (bench/uniql.py --stage quality) takes minutes per order and subset;
this runs the IR's ops in torch (passes/torch_forward.torch_node) node by node across all windows at once, so a
layer's order can be computed from statistics of the model as pruned upstream of it, and masks the down
projections' inputs instead of exporting. Windows: calibration subset i of `--subsets` (bench/uniql.py's
calibration statistics) and `--eval-windows` 512-token windows of the calibration text that are in none of the
subsets (the held-out half is never read). Widths: `--prune-alloc uniql` from the subset's own layer importances,
the same for every order (as in bench/uniql.py).

Variants (each an order per layer, nested: one ranking per layer serves every rate):
- `uniql`: greedy removal on G = C ⊙ WᵀW (passes/uniql_sort.py, the default);
- `wanda`: ‖W[:, j]‖·√E[h_j²];
- `sequential`: `uniql` with each layer's C taken from the model whose earlier layers are already pruned at
  `--reference-rate` by their own sequential orders (SparseGPT/Wanda's sequential mode);
- `residual`: `uniql` with every token's outer product weighted by 1/mean(r²) of the residual stream r leaving the
  layer (the error as the next RMSNorm sees it, relative to the residual's scale);
- `uniql+mean` and `wanda+mean`: those orders plus the removed channels' mean contribution W[:, S]·E[h_S] added back
  as a bias (FLAP's compensation; a bias per rate that the bundles do not carry: how much it would buy);
- `insample-uniql`, `insample-wanda`: orders from the scored windows' own statistics (a bound on what better
  statistics could buy with each objective).

    python bench/uniql_orders.py --subsets-run 0 --rates 0.15            # one subset, every variant
    python bench/uniql_orders.py --variants uniql,wanda,sequential       # all three subsets

Writes bench/results/uniql_orders.json after each subset.
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

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "uniql_orders.json"
VARIANTS = ("uniql", "wanda", "sequential", "residual", "uniql+mean", "wanda+mean", "insample-uniql", "insample-wanda")


class Model:
    """The default model's graph run in torch across many windows at once, node by node."""

    def __init__(self, torch):
        from edgeq.importers.gguf import import_gguf
        from edgeq.models import llama
        from edgeq.models.recipes.default import default_model_path

        self.torch = torch
        self.graph = import_gguf(default_model_path())
        self.weights = {n: torch.from_numpy(np.array(t.numpy(), dtype=np.float32))       # a writable copy
                        for n, t in self.graph.weights.items()}
        n = self.graph.config.n_layers
        self.down = {llama.mlp_weights(i)[2]: i for i in range(n)}
        self.full = llama.mlp_widths(self.graph)
        # the residual that each down projection's output is added to (the add node reading it)
        produced = {node.outputs[0]: node for node in self.graph.nodes}
        self.residual_in = {}
        for node in self.graph.nodes:
            if node.op == "add":
                for i, j in ((0, 1), (1, 0)):
                    src = produced.get(node.inputs[i])
                    if src is not None and src.op == "linear" and src.inputs[1] in self.down:
                        self.residual_in[src.inputs[1]] = node.inputs[j]
        # the values each node is the last reader of (dropped after it: a walk keeps about one layer's values)
        last = {name: k for k, node in enumerate(self.graph.nodes) for name in node.inputs}
        self.dead: dict[int, list[str]] = {}
        for name, k in last.items():
            if name not in ("tokens", "positions"):
                self.dead.setdefault(k, []).append(name)

    def run(self, windows: list[list[int]], on_down=None, on_logits=None) -> None:
        """`on_down(layer, xs, residuals)` -> (xs, bias or None): sees every window's down-projection input (and
        the residual it is added to) before the product; `on_logits(k, logits)` gets window k's logits (None: the
        head is skipped)."""
        from edgeq.passes.torch_forward import torch_node

        torch = self.torch
        outputs = {v.name for v in self.graph.outputs}
        envs = [{"tokens": torch.as_tensor(w), "positions": torch.arange(len(w))} for w in windows]
        with torch.no_grad():
            for index, node in enumerate(self.graph.nodes):
                if node.outputs[0] in outputs and on_logits is None:
                    continue            # statistics only: the vocabulary-wide head product is not needed
                weight = node.inputs[1] if node.op == "linear" else None
                xs, bias = None, None
                if weight in self.down and on_down is not None:
                    xs, bias = on_down(self.down[weight], [e[node.inputs[0]] for e in envs],
                                       [e[self.residual_in[weight]] for e in envs])
                for k, e in enumerate(envs):
                    args = [e[i] if i in e else self.weights[i] for i in node.inputs]
                    if xs is not None:
                        args[0] = xs[k]
                    out = torch_node(node, args, e["positions"], self.weights, torch)
                    if bias is not None:
                        out = out + bias
                    if node.outputs[0] in outputs:
                        on_logits(k, out)
                    else:
                        e[node.outputs[0]] = out
                for e in envs:
                    for name in self.dead.get(index, []):
                        e.pop(name, None)


def mask(torch, order: np.ndarray, width: int, n: int):
    m = torch.zeros(n)
    m[torch.from_numpy(np.ascontiguousarray(order[:width]))] = 1.0
    return m


class Statistics:
    """What one forward pass over the calibration windows yields per layer: the orders and the channels' means."""

    def __init__(self, model: Model, weighted: bool = False, sequential_widths: list[int] | None = None,
                 cost_widths: list[int] | None = None):
        """`cost_widths`: also record, per layer, the output error 1_Sᵀ G 1_S of the channels `uniql` and `wanda`
        remove at those widths, on these windows' own G (`output_error`: layer -> (uniql, wanda))."""
        self.model, self.weighted, self.sequential_widths = model, weighted, sequential_widths
        self.cost_widths = cost_widths
        self.orders: dict[str, dict[int, np.ndarray]] = {}
        self.mean: dict[int, np.ndarray] = {}
        self.output_error: dict[int, tuple[float, float]] = {}

    def __call__(self, layer: int, xs: list, residuals: list):
        from edgeq.passes.uniql_sort import greedy_removal, sort_order

        torch = self.model.torch
        w = self.model.weights[[k for k, v in self.model.down.items() if v == layer][0]]
        a = torch.cat(xs).double()
        c = (a.T @ a / a.shape[0]).numpy()
        self.mean[layer] = a.mean(0).numpy()
        wd = w.double().numpy()
        wtw = wd.T @ wd
        prefix = "sequential" if self.sequential_widths is not None else ""
        self.orders.setdefault(prefix or "uniql", {})[layer] = sort_order(greedy_removal(c * wtw))
        if not prefix:
            norms = np.linalg.norm(wd, axis=0)
            self.orders.setdefault("wanda", {})[layer] = sort_order(norms * np.sqrt(np.maximum(np.diag(c), 0)))
            if self.cost_widths is not None:
                g = c * wtw
                cut = [self.orders[k][layer][self.cost_widths[layer]:] for k in ("uniql", "wanda")]
                self.output_error[layer] = tuple(float(g[np.ix_(x, x)].sum()) for x in cut)
        if self.weighted:
            r = torch.cat([res + x @ w.T for res, x in zip(residuals, xs)]).double()
            scale = 1.0 / (r.square().mean(-1) + 1e-12)
            cw = ((a * scale[:, None]).T @ a / a.shape[0]).numpy()
            self.orders.setdefault("residual", {})[layer] = sort_order(greedy_removal(cw * wtw))
        if prefix:
            m = mask(torch, self.orders["sequential"][layer], self.sequential_widths[layer], wd.shape[1])
            return [x * m for x in xs], None
        return None, None


def kld_mean(torch, ref_logp, logits) -> float:
    lq = torch.log_softmax(logits.double(), -1)
    return float((ref_logp.exp() * (ref_logp - lq)).sum(-1).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: [float(x) for x in s.split(",") if x.strip()]                 # noqa: E731
    ap.add_argument("--rates", type=floats, default=[0.15, 0.35])
    ap.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    ap.add_argument("--subsets", type=int, default=3, help="disjoint calibration subsets (as bench/uniql.py)")
    ap.add_argument("--subsets-run", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="which subsets to run (default all)")
    ap.add_argument("--calib-windows", type=int, default=4, help="512-token windows per subset")
    ap.add_argument("--eval-windows", type=int, default=6, help="scored windows of the calibration text outside "
                                                                 "every subset")
    ap.add_argument("--reference-rate", type=float, default=0.15,
                    help="sequential: the rate upstream layers are pruned at while a layer's statistics are taken")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant {bad[0]} ({', '.join(VARIANTS)})")
    import torch

    from edgeq.passes.calibrate import calibrate, calibration_tokens, calibration_windows
    from edgeq.passes.uniql_alloc import layer_shares, widths_for

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = Model(torch)
    n = model.graph.config.n_layers
    tokens, bos, add_bos = calibration_tokens(model.graph)
    ctx = 512
    subsets = {s: calibration_windows(tokens, ctx, a.calib_windows, bos, add_bos, None, (s, a.subsets))
               for s in range(a.subsets)}
    used = {tuple(w[1:]) for ws in subsets.values() for w in ws}
    rest = []
    for k in range(len(tokens) // ctx):
        w = list(tokens[k * ctx:(k + 1) * ctx])
        if add_bos and bos is not None:
            w[0] = bos
        if tuple(w[1:]) not in used:
            rest.append(w)
    scored = [rest[int(k)] for k in np.linspace(3, len(rest) - 4, a.eval_windows).round()]
    ref: list = [None] * len(scored)

    def keep_ref(k, logits):
        ref[k] = torch.log_softmax(logits.double(), -1).float()

    model.run(scored, on_logits=keep_ref)
    log(f"reference logits on {len(scored)} windows ({time.perf_counter() - t0:.0f} s)")

    def score(orders: dict[int, np.ndarray], widths: list[int], means: dict[int, np.ndarray] | None) -> float:
        klds = []

        def on_down(layer, xs, residuals):
            m = mask(torch, orders[layer], widths[layer], model.full[layer])
            bias = None
            if means is not None:
                w = model.weights[[k for k, v in model.down.items() if v == layer][0]].double()
                bias = (w @ torch.from_numpy((1.0 - m.double().numpy()) * means[layer])).float()
            return [x * m for x in xs], bias

        model.run(scored, on_down=on_down, on_logits=lambda k, lg: klds.append(kld_mean(torch, ref[k].double(), lg)))
        return float(np.mean(klds))

    doc = json.loads(a.out.read_text()) if a.out.is_file() else {}
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    doc["run"] = {"versions": {**versions(), "torch": torch.__version__}, "load_average_at_start": os.getloadavg(),
                  "threads": a.threads,
                  "cpu_flags": [f for f in flags if f.startswith(("avx", "fma", "f16c"))],
                  "calib_windows": a.calib_windows, "eval_windows": len(scored), "reference_rate": a.reference_rate}
    doc.setdefault("kld", {})
    for s in a.subsets_run if a.subsets_run is not None else range(a.subsets):
        # the subset's layer importances, uniql_alloc's input (the cosines need no full covariances: max_full=0)
        cal = calibrate(model.graph, a.calib_windows, ctx, max_full=0, subset=(s, a.subsets))
        importance = 1.0 - np.asarray(cal.layer_cos, dtype=np.float64)
        widths = {r: widths_for(model.full, [1] * n, layer_shares(importance, r, "uniql"), r) for r in a.rates}
        plain = Statistics(model, weighted="residual" in a.variants)
        model.run(subsets[s], on_down=plain)
        orders = dict(plain.orders)
        if "sequential" in a.variants:
            ref_widths = widths_for(model.full, [1] * n, layer_shares(importance, a.reference_rate, "uniql"),
                                    a.reference_rate)
            seq = Statistics(model, sequential_widths=ref_widths)
            model.run(subsets[s], on_down=seq)
            orders["sequential"] = seq.orders["sequential"]
        if any(v.startswith("insample") for v in a.variants):
            ins = Statistics(model, cost_widths=widths[a.rates[0]])
            model.run(scored, on_down=ins)
            orders.update({f"insample-{k}": v for k, v in ins.orders.items()})
            ratio = [u / w if w > 0 else 1.0 for u, w in (ins.output_error[i] for i in range(n))]
            doc.setdefault("insample_output_error_uniql_over_wanda", {})[str(s)] = {
                "rate": a.rates[0], "per_layer": [round(x, 4) for x in ratio]}
            log(f"  in-sample output error, uniql / wanda at {a.rates[0]}: {min(ratio):.3f}-{max(ratio):.3f} "
                f"(median {np.median(ratio):.3f})")
        log(f"subset {s}: orders ready ({time.perf_counter() - t0:.0f} s)")
        for r in a.rates:
            for v in a.variants:
                base, _, comp = v.partition("+")
                k = score(orders[base], widths[r], plain.mean if comp == "mean" else None)
                doc["kld"].setdefault(v, {}).setdefault(str(r), {})[str(s)] = k
                log(f"  subset {s} rate {r} {v}: KLD {k:.4f} ({time.perf_counter() - t0:.0f} s)")
        doc["run"]["load_average_at_end"] = os.getloadavg()
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'variant':16} {'rate':>5} " + " ".join(f"{'s' + s:>7}" for s in map(str, range(a.subsets)))
          + f" {'mean':>7} {'spread':>7}")
    for v, per in doc["kld"].items():
        for r, by in per.items():
            vals = [by.get(str(s)) for s in range(a.subsets)]
            got = [x for x in vals if x is not None]
            print(f"{v:16} {float(r):5.2f} " + " ".join(f"{x:7.4f}" if x is not None else f"{'':>7}" for x in vals)
                  + f" {np.mean(got):7.4f} {max(got) - min(got):7.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
