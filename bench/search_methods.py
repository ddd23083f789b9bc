"""Search methods beyond the plain ILP on SmolLM2-135M, measured in llama.cpp against the float reference.

    python bench/search_methods.py --what lowrank [--bpw 4.8] [--chunks 2]
    python bench/search_methods.py --what dynaquant [--bpw 5.0] [--chunks 2]

lowrank (QERA): at one budget between the smallest feasible file (~4.2 bpw) and q3_k_m's size, the ILP
without branches vs the ILP with rank 8/16 branches (bytes of the adapter GGUF counted in the budget),
for the exact (E[xxᵀ]^½), diagonal and identity scalings. --cost fisher: the ILP's costs (branch costs too) are
Fisher-weighted, as `edgeq plan`'s default (--cost auto) makes them.
dynaquant: the DynaQuant-style learned allocator vs the ILP at the same budget.
Each comparison runs with candidates without Q4_1/Q5_1 and with them (SmolLM2's weights come from a
Q4_1 file). Plans are written and scored exactly as bench/mixed_precision.py does (same reference cache,
same held-out text, --chunks 512-token windows, llama.cpp with --threads). Writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mixed_precision import FORMATS_A, FORMATS_B, Meter, subset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="lowrank", choices=["lowrank", "dynaquant", "fisher"])
    ap.add_argument("--presets", default="q4_k_m,q3_k_m", help="fisher: the presets whose true sizes are the budgets")
    ap.add_argument("--fisher-windows", type=int, default=2)
    ap.add_argument("--at-preset", default=None, help="fisher: like --at-bytes, at this calibrated preset's true size")
    ap.add_argument("--at-bytes", type=int, default=None,
                    help="fisher: measure only the Fisher-weighted ILP at this size (compare with earlier runs of "
                         "the same evaluation: llama.cpp with 1 thread is deterministic)")
    ap.add_argument("--bpw", type=float, default=None, help="budget (default: 4.8 for lowrank, 5.0 for dynaquant)")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--scalings", default="exact,diag,identity")
    ap.add_argument("--format-sets", default="no_q4_1_q5_1,all")
    ap.add_argument("--no-baseline", action="store_true",
                    help="lowrank: skip re-measuring the plan without branches (deterministic: reuse an earlier run)")
    ap.add_argument("--all-scalings", default="exact", help="lowrank: the scalings also run with Q4_1/Q5_1 allowed")
    ap.add_argument("--cost", default="output", choices=["output", "fisher"],
                    help="lowrank, dynaquant: the ILP's cost (fisher: edgeq plan's default, --cost auto); "
                         "--what fisher compares both")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bpw = args.bpw or {"lowrank": 4.8, "dynaquant": 5.0, "fisher": 5.0}[args.what]
    out_path = Path(args.out or ROOT / "bench" / "results" / f"{args.what}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    from edgeq.importers.gguf import import_gguf
    from edgeq.models.recipes.default import default_model_path
    from edgeq.passes import Context
    from edgeq.passes.allocate import plan_from_choice, solve
    from edgeq.passes.calibrate import Calibrate
    from edgeq.passes.sensitivity import Sensitivity
    from edgeq.targets.gguf.adapter import adapter_overhead
    from edgeq.targets.gguf.layout import gguf_layout
    from edgeq.targets.gguf.writer import layout_overhead, padded
    from edgeq.runtime.tokenizer import spec_from_gguf_metadata, spec_to_json

    t_start = time.perf_counter()
    results: dict = {"settings": {**vars(args), "bpw": bpw}, "runs": [], "summary": {}}

    def save():
        results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        out_path.write_text(json.dumps(results, indent=1) + "\n")

    model = default_model_path()
    graph = import_gguf(model)
    spec = spec_from_gguf_metadata(graph.metadata["gguf"], model)
    tok = spec_to_json(spec)
    ctx = Context(backend="gguf")
    Calibrate().run(graph, None, ctx)
    cal = ctx.analysis["calibration"]
    imatrix = cal.imatrix()
    overhead = layout_overhead(graph, tok)
    budget = int(bpw * graph.n_params / 8)

    if args.cost == "fisher" and args.what != "fisher":
        from edgeq.passes.fisher import Fisher

        t0 = time.perf_counter()
        Fisher(n_windows=args.fisher_windows).run(graph, None, ctx)
        results["fisher_s"] = round(time.perf_counter() - t0, 1)
    src = ctx.analysis.get("fisher")
    fisher = src.collect() if src is not None and args.what != "fisher" else None      # computed once, reused

    def table_for(ranks=(), scaling="exact"):
        t0 = time.perf_counter()
        c = Context(backend="gguf", analysis={"calibration": cal, **({"fisher": fisher} if fisher else {})})
        Sensitivity(gguf_layout(graph, tok, bool(ranks)), formats=FORMATS_B if "all" in chosen_sets else FORMATS_A,
                    ranks=list(ranks), scaling=scaling).run(graph, None, c)
        results.setdefault("sensitivity_s", {})[f"{scaling}:{list(ranks)}"] = round(time.perf_counter() - t0, 1)
        return c.analysis["costs"]

    meter = Meter(graph, model, args.chunks, args.threads, results, save, width=44)

    def measure(label: str, plan, branches: dict | None, extra: dict) -> dict:
        return meter.plan(label, plan, imatrix, extra, branches)

    sets = {"no_q4_1_q5_1": FORMATS_A, "all": FORMATS_B}
    chosen_sets = [s for s in args.format_sets.split(",") if s]
    if args.what == "lowrank":
        from edgeq.passes.lowrank_compensate import compute_branches

        ranks = [int(r) for r in args.ranks.split(",")]
        plain = None if args.no_baseline else table_for()
        adapter_bytes = adapter_overhead(graph)
        for sname in ([] if args.no_baseline else chosen_sets):
            tb = subset(plain, sets[sname])
            alloc = solve(tb, budget)
            base = measure(f"ilp no branch [{sname}]", plan_from_choice(graph, tb, alloc.choice, "ilp", budget, [],
                                                                         "gguf", alloc.info), None,
                           {"formats": sname, "scaling": None, "branches": 0})
            results["summary"][f"{sname}: no branch"] = base["kld_mean"]
        for scaling in args.scalings.split(","):
            full = table_for(ranks, scaling)
            for sname in chosen_sets:
                if sname == "all" and scaling not in args.all_scalings.split(","):
                    continue
                tb = subset(full, sets[sname])
                tb.info.update({"ranks": ranks, "lowrank_scaling": scaling})
                alloc = solve(tb, budget, adapter_overhead=adapter_bytes)
                plan = plan_from_choice(graph, tb, alloc.choice, "ilp", budget, [], "gguf", alloc.info)
                branches = compute_branches(graph, plan, cal, scaling, max(ranks))
                row = measure(f"ilp ranks {ranks} {scaling} [{sname}]", plan, branches,
                              {"formats": sname, "scaling": scaling, "branches": len(branches),
                               "ranks_used": sorted({t.rank for t in plan.tensors.values() if t.rank})})
                results["summary"][f"{sname}: {scaling} ranks {ranks}"] = row["kld_mean"]
                if f"{sname}: no branch" in results["summary"]:
                    results["summary"][f"{sname}: {scaling} over no branch"] = (
                        row["kld_mean"] / results["summary"][f"{sname}: no branch"])
                save()
    elif args.what == "fisher":
        from edgeq.passes.fisher import Fisher

        if args.at_preset:          # the calibrated preset's file size, without writing it
            from edgeq.passes.assign_preset import AssignPreset
            from edgeq.passes.legalize import Legalize
            from edgeq.core.plan import Plan

            c = Context(backend="gguf")
            _, pp = AssignPreset(args.at_preset, has_imatrix=True).run(graph, Plan(), c)
            _, pp = Legalize().run(graph, pp, c)
            from edgeq.core.formats import get_format

            args.at_bytes = overhead + sum(padded(get_format(pp.tensors[n].format).nbytes(t.shape))
                                           for n, t in graph.weights.items())
            results["at_preset"] = {"preset": args.at_preset, "bytes": args.at_bytes}
        plain = table_for() if args.at_bytes is None else None
        t0 = time.perf_counter()
        Fisher(n_windows=args.fisher_windows).run(graph, None, ctx)
        results["fisher_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        c = Context(backend="gguf", analysis={"calibration": cal, "fisher": ctx.analysis["fisher"]})
        Sensitivity(gguf_layout(graph, tok), formats=FORMATS_B if "all" in chosen_sets else FORMATS_A).run(graph, None, c)
        results["sensitivity_fisher_s"] = round(time.perf_counter() - t0, 1)
        weighted = c.analysis["costs"]
        if args.at_bytes is not None:
            for sname in chosen_sets:
                tb = subset(weighted, sets[sname])
                alloc = solve(tb, args.at_bytes)
                r = measure(f"ilp+fisher@{args.at_bytes} [{sname}]", plan_from_choice(
                    graph, tb, alloc.choice, "ilp+fisher", args.at_bytes, [], "gguf", alloc.info), None,
                    {"formats": sname, "method": "ilp+fisher"})
                results["summary"][f"{args.at_bytes} [{sname}]"] = r["kld_mean"]
                save()
            args.presets = ""
        for preset in [p for p in args.presets.split(",") if p]:
            size = meter.preset(f"{preset} (calibrated)", preset, {"preset": preset})["bytes"]
            ev = results["runs"][-1]
            for sname in chosen_sets:
                row = {}
                for kind, tb_all in (("ilp", plain), ("ilp+fisher", weighted)):
                    tb = subset(tb_all, sets[sname])
                    alloc = solve(tb, size)
                    r = measure(f"{kind}@{preset} [{sname}]", plan_from_choice(graph, tb, alloc.choice, kind, size, [],
                                                                              "gguf", alloc.info), None,
                                {"formats": sname, "method": kind, "preset": preset})
                    row[kind] = r["kld_mean"]
                results["summary"][f"{preset} [{sname}]"] = {
                    "preset_kld": ev["kld_mean"], "ilp_kld": row["ilp"], "fisher_kld": row["ilp+fisher"],
                    "ilp_over_preset": row["ilp"] / ev["kld_mean"], "fisher_over_preset": row["ilp+fisher"] / ev["kld_mean"],
                    "fisher_le_0.7x_preset": row["ilp+fisher"] <= 0.7 * ev["kld_mean"]}
                save()
    else:
        from edgeq.passes.allocate_dynaquant import learn_allocation

        table = table_for()
        for sname in chosen_sets:
            tb = subset(table, sets[sname])
            alloc = solve(tb, budget)
            ilp = measure(f"ilp [{sname}]", plan_from_choice(graph, tb, alloc.choice, "ilp", budget, [], "gguf",
                                                           alloc.info), None, {"formats": sname, "method": "ilp"})
            t0 = time.perf_counter()
            dq = learn_allocation(graph, tb, cal, budget)
            learn_s = round(time.perf_counter() - t0, 1)
            row = measure(f"dynaquant [{sname}]", plan_from_choice(graph, tb, dq.choice, "dynaquant", budget, [],
                                                                   "gguf", dq.info), None,
                          {"formats": sname, "method": "dynaquant", "learn_s": learn_s})
            results["summary"][sname] = {"ilp_kld": ilp["kld_mean"], "dynaquant_kld": row["kld_mean"],
                                         "dynaquant_over_ilp": row["kld_mean"] / ilp["kld_mean"],
                                         "ilp_bytes": ilp["bytes"], "dynaquant_bytes": row["bytes"],
                                         "learn_s": learn_s}
            save()
    save()
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {out_path} in {results['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
