"""edgeq search (APQ) on SmolLM2 (GGUF): how well the accuracy predictor ranks configurations, and the searched plan
against the presets and the ILP at the latency of q4_k_m.

Stage `rho`: the search space of the model under a latency limit (default: q4_k_m's predicted decode step);
`--train + --held` configurations within it exported and scored for real (the search's expensive label: KLD against
the float source on the second half of the calibration text, in llama.cpp), `--cheap` random configurations labelled
by their summed Fisher + pruning costs. For each label budget k (`--budgets`), over `--repeats` draws of k training
labels: Spearman ρ on the held-out configurations of the predictor trained on expensive labels only, on cheap
labels only, and by transfer (cheap, then fine-tuned on the k expensive ones).

Stage `search`: the presets exported and timed (interleaved rounds on the `local` device, decode steps at 64 tokens
of context, the profile's clock: bench/latency_budget.py's timing), the limit = q4_k_m's measured decode step;
the ILP plan (`edgeq export --latency-ms`) and the searched plan (`edgeq search`, then `export --plan`) at that
limit, all timed together and scored on the held-out evaluation text (KLD against the float model).

    python bench/search.py --latency-profile ~/.cache/edgeq/profiles/XXXX-gguf-t1.json            # both stages
    python bench/search.py --latency-profile P --stage rho --train 20 --held 20 --budgets 5,10,20

Stage `menus` (SpaceEvo's check): every menu (width step x format set) scored by its Q-T score with the cheap
predictor, as `edgeq search --menu auto` does; `--menus` of them, spread over that ranking, are each searched (the
same evolution on the exact cheap label, `--population`/`--generations`) and their `--finalists` measured for real; the
Q-T ranking is compared with the ranking of each menu's best real KLD (Spearman rho), agreeing or not.

    python bench/search.py --latency-profile P --stage menus --menus 4 --finalists 3

Writes bench/results/search.json (and search.png: measured latency vs held-out KLD). Heavy: every expensive label
is an export and a scoring run (about half a minute each for SmolLM2 on a 2-core machine).
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

from latency_budget import export, log, plot, score_rows, time_bundles  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
TOLERANCE = 0.10
PRESETS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m")


def open_space(model: str | None, profile: str, limit_ms: float, work: Path):
    """The search space of `model` under `limit_ms` (the search's own passes, run once with no evolution) and the
    search's expensive-label evaluator."""
    from edgeq.compile import pipeline
    from edgeq.compile.options import ExportOptions
    from edgeq.compile.search_labels import kld_evaluator
    from edgeq.passes.search import SearchSettings

    opts = ExportOptions(model=model, backend="gguf", method="search", latency_profile=profile, latency_ms=limit_ms,
                         search=SearchSettings(population=2, generations=1, cheap_labels=20, expensive_labels=0,
                                               finalists=0))
    c = pipeline.prepare(opts, None, None, several_allowed=False)
    pipeline.decide_all(c, opts, branches=False)
    space, anchor = c.ctx.analysis["search_space"]
    return space, anchor, kld_evaluator(c, opts, work), c


def stage_rho(a, limit_ms: float, work: Path) -> dict[str, Any]:
    from edgeq.passes.search_accuracy import AccuracyPredictor, spearman
    from edgeq.passes.search_space import Budgets

    space, anchor, evaluate, c = open_space(a.model, a.latency_profile, limit_ms, work)
    from edgeq.passes.search import candidate_plan
    budgets = Budgets(None, limit_ms)
    rng = np.random.default_rng(a.seed)
    pool = list(dict.fromkeys(space.sample(rng, anchor, budgets) for _ in range(3 * (a.train + a.held))))
    pool = pool[:a.train + a.held]
    labels = []
    for i, cand in enumerate(pool):
        t0 = time.perf_counter()
        labels.append(evaluate(candidate_plan(c.graph, space, cand, c.ctx, 0)))
        log(f"expensive label {i + 1}/{len(pool)}: KLD {labels[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    x = np.array([space.features(p) for p in pool])
    y = np.array(labels)
    cheap_pts = [space.random(rng) for _ in range(a.cheap)]
    xc = np.array([space.features(p) for p in cheap_pts])
    yc = np.array([space.cheap_label(p) for p in cheap_pts])
    train_x, train_y, held_x, held_y = x[:a.train], y[:a.train], x[a.train:], y[a.train:]
    cheap_rho = spearman(AccuracyPredictor("cheap", seed=a.seed).fit(xc, yc, None, None).predict(held_x), held_y)
    proxy_rho = spearman([space.cheap_label(p) for p in pool[a.train:]], held_y)
    rows = []
    for k in [int(v) for v in a.budgets.split(",")]:
        k = min(k, a.train)
        per = {"expensive": [], "transfer": []}
        for r in range(a.repeats):
            idx = np.random.default_rng([a.seed, k, r]).permutation(a.train)[:k]
            for mode in per:
                p = AccuracyPredictor(mode, seed=a.seed + r).fit(xc if mode == "transfer" else None,
                                                                 yc if mode == "transfer" else None,
                                                                 train_x[idx], train_y[idx])
                per[mode].append(spearman(p.predict(held_x), held_y))
        rows.append({"labels": k, "expensive_only": float(np.mean(per["expensive"])),
                     "expensive_only_spread": float(np.std(per["expensive"])), "cheap_only": cheap_rho,
                     "transfer": float(np.mean(per["transfer"])), "transfer_spread": float(np.std(per["transfer"]))})
        log(f"k={k}: expensive-only ρ {rows[-1]['expensive_only']:.3f}, cheap-only {cheap_rho:.3f}, transfer "
            f"{rows[-1]['transfer']:.3f}")
    return {"limit_ms": limit_ms, "train": a.train, "held": a.held, "cheap": a.cheap, "repeats": a.repeats,
            "cheap_label_itself_rho": proxy_rho, "kld_labels": [round(float(v), 6) for v in y], "rows": rows}


def stage_menus(a, limit_ms: float, work: Path) -> dict[str, Any]:
    from edgeq.passes.search import SearchSettings, candidate_plan, evolve
    from edgeq.passes.search_accuracy import AccuracyPredictor, spearman
    from edgeq.passes.search_menus import score_menus
    from edgeq.passes.search_space import Budgets

    space, _anchor, evaluate, c = open_space(a.model, a.latency_profile, limit_ms, work)
    budgets = Budgets(None, limit_ms)
    rng = np.random.default_rng(a.seed)
    pts = [space.random(rng) for _ in range(a.cheap)]
    cheap = AccuracyPredictor("cheap", seed=a.seed).fit(np.array([space.features(p) for p in pts]),
                                                        np.array([space.cheap_label(p) for p in pts]), None, None)
    scored = score_menus(space, cheap.predict, budgets, a.seed)
    feasible = [(m, sp) for m, sp in scored if m.score > 0]
    log("menus by Q-T score: " + "; ".join(f"{m.name} {m.score:.4f}" for m, _ in scored))
    k = min(a.menus, len(feasible))
    picks = sorted({round(i * (len(feasible) - 1) / max(1, k - 1)) for i in range(k)})
    settings = SearchSettings(population=a.population, generations=a.generations, seed=a.seed)
    rows = []
    for i in picks:
        m, sp = feasible[i]
        sp_anchor = sp.feasible_anchor(budgets)
        seeds = list(dict.fromkeys([sp_anchor] + [u for u in sp.uniform_points() if sp.measures(u).meets(budgets)]))

        def score(cs, sp=sp):           # the exact cheap label (a learned model's extrapolation would be searched)
            return np.log(np.maximum([sp.cheap_label(x) for x in cs], 1e-12))

        ranked = evolve(sp, score, budgets, seeds, sp_anchor, np.random.default_rng([a.seed, i]), settings)
        klds = []
        for j, cand in enumerate(ranked[:a.finalists]):
            t0 = time.perf_counter()
            klds.append(evaluate(candidate_plan(c.graph, sp, cand, c.ctx, 0)))
            log(f"{m.name}: finalist {j + 1}/{a.finalists} KLD {klds[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
        best = int(np.argmin(klds))
        ms = sp.measures(ranked[best])
        rows.append({"menu": m.name, "qt_rank": i + 1, "score": m.score, "feasible_share": m.feasible_share,
                     "quality": m.quality, "best_kld": float(klds[best]), "finalist_klds": [float(v) for v in klds],
                     "best_predicted_ms": ms.latency_ms, "best_mb": ms.bytes / 1e6})
    rho = spearman(np.array([-r["score"] for r in rows]), np.array([r["best_kld"] for r in rows]))
    return {"limit_ms": limit_ms, "menus_scored": len(scored), "menus_feasible": len(feasible),
            "all_scores": [{"menu": m.name, "score": m.score, "feasible_share": m.feasible_share,
                            "quality": m.quality} for m, _ in scored],
            "rows": rows, "spearman_qt_vs_best_kld": rho}


def stage_search(a, work: Path) -> dict[str, Any]:
    from edgeq.api import search
    from edgeq.compile.options import ExportOptions
    from edgeq.passes.search import SearchSettings
    from edgeq.predictor.profile import load_profile

    profile = load_profile(a.latency_profile)
    bundles = {p: export(work, f"preset-{p}", a.latency_profile, quant=p, model=a.model) for p in PRESETS}
    if a.limit_ms:
        limit = a.limit_ms
        log(f"limit: {limit} ms (--limit-ms)")
    else:
        first = time_bundles({"q4_k_m": bundles["q4_k_m"]}, profile.clock, a.rounds, profile.threads)
        limit = round(first["q4_k_m"]["decode_ms"], 3)
        log(f"limit: q4_k_m's measured decode step {limit} ms")
    bundles["ilp"] = export(work, f"ilp-{limit:g}ms", a.latency_profile, latency_ms=limit, model=a.model)
    plan = work / f"search-{limit:g}ms.json"
    t0 = time.perf_counter()
    settings = SearchSettings(population=a.population, generations=a.generations, cheap_labels=a.cheap,
                              expensive_labels=a.expensive, finalists=a.finalists, seed=a.seed)
    searched = search(ExportOptions(model=a.model, backend="gguf", latency_profile=a.latency_profile,
                                    latency_ms=limit, search=settings, gptq=a.gptq or None), out=plan)
    search_s = time.perf_counter() - t0
    log(f"searched in {search_s:.0f} s: widths {searched.search['mlp_widths']}")
    bundles["search"] = export(work, f"search-{limit:g}ms", a.latency_profile, plan=str(plan), model=a.model)
    timed = time_bundles(bundles, profile.clock, a.rounds, profile.threads)
    rows = score_rows(bundles, timed, a.chunks)
    by = {r["name"]: r for r in rows}
    rivals = [r for r in rows if r["name"] != "search" and r["measured_ms"] <= limit * (1 + TOLERANCE)]
    best = min(rivals, key=lambda r: r["kld"]) if rivals else None
    s = by["search"]
    return {"limit_ms": limit, "search_seconds": round(search_s, 1), "settings": searched.search["settings"],
            "search_gptq": searched.gptq is not None,
            "mlp_widths": searched.search["mlp_widths"], "rows": rows,
            "search_meets_within_10pct": s["measured_ms"] <= limit * (1 + TOLERANCE),
            "best_rival": best and best["name"], "best_rival_kld": best and best["kld"],
            "search_beats_rivals": best is None or s["kld"] < best["kld"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-profile", required=True)
    ap.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--stage", default="all", choices=["all", "rho", "search", "menus"])
    ap.add_argument("--limit-ms", type=float,
                    help="latency limit (default: search stage: q4_k_m's measured decode step; rho and menus: the "
                         "search stage's, else q4_k_m's predicted decode step)")
    ap.add_argument("--train", type=int, default=20, help="rho: expensive labels the budgets draw from")
    ap.add_argument("--held", type=int, default=20, help="rho: held-out configurations scored")
    ap.add_argument("--budgets", default="5,10,20", help="rho: expensive-label budgets")
    ap.add_argument("--repeats", type=int, default=5, help="rho: draws of the training labels per budget")
    ap.add_argument("--cheap", type=int, default=2000, help="cheap labels")
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--expensive", type=int, default=12, help="search: expensive labels")
    ap.add_argument("--finalists", type=int, default=3)
    ap.add_argument("--menus", type=int, default=4, 
                    help="menus: how many menus (spread over the Q-T ranking) are searched")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gptq", action="store_true",
                    help="search: labels and plan compensated (edgeq search --gptq), as the rival ILP plan is")
    ap.add_argument("--chunks", type=int, default=4, help="search: held-out 512-token windows scored")
    ap.add_argument("--rounds", type=int, default=3, help="search: interleaved timing rounds")
    ap.add_argument("--work", default="/tmp/edgeq-bench-search")
    ap.add_argument("--out", default=str(OUT / "search.json"))
    a = ap.parse_args(argv)

    from edgeq.predictor.profile import load_profile

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    profile = load_profile(a.latency_profile)
    out = Path(a.out)
    res: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    res.update({"profile": {"path": a.latency_profile, "device": profile.device.get("cpu"), "clock": profile.clock,
                            "threads": profile.threads, "noise": profile.noise},
                "machine": {"cpu_flags": profile.device.get("flags"), "python": platform.python_version()}})
    if a.stage in ("all", "search"):
        res["search"] = stage_search(a, work)
        s = res["search"]
        print("| plan | measured ms (predicted) | MB | held-out KLD |")
        print("|---|---|---|---|")
        for r in s["rows"]:
            print(f"| {r['name']} | {r['measured_ms']:.2f} ({r['predicted_ms']:.2f}) | {r['mb']:.1f} | {r['kld']:.4f} |")
        plot(s["rows"], [s["limit_ms"]], out.with_suffix(".png"), f"{profile.describe()}; limit {s['limit_ms']} ms",
             planned=("ilp", "search"))
    if a.stage in ("all", "rho"):
        limit = _stage_limit(a, res, work)
        res["rho"] = stage_rho(a, limit, work)
        print("| expensive labels | expensive only ρ | cheap only ρ | transfer ρ |")
        print("|---|---|---|---|")
        for r in res["rho"]["rows"]:
            print(f"| {r['labels']} | {r['expensive_only']:.3f} ± {r['expensive_only_spread']:.3f} | "
                  f"{r['cheap_only']:.3f} | {r['transfer']:.3f} ± {r['transfer_spread']:.3f} |")
    if a.stage == "menus":
        limit = _stage_limit(a, res, work)
        res["menus"] = stage_menus(a, limit, work)
        print("| menu | Q-T rank | score (T x Q) | best real KLD | predicted ms |")
        print("|---|---|---|---|---|")
        for r in res["menus"]["rows"]:
            print(f"| {r['menu']} | {r['qt_rank']} | {r['score']:.4f} ({r['feasible_share']:.2f} x {r['quality']:.4f}) "
                  f"| {r['best_kld']:.4f} | {r['best_predicted_ms']:.2f} |")
        print(f"Spearman rho, Q-T score vs best real KLD: {res['menus']['spearman_qt_vs_best_kld']:.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


def _stage_limit(a, res: dict[str, Any], work: Path) -> float:
    """The rho and menus stages' latency limit: --limit-ms, else the search stage's, else q4_k_m's predicted step."""
    return a.limit_ms or res.get("search", {}).get("limit_ms") or _predicted_q4km(a, work)


def _predicted_q4km(a, work: Path) -> float:
    b = export(work, "preset-q4_k_m", a.latency_profile, quant="q4_k_m", model=a.model)
    return float(json.loads((b / "manifest.json").read_text())["predicted"]["latency_ms_per_token"])


if __name__ == "__main__":
    sys.exit(main())
