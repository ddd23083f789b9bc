"""search: widths x formats under latency and memory budgets, by evolution on an accuracy predictor (APQ).

Runs after the sensitivity pass (every tensor's cost per format) and uniql_sort (every MLP's channel ranking):

1. the space (search_space.py): per gene a format of the backend's candidates, per layer an MLP width that is a
   prefix of the ranking and a multiple of its formats' blocks; exact bytes from the target's FileLayout, latency
   from the device's latency profile (both handed in as data by compile/decide.py);
2. the accuracy predictor (search_accuracy.py), APQ's transfer: pre-trained on `cheap_labels` random points'
   summed Fisher + pruning costs, fine-tuned on `expensive_labels` points within the budgets measured for real
   (the exported model's KLD against the float source in its runtime, `measure`, from compile/search_labels.py):
   the ILP's plan at full widths under the same budgets, half of the rest around it, half sampled anywhere;
3. the additive cost corrected per tensor role by those labels (search_correction.py) and the ILP solved again on
   each correction: plans the ILP would have chosen had its cost been what the labels say;
4. evolution: a population of points within the budgets (the anchor, the ILP's plans, every uniform format at full
   width that meets them, the measured points, random samples), each generation keeping the best quarter by the
   predictor (held within a band around the corrected cheap label, `proxy_banded`) and filling the rest with
   mutations and crossovers, every child repaired (widths follow formats) and walked back within the budgets
   towards its parent (search_space.toward); seeded, so the same inputs give the same plan;
5. finalists: the `finalists` best points by the predictor, and the re-solved ILP's plans, are measured for real
   (when `measure` is given) and the best measured point (finalists and labels alike, all within the budgets) is
   the plan; each finalist's bytes, latency and KLD go to the plan's `search` record.

The plan fixes `keep` (and, after uniql_alloc, `order`) on every MLP tensor, so `edgeq export --plan` writes the
pruned model without calibrating the ranking again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.models import llama
from edgeq.passes.allocate import plan_from_choice
from edgeq.passes.base import Context, Pass
from edgeq.passes.search_accuracy import AccuracyPredictor
from edgeq.passes.search_correction import CostCorrection, corrections
from edgeq.passes.search_menus import menu_table, score_menus
from edgeq.passes.search_space import Budgets, Candidate, GeneSpace, SearchSpace, genes_of, pruning_costs
from edgeq.passes.sensitivity import CostTable, tensor_options
from edgeq.passes.uniql_alloc import segmented


@dataclass
class SearchSettings:
    """How hard to search (`edgeq search` options)."""

    population: int = 32
    generations: int = 20
    mutation: float = 0.1             # per gene and per layer
    cheap_labels: int = 1000
    expensive_labels: int = 8         # real KLD measurements for the fine-tune (0: the cheap predictor alone)
    finalists: int = 3                # best points by the predictor measured for real at the end
    seed: int = 0
    width_step: int = 32              # MLP width menu step (then aligned to each layer's formats)
    menu: str = "fixed"               # fixed: width_step and every format; auto: SpaceEvo's Q-T score picks a menu
    max_prune: float = 0.5            # no layer loses more than this share of its MLP channels

    def check(self) -> None:
        for k in ("population", "generations", "cheap_labels"):
            if getattr(self, k) < 1:
                raise EdgeqError(None, f"--{k.replace('_', '-')} must be at least 1")
        for k in ("expensive_labels", "finalists"):
            if getattr(self, k) < 0:
                raise EdgeqError(None, f"--{k.replace('_', '-')} must be non-negative")
        if self.menu not in ("fixed", "auto"):
            raise EdgeqError(None, f"unknown --menu {self.menu!r} (fixed, auto)")
        if not 0 <= self.mutation <= 1:
            raise EdgeqError(None, "--mutation must be within [0, 1]")


@dataclass
class SearchInputs:
    """What the target and the latency profile know, as data (compile/decide.py builds it)."""

    budgets: Budgets
    budget_bytes: int                                            # for the plan record (the largest when unbounded)
    tensor_bytes: Callable[[str, tuple[int, int], str], int]     # (weight, pruned shape, format) -> file bytes
    overhead: Callable[[bool], int]                              # header and 1-D tensors (all widths equal?)
    latency: Callable[[dict[str, str], list[int] | None], float] | None
    latency_info: dict[str, Any]
    ties: list[list[str]]
    channel_multiple: int = 1
    # plans -> their real KLDs, in order (an executor's map: compile/label_executors.py); None: no expensive labels
    measure: Callable[..., list[float]] | None = None
    # costs -> the ILP's formats at full MLP widths under the same budgets (None: it finds none): the search
    # starts from that plan and measures it beside its finalists, so it never returns one worse by the real KLD
    ilp_formats: Callable[[CostTable], dict[str, str] | None] | None = None


class Search(Pass):
    """Replaces the plan with the searched one (formats and MLP widths)."""

    name = "search"

    def __init__(self, inputs: SearchInputs, settings: SearchSettings):
        settings.check()
        self.inp = inputs
        self.s = settings

    def space(self, graph: Graph, ctx: Context) -> SearchSpace:
        """The search space of `graph` from what the sensitivity pass and uniql_sort computed."""
        table: CostTable = ctx.analysis["costs"]
        ranking = ctx.analysis.get("mlp_ranking")
        if ranking is None:
            raise EdgeqError(None, "the search needs every MLP's channel ranking (uniql_sort runs first)")
        genes = genes_of(table, self.inp.ties)
        costs = {(n, o.format): o.cost for n, opts in table.options.items() for o in opts if o.rank == 0}
        shapes = {n: tuple(graph.weights[n].shape) for n in table.options}
        full = llama.mlp_widths(graph)
        return SearchSpace(genes, shapes, full, costs, self._prune_costs(graph, table, ranking, ctx),
                           self.inp.tensor_bytes, self.inp.overhead, self.inp.latency, self.s.width_step,
                           self.s.max_prune, self.inp.channel_multiple)

    def _prune_costs(self, graph: Graph, table: CostTable, ranking: dict[int, np.ndarray],
                     ctx: Context) -> list[np.ndarray]:
        """Per layer, the cost of each width in the sensitivity table's units: the dropped channels' output error,
        scaled by the down projection's table cost per unit of plain output error (its most precise non-float
        candidate quantized with the plain cost: one round trip per layer)."""
        cal = ctx.analysis.get("calibration")
        imatrix = cal.imatrix() if cal is not None else {}
        out = []
        for i in range(graph.config.n_layers):
            down = llama.mlp_weights(i)[2]
            w = graph.weights[down].numpy()
            stats = cal.stats(down) if cal is not None else None
            cov, diag = (stats.full(), stats.diag()) if stats is not None else (None, None)
            scale = 1.0
            lossy = [o for o in table.options[down] if o.rank == 0 and o.cost > 0]
            if lossy:
                ref = min(lossy, key=lambda o: o.cost)
                plain = tensor_options(down, w, [get_format(ref.format)], stats, imatrix.get(down), None,
                                       _BytesOnly())[0].cost
                scale = ref.cost / plain if plain > 0 else 1.0
            out.append(pruning_costs(w, ranking[i], cov, diag, scale))
        return out

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        s, budgets = self.s, self.inp.budgets
        space = self.space(graph, ctx)
        anchor = space.feasible_anchor(budgets)
        ctx.analysis["search_space"] = (space, anchor)      # for whoever checks the space (tests, bench/search.py)
        rng = np.random.default_rng(s.seed)
        bar = ctx.progress
        # 1. cheap labels over the whole space (the predictor must rank points outside the budget's edge too)
        pts = [space.random(rng) for _ in range(s.cheap_labels)]
        x_cheap = np.array([space.features(c) for c in pts])
        y_cheap = np.array([space.cheap_label(c) for c in pts])
        menus = None
        if s.menu == "auto":             # SpaceEvo: the menu whose samples meet the budgets most and best
            cheap = AccuracyPredictor("cheap", seed=s.seed).fit(x_cheap, y_cheap, None, None)
            scored = score_menus(space, cheap.predict, budgets, s.seed)
            menus = menu_table(scored)
            feasible = [sp for m, sp in scored if m.score > 0]
            if feasible:
                space = feasible[0]
                anchor = space.feasible_anchor(budgets)
                ctx.analysis["search_space"] = (space, anchor)
        # 2. expensive labels on points within the budgets: half of them around the ILP's plan when there is one
        # (the region the answer must beat: random points alone teach the predictor the space's coarse slope,
        # not how to rank plans near the ILP's, where the additive cost it optimises stops being exact)
        table: CostTable = ctx.analysis["costs"]
        ilp = self.ilp_point(space, table)
        measured: dict[Candidate, float] = {}
        if self.inp.measure is not None and s.expensive_labels:
            local = s.expensive_labels // 2 if ilp is not None else 0
            near = [space.toward(space.mutate(ilp, rng, s.mutation / 2), ilp, budgets, rng) for _ in range(local)]
            todo = _unique(([ilp] if ilp else []) + [c for c in near if c != ilp] +
                           [space.sample(rng, anchor, budgets) for _ in range(s.expensive_labels - local)])
            got = self.inp.measure([self.candidate_plan(graph, space, c, ctx) for c in todo], bar,
                                   "search: expensive labels (real KLD)")
            measured.update(zip(todo, got))
        x_exp = np.array([space.features(c) for c in measured]) if measured else None
        y_exp = np.array(list(measured.values())) if measured else None
        predictor = AccuracyPredictor("transfer", seed=s.seed).fit(x_cheap, y_cheap, x_exp, y_exp)
        # the additive cost corrected per role by the labels, and the ILP solved again on each correction
        fitted, correction = corrections(space, measured)
        resolved = {}
        for corr in fitted:
            point = self.ilp_point(space, corr.table(table))
            if point is not None:
                resolved.setdefault(point, corr)

        score = proxy_banded(predictor, space, measured, correction)

        # 4. evolution within the budgets, from the ILP's plans, every uniform format and the measured points
        uniform = [c for c in space.uniform_points() if space.measures(c).meets(budgets)]
        seeds = _unique([anchor] + ([ilp] if ilp else []) + list(resolved) + uniform + list(measured))
        ranked = evolve(space, score, budgets, seeds, anchor, rng, s, bar)
        # 5. finalists (and the re-solved ILP's plans) measured for real
        finalists = ranked[:max(1, s.finalists)]
        if self.inp.measure is not None and s.finalists:
            todo = _unique([c for c in finalists + ([ilp] if ilp else []) + list(resolved) if c not in measured])
            got = self.inp.measure([self.candidate_plan(graph, space, c, ctx) for c in todo], bar,
                                   "search: finalists (real KLD)")
            measured.update(zip(todo, got))
            order = list(measured)          # every measured point is within the budgets: the best of them wins
            best = min(order, key=lambda c: (measured[c], order.index(c)))
        else:
            best = finalists[0]
        out = self.candidate_plan(graph, space, best, ctx)
        out.search.update(self._record(space, best, finalists, measured, predictor, score))
        if ilp is not None:
            out.search["ilp_seed"] = {"chosen": best == ilp, **({"kld": round(measured[ilp], 8)}
                                                                if ilp in measured else {})}
        if correction is not None:
            out.search["cost_correction"] = {
                "chosen": correction.to_json(),
                "ilp_plans": [{"lambda": corr.lam, "chosen": best == c, **({"kld": round(measured[c], 8)}
                                                                            if c in measured else {})}
                              for c, corr in resolved.items()]}
        if menus is not None:
            out.search["menus"] = menus
        out.calibration = plan.calibration
        m = space.measures(best)
        ctx.record(self.name, seed=s.seed, population=s.population, generations=s.generations,
                   cheap_labels=s.cheap_labels, expensive_labels=len(measured), predicted_bytes=m.bytes,
                   predicted_latency_ms=None if m.latency_ms is None else round(m.latency_ms, 4),
                   widths=list(best.widths), formats=out.format_counts())
        return graph, out

    def ilp_point(self, space: SearchSpace, table: CostTable) -> Candidate | None:
        """The ILP's plan on `table`'s costs as a point of `space` (full widths), or None: no ILP plan, a format
        outside the space's menu, or over the budgets by the space's own exact bytes and predicted latency."""
        fmts = self.inp.ilp_formats(table) if self.inp.ilp_formats is not None else None
        if fmts is None:
            return None
        idx = []
        for g in space.genes:
            f = fmts.get(g.members[0])
            if f not in g.formats:
                return None
            idx.append(g.formats.index(f))
        c = Candidate(tuple(idx), tuple(space.full))
        return c if space.measures(c).meets(self.inp.budgets) else None

    def candidate_plan(self, graph: Graph, space: SearchSpace, c: Candidate, ctx: Context) -> Plan:
        return candidate_plan(graph, space, c, ctx, self.inp.budget_bytes, self.inp.ties, self.inp.latency_info)

    def _record(self, space: SearchSpace, best: Candidate, finalists: list[Candidate],
                measured: dict[Candidate, float], predictor: AccuracyPredictor, score) -> dict[str, Any]:
        def point(c: Candidate) -> dict[str, Any]:
            m = space.measures(c)
            d = {"bytes": m.bytes, "mlp_widths": list(c.widths), "cheap_label": round(space.cheap_label(c), 8),
                 "predicted_log_error": round(float(score([c])[0]), 6)}
            if m.latency_ms is not None:
                d["latency_ms"] = round(m.latency_ms, 4)
            if c in measured:
                d["kld"] = round(measured[c], 8)
            return d

        b = self.inp.budgets
        return {"settings": asdict(self.s), "budget_latency_ms": b.latency_ms,
                "measured_configurations": len(measured), "finalists": [point(c) for c in finalists],
                "chosen": point(best), **({"kld": round(measured[best], 8)} if best in measured else {})}


def candidate_plan(graph: Graph, space: SearchSpace, c: Candidate, ctx: Context, budget_bytes: int,
                   ties: list[list[str]] = (), info: dict[str, Any] | None = None) -> Plan:
    """The plan of a point: formats, bytes and costs per tensor, `keep` and the stored `order` on the MLPs."""
    table: CostTable = ctx.analysis["costs"]
    fm = space.formats(c)
    choice = {n: table.option(n, f) for n, f in fm.items()}
    m = space.measures(c)
    p = plan_from_choice(graph, table, choice, "search", budget_bytes, list(ties), ctx.backend, dict(info or {}))
    ranking = ctx.analysis["mlp_ranking"]
    for i, names in enumerate(space.mlp):
        k = c.widths[i]
        order = [int(v) for v in segmented(ranking[i], [k])] if k != space.full[i] else None
        for n in names:
            t = p.tensors[n]
            t.keep = k if k != space.full[i] else None
            t.order = order
            t.bytes = space.tensor_bytes(n, c.widths, fm[n])
            t.predicted_error = round(t.predicted_error * k / space.full[i], 12)
            if t.keep is not None:
                t.reason += f"; MLP width {k} of {space.full[i]}"
    p.search.update({"predicted_bytes": m.bytes, "predicted_mb": m.bytes / 1e6,
                     "predicted_bpw": 8 * m.bytes / table.n_params, "predicted_error": space.cheap_label(c),
                     "mlp_widths": list(c.widths)})
    if m.latency_ms is not None:
        p.search["predicted_latency_ms"] = round(m.latency_ms, 4)
    return p


def proxy_banded(predictor: AccuracyPredictor, space: SearchSpace, measured: dict[Candidate, float],
                 correction: CostCorrection | None = None) -> Callable[[list[Candidate]], np.ndarray]:
    """The search's score: the predictor's log-error, held within a band around the exact cheap label (summed
    Fisher + pruning costs, computed for any point; per role corrected by the labels when `correction` is given,
    search_correction.py) mapped onto the real labels' scale.

    Why: the evolution ranks thousands of points by the predictor and keeps the best, so it finds exactly the
    points where a learned model extrapolates wrongly. On SmolLM2 the finalists of an unguarded search (MLP widths
    cut to 768-1024 in a few layers) were predicted at e^-13..e^-18 and measured 0.18-0.26 KLD, 60-80x the ILP
    plan, though their cheap labels said 1,000x worse. The band is log(KLD) ≈ a·log(cheap) + b fitted on the measured
    points (a > 0), widened by the largest residual seen there and half the labels' spread: the predictor reorders
    points the proxy ranks alike, and cannot lift a point the proxy ranks far worse than any measured one."""
    def raw(cs: list[Candidate]) -> np.ndarray:
        return predictor.predict(np.array([space.features(c) for c in cs]))

    label = space.cheap_label if correction is None else (lambda c: correction.label(space, c))

    def proxy(cs: list[Candidate]) -> np.ndarray:
        return np.log(np.maximum([label(c) for c in cs], 1e-12))

    if len(measured) < 2:
        return raw
    q, y = proxy(list(measured)), np.log(np.maximum(list(measured.values()), 1e-12))
    a, b = np.linalg.lstsq(np.column_stack([q, np.ones_like(q)]), y, rcond=None)[0]
    if not a > 0:
        a = float(np.std(y) / np.std(q)) if np.std(q) > 0 else 1.0
        b = float(np.mean(y - a * q))
    r = y - (a * q + b)
    margin = float(np.max(np.abs(r))) + 0.5 * float(np.std(y))

    def score(cs: list[Candidate]) -> np.ndarray:
        base = a * proxy(cs) + b
        return np.clip(raw(cs), base - margin, base + margin)

    return score


def evolve(space: GeneSpace, score: Callable[[list[Candidate]], np.ndarray], budgets: Budgets,
           seeds: list[Candidate], anchor: Candidate, rng: np.random.Generator, s: SearchSettings,
           bar: Callable | None = None) -> list[Candidate]:
    """APQ's evolution within the budgets, for any space (decoders' MLP widths x formats, CNN stage widths x
    int8/float): `seeds` plus points sampled within the budgets make the population; each generation keeps the
    best quarter by `score` (lower is better) and fills the rest with mutations and crossovers, each child walked
    back within the budgets towards its feasible parent. Returns the last population, best first."""
    pop = _unique(seeds + [space.sample(rng, anchor, budgets) for _ in range(max(0, s.population - len(seeds)))])
    gens = range(s.generations)
    for _ in (bar(gens, desc="search: evolution", unit="generation") if bar else gens):
        ranked = [pop[i] for i in np.argsort(score(pop), kind="stable")]
        elite = ranked[:max(2, len(ranked) // 4)]
        children = []
        for k in range(s.population - len(elite)):
            if k % 2 == 0:
                parent = elite[int(rng.integers(len(elite)))]
                child = space.mutate(parent, rng, s.mutation)
            else:
                a, b = rng.choice(len(elite), 2, replace=len(elite) < 2)
                parent = elite[int(a)]
                child = space.mutate(space.crossover(parent, elite[int(b)], rng), rng, s.mutation / 2)
            # back within the budgets towards the (feasible) parent, not the anchor: a repair that reached
            # for the smallest formats would drag every over-budget child to the space's poorest corner
            children.append(space.toward(child, parent, budgets, rng))
        pop = _unique(elite + children)
    return [pop[i] for i in np.argsort(score(pop), kind="stable")]


class _BytesOnly:
    """A size model for a cost-only round trip (tensor_options asks for bytes too)."""

    backend = "search"

    @staticmethod
    def tensor_bytes(name, shape, fmt) -> int:
        return 0

    @staticmethod
    def branch_bytes(name, shape, rank) -> int:
        return 0


def _unique(cs: list[Candidate]) -> list[Candidate]:
    """Without repeats, in first-seen order (deterministic)."""
    return list(dict.fromkeys(cs))
