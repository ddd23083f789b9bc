"""Budgeted mixed precision on SmolLM2-135M, measured in llama.cpp against the float reference.

    python bench/mixed_precision.py [--chunks 4] [--random 30] [--out bench/results/mixed_precision.json]

For the q4_k_m and q3_k_m presets (calibration-aware, i.e. with edgeq's importance matrix) it takes
the true file size S and compares, at S:
  - the ILP plan (candidates without Q4_1/Q5_1, and with them),
  - a uniform plan (sensitivity-blind: every tensor as close to the same bits per weight as formats allow),
  - random plans (within 2% of S and not above it),
all exported with the same importance matrix and scored by the project's eval (llama.cpp logits vs the
float reference executor on held-out text). Additivity: Spearman ρ between the summed predicted cost
and the measured KLD over the random plans at the q4_k_m size. Writes JSON and a Pareto PNG (bpw vs KLD).
SmolLM2's weights come from a Q4_1 file (Q4_1 reproduces them exactly), hence the runs without Q4_1/Q5_1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORMATS_A = ["f16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "q5_0", "q4_0"]   # without Q4_1/Q5_1
FORMATS_B = FORMATS_A + ["q5_1", "q4_1"]


def subset(table, formats):
    from edgeq.passes.sensitivity import CostTable

    opts = {n: [o for o in v if o.format in formats] for n, v in table.options.items()}
    return CostTable(opts, table.fixed_bytes, table.n_params, {**table.info, "formats": list(formats)})


def uniform_choice(table, budget: int) -> dict:
    """Sensitivity-blind: all tensors at the widest format that keeps everyone equal, then upgrades spread evenly."""
    names = list(table.options)
    order = sorted(range(len(names)), key=lambda i: (i * 0.6180339887) % 1.0)      # spread over layers, fixed
    by_size = {n: sorted(table.options[n], key=lambda o: (o.bytes, o.cost)) for n in names}
    free = budget - table.fixed_bytes
    params = {n: max(1, by_size[n][0].bytes) for n in names}
    # the bits per weight every tensor could take if bytes were continuous
    total_min = sum(o[0].bytes for o in by_size.values())
    scale = free / total_min
    pick = {}
    for n in names:
        fit = [o for o in by_size[n] if o.bytes <= by_size[n][0].bytes * scale]
        pick[n] = fit[-1] if fit else by_size[n][0]
    size = lambda: sum(o.bytes for o in pick.values())  # noqa: E731
    for i in order[::-1]:                      # too big: step down, evenly spread
        if size() <= free:
            break
        n = names[i]
        idx = by_size[n].index(pick[n])
        if idx > 0:
            pick[n] = by_size[n][idx - 1]
    changed = True
    while changed:                             # room left: step up, evenly spread
        changed = False
        for i in order:
            n = names[i]
            idx = by_size[n].index(pick[n])
            if idx + 1 < len(by_size[n]) and size() - pick[n].bytes + by_size[n][idx + 1].bytes <= free:
                pick[n] = by_size[n][idx + 1]
                changed = True
    del params
    return pick


def random_choice(table, budget: int, rng, tol: float = 0.02) -> dict:
    """Random formats, repaired into [budget*(1-tol), budget] one random step at a time."""
    names = list(table.options)
    by_size = {n: sorted(table.options[n], key=lambda o: (o.bytes, o.cost)) for n in names}
    idx = {n: int(rng.integers(len(by_size[n]))) for n in names}
    lo, hi = budget * (1 - tol) - table.fixed_bytes, budget - table.fixed_bytes
    size = sum(by_size[n][idx[n]].bytes for n in names)
    for _ in range(100000):
        if size > hi:
            n = names[rng.integers(len(names))]
            if idx[n] > 0:
                size += by_size[n][idx[n] - 1].bytes - by_size[n][idx[n]].bytes
                idx[n] -= 1
        elif size < lo:
            n = names[rng.integers(len(names))]
            if idx[n] + 1 < len(by_size[n]):
                new = size + by_size[n][idx[n] + 1].bytes - by_size[n][idx[n]].bytes
                if new <= hi:
                    size = new
                    idx[n] += 1
        else:
            break
    return {n: by_size[n][idx[n]] for n in names}


class Reference:
    """Float reference logits per window, cached in memory and on disk (the scored half only)."""

    def __init__(self, graph, cache: Path):
        from edgeq.core.executor import Executor

        self.ex = Executor(graph)
        self.cache = cache
        self.cache.mkdir(parents=True, exist_ok=True)
        self.mem: dict[str, np.ndarray] = {}

    def __call__(self, ids) -> np.ndarray:
        ids = [int(i) for i in ids]
        key = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:24]
        if key in self.mem:
            return self.mem[key]
        path = self.cache / f"{key}.npy"
        half = len(ids) // 2
        if path.is_file():
            tail = np.load(path)
            full = np.zeros((len(ids), tail.shape[1]), dtype=np.float32)
            full[half:] = tail
        else:
            full = self.ex.logits(ids)
            np.save(path, full[half:])
        self.mem[key] = full
        return full


def memoize_quantizer() -> None:
    """Quantize each (weights, format, importance) once per bench run: random plans reuse the same few
    hundred (tensor, format) pairs, and ggml's imatrix-guided quantizers are most of a plan's measuring time.
    Keyed by content digests, so the bytes written are exactly the uncached ones."""
    from edgeq.core.formats import Format

    if getattr(Format.quantize, "memoized", False):
        return
    plain, memo = Format.quantize, {}

    def quantize(self, w, imatrix=None):
        w = np.ascontiguousarray(w, dtype=np.float32)
        key = (self.name, w.shape, hashlib.sha1(w.data).digest(),
               None if imatrix is None else hashlib.sha1(np.ascontiguousarray(imatrix, dtype=np.float32).data).digest())
        if key not in memo:
            memo[key] = plain(self, w, imatrix)
        return memo[key]

    quantize.memoized = True
    Format.quantize = quantize


class Meter:
    """How both search benches measure a plan: write its file(s) (an adapter GGUF too when it has branches),
    score them in llama.cpp against the cached float reference on --chunks windows of held-out text, and
    append a row (bytes, bpw, KLD, top-1, ppl, seconds and the caller's fields) to the results JSON."""

    def __init__(self, graph, model, chunks: int, threads: int, results: dict, save, width: int = 48):
        from edgeq.core.cache import cache_dir
        from edgeq.runtime.tokenizer import spec_from_gguf_metadata, spec_to_json

        self.graph, self.chunks, self.threads = graph, chunks, threads
        self.results, self.save, self.width = results, save, width
        self.spec = spec_from_gguf_metadata(graph.metadata["gguf"], model)
        self.tok = spec_to_json(self.spec)
        self.ref = Reference(graph, (cache_dir() or Path(tempfile.gettempdir())) / "bench-reference")
        self.work = Path(tempfile.mkdtemp(prefix="edgeq-bench-"))
        self.tokens: list = []
        memoize_quantizer()

    def plan(self, label: str, plan, imatrix, extra: dict, branches: dict | None = None) -> dict:
        """Write the plan's file(s) and score them in llama.cpp directly (no bundle: what a plan costs to
        measure is the quantized write and llama.cpp's own logits, as in export + eval)."""
        from edgeq.evaluate.decoder import evaluate
        from edgeq.runtime.gguf_backend import LlamaCppBackend
        from edgeq.targets.gguf import write_gguf
        from edgeq.targets.gguf.adapter import write_adapter
        from edgeq.evaluate.texts import evaluation_text

        t = time.perf_counter()
        path, lora = self.work / "m.gguf", None
        write_gguf(self.graph, plan, path, self.tok, imatrix=imatrix)
        size = path.stat().st_size
        if branches:
            lora = self.work / "a.gguf"
            size += write_adapter(self.graph, branches, lora)
        be = LlamaCppBackend(path, n_ctx=512, threads=self.threads, lora_path=lora)
        try:
            if not self.tokens:
                self.tokens.extend(be.tokenize(evaluation_text(), add_special=True, parse_special=False))
            ev = evaluate(self.tokens, 512, be.logits, self.ref, self.spec.bos_id, self.spec.add_bos,
                          max_chunks=self.chunks)
        finally:
            be.close()
            path.unlink(missing_ok=True)
            if lora is not None:
                lora.unlink(missing_ok=True)
        s = plan.search
        assert size <= s["budget_bytes"], (label, size, s["budget_bytes"])
        return self._row(label, size, ev, t, {
            "budget_bytes": s["budget_bytes"], "predicted_bytes": s["predicted_bytes"],
            "predicted_error": s["predicted_error"], "formats_used": plan.format_counts(),
            "choice": {n: tp.format + (f"+r{tp.rank}" if tp.rank else "") for n, tp in sorted(plan.tensors.items())
                       if tp.bytes}, **extra})

    def preset(self, label: str, quant: str, extra: dict, calibration: bool = True) -> dict:
        """Export a llama.cpp preset through the pipeline and score the bundle the same way."""
        from edgeq.evaluate.bundle import evaluate_bundle
        from edgeq.api import ExportOptions, export

        t = time.perf_counter()
        bundle = self.work / quant
        export(ExportOptions(quant=quant, out=str(bundle), force=True, check=False, calibration=calibration))
        try:
            ev = evaluate_bundle(bundle, chunks=self.chunks, reference_logits=self.ref, record=False,
                                 threads=self.threads)
            size = sum(f.stat().st_size for f in bundle.glob("*.gguf"))     # model and any adapter
        finally:
            shutil.rmtree(bundle, ignore_errors=True)                     # bundles are ~100 MB each
        return self._row(label, size, ev, t, extra)

    def _row(self, label: str, size: int, ev: dict, t: float, extra: dict) -> dict:
        row = {"label": label, "bytes": size, "bpw": 8 * size / self.graph.n_params,
               **{k: ev[k] for k in ("kld_mean", "kld_p99", "top1", "ppl", "ppl_reference", "n_tokens_scored")},
               "seconds": round(time.perf_counter() - t, 1), **extra}
        self.results["runs"].append(row)
        self.save()
        print(f"{label:{self.width}s} {size / 1e6:8.3f} MB {row['bpw']:6.3f} bpw  KLD {row['kld_mean']:.4f}  "
              f"top-1 {row['top1']:.3f}  ({row['seconds']} s)", flush=True)
        return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=4, help="512-token windows of held-out text per evaluation")
    ap.add_argument("--random", type=int, default=30, help="random plans at the q4_k_m size (additivity)")
    ap.add_argument("--random-other", type=int, default=3, help="random plans for the other comparisons")
    ap.add_argument("--presets", default=None,
                    help="calibrated presets whose true sizes are the budgets (default q4_k_m,q3_k_m; "
                         "q4_k_m with --additivity-only)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mixed_precision.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--additivity-only", action="store_true",
                    help="only the additivity check: the preset's size (--presets, one; default q4_k_m), "
                         "then --random plans at it")
    ap.add_argument("--cost", default="fisher", choices=["output", "fisher"],
                    help="the ILP's cost (the uniform and random plans are sensitivity-blind): as edgeq plan --cost")
    ap.add_argument("--no-plain-presets", action="store_true", help="skip the presets without calibration")
    ap.add_argument("--resume", action="store_true",
                    help="keep the random plans --out already holds (the seeded draws are the same) and measure the rest")
    ap.add_argument("--budget-bytes", type=int, default=None,
                    help="additivity: the preset's true size, known from an earlier run (skips measuring it)")
    args = ap.parse_args()
    if args.presets is None:
        args.presets = "q4_k_m" if args.additivity_only else "q4_k_m,q3_k_m"
    if args.additivity_only and "," in args.presets:
        ap.error("--additivity-only takes one preset")

    from scipy.stats import spearmanr

    from edgeq.importers.gguf import import_gguf
    from edgeq.models.recipes.default import default_model_path
    from edgeq.passes import Context
    from edgeq.passes.allocate import plan_from_choice, solve_ilp
    from edgeq.passes.calibrate import Calibrate
    from edgeq.passes.sensitivity import Sensitivity
    from edgeq.targets.gguf.layout import gguf_layout
    from edgeq.runtime.tokenizer import spec_from_gguf_metadata, spec_to_json

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": vars(args), "runs": []}
    done = {}
    if args.resume and out_path.is_file():
        done = {r["label"]: r for r in json.loads(out_path.read_text())["runs"] if r.get("kind") == "random"}
    t_start = time.perf_counter()

    def save():
        results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        out_path.write_text(json.dumps(results, indent=1) + "\n")

    model = default_model_path()
    graph = import_gguf(model)
    tok = spec_to_json(spec_from_gguf_metadata(graph.metadata["gguf"], model))
    ctx = Context(backend="gguf")
    t0 = time.perf_counter()
    Calibrate().run(graph, None, ctx)
    results["calibration_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    if args.cost == "fisher" and not args.additivity_only:
        from edgeq.passes.fisher import Fisher

        Fisher().run(graph, None, ctx)
        results["fisher_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
    Sensitivity(gguf_layout(graph, tok), formats=FORMATS_B).run(graph, None, ctx)
    results["sensitivity_s"] = round(time.perf_counter() - t0, 1)
    results["cost"] = ctx.analysis["costs"].info.get("cost")
    table = ctx.analysis["costs"]
    tables = {"no_q4_1_q5_1": subset(table, FORMATS_A), "all": subset(table, FORMATS_B)}
    meter = Meter(graph, model, args.chunks, args.threads, results, save)
    imatrix = ctx.analysis["calibration"].imatrix()

    def measure(label: str, kind: str, quant: str, calibration: bool = True) -> dict:
        return meter.preset(label, quant, {"kind": kind, "preset": quant}, calibration)

    def run_choice(label: str, kind: str, tname: str, choice: dict, budget: int, extra: dict | None = None,
                   table=None, info: dict | None = None, branches: dict | None = None) -> dict:
        tb = table if table is not None else tables[tname]
        plan = plan_from_choice(graph, tb, choice, kind, budget, [], "gguf", info or {})
        return meter.plan(label, plan, imatrix, {"kind": kind, "formats": tname, **(extra or {})}, branches)

    rng = np.random.default_rng(0)
    summary = {}
    budgets = {}
    # first the headline comparisons (presets, ILP, uniform), then the random plans
    for preset in args.presets.split(","):
        if args.additivity_only and args.budget_bytes:
            budgets[preset] = args.budget_bytes
            continue
        cal_row = measure(f"{preset} (calibrated)", "preset", preset)
        budgets[preset] = budget = cal_row["bytes"]
        for tname, tb in ({} if args.additivity_only else tables).items():
            alloc = solve_ilp(tb, budget)
            ilp = run_choice(f"ilp@{preset} [{tname}]", "ilp", tname, alloc.choice, budget, {"solver": alloc.info})
            uni = run_choice(f"uniform@{preset} [{tname}]", "uniform", tname, uniform_choice(tb, budget), budget)
            summary[f"{preset} [{tname}]"] = {
                "preset_calibrated_kld": cal_row["kld_mean"], "ilp_kld": ilp["kld_mean"],
                "ilp_over_preset": ilp["kld_mean"] / cal_row["kld_mean"], "uniform_kld": uni["kld_mean"],
                "ilp_le_0.7x_preset": ilp["kld_mean"] <= 0.7 * cal_row["kld_mean"],
                "ilp_below_uniform": ilp["kld_mean"] < uni["kld_mean"],
                "bytes": {"preset": budget, "ilp": ilp["bytes"], "uniform": uni["bytes"]},
            }
            results["summary"] = summary
            save()
        if args.additivity_only or args.no_plain_presets:
            continue
        measure(f"{preset} (no calibration)", "preset-plain", preset, calibration=False)
    for preset in args.presets.split(","):
        for tname, tb in tables.items():
            key = f"{preset} [{tname}]"
            if args.additivity_only and tname != "no_q4_1_q5_1":
                continue
            summary.setdefault(key, {})
            n_rand = (args.random if ((args.additivity_only or preset == "q4_k_m") and tname == "no_q4_1_q5_1")
                      else args.random_other)
            rand = []
            for i in range(n_rand):
                label, choice = f"random{i}@{preset} [{tname}]", random_choice(tb, budgets[preset], rng)
                if label in done and done[label].get("choice") == {n: o.format for n, o in sorted(choice.items())}:
                    results["runs"].append(done[label])          # the same draw, measured before
                    rand.append(done[label])
                    continue
                rand.append(run_choice(label, "random", tname, choice, budgets[preset]))
            if not rand:
                continue
            summary[key].update({
                "random_kld_mean": float(np.mean([r["kld_mean"] for r in rand])),
                "random_kld_best": float(np.min([r["kld_mean"] for r in rand])),
                "random_bytes": [r["bytes"] for r in rand],
            })
            if "ilp_kld" in summary[key]:
                summary[key]["ilp_below_every_random"] = all(summary[key]["ilp_kld"] < r["kld_mean"] for r in rand)
            if len(rand) >= 3:
                rho = spearmanr([r["predicted_error"] for r in rand], [r["kld_mean"] for r in rand])
                summary[key]["spearman_predicted_vs_kld"] = {"rho": float(rho.statistic), "p": float(rho.pvalue),
                                                             "n": len(rand)}
            results["summary"] = summary
            save()
            print(json.dumps({key: summary[key]}, indent=1), flush=True)

    _pareto(results, out_path.with_suffix(".png"))
    save()
    print(f"wrote {out_path} and {out_path.with_suffix('.png')} in {results['elapsed_s']} s")
    return 0


def _pareto(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    style = {"preset": ("s", "C0", "preset (calibrated)"), "preset-plain": ("x", "C7", "preset (no calibration)"),
             "ilp": ("o", "C3", "ILP"), "uniform": ("^", "C2", "uniform"), "random": (".", "C1", "random")}
    for kind, (m, c, lab) in style.items():
        rows = [r for r in results["runs"] if r["kind"] == kind]
        if rows:
            ax.scatter([r["bpw"] for r in rows], [r["kld_mean"] for r in rows], marker=m, c=c, label=lab, s=28)
    for r in results["runs"]:
        if r["kind"] in ("preset", "ilp"):
            ax.annotate(r["label"].split(" (")[0].replace(" [no_q4_1_q5_1]", ""), (r["bpw"], r["kld_mean"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (file bytes x 8 / source parameters)")
    ax.set_ylabel("KLD vs float reference (llama.cpp)")
    ax.set_title("SmolLM2-135M: budgeted mixed precision vs llama.cpp presets")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
