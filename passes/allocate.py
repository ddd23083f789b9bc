"""allocate: one option (format, rank) per tensor, minimising the summed cost under a byte budget.

The ILP (LQ-LoRA's formulation): binary x_ij for tensor i taking option j,

    minimise  Σ c_ij x_ij   s.t.  Σ_j x_ij = 1,   Σ b_ij x_ij ≤ budget − fixed,   (extra rows)

solved exactly with HiGHS (`scipy.optimize.milp`). Costs are normalised
before solving. Tensors the runtime fuses (q/k/v, gate/up) can be tied to
share one format: a tie group becomes one item whose options are the formats
all members can take, with summed bytes and costs. `extra_rows` is the hook
for further linear budgets (a latency predictor's per-option milliseconds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan, TensorPlan
from edgeq.passes.base import Context, Pass
from edgeq.passes.sensitivity import CostTable, Option

MB = 1_000_000
EXACT_TRIES = 8


@dataclass
class ExtraRow:
    """A linear constraint Σ coef(tensor, option) · x ≤ bound, e.g. predicted latency.

    Where the row's quantity is linear only to within a small factor (a latency predictor's learned part),
    `exact(choice)` gives its true value for a whole choice and `limit` what that may not exceed: a solution
    over the limit is solved again under a bound lowered by its excess."""

    name: str
    coef: Callable[[str, Option], float]
    bound: float
    exact: Callable[[dict[str, Option]], float] | None = None
    limit: float | None = None
    info: dict[str, Any] = field(default_factory=dict)    # recorded in the plan's `search` beside the row's value


@dataclass
class Allocation:
    choice: dict[str, Option]
    total_bytes: int
    total_cost: float
    info: dict[str, Any] = field(default_factory=dict)


def _groups(table: CostTable, ties: list[list[str]]) -> list[list[str]]:
    tied: set[str] = set()
    groups = []
    for g in ties:
        members = [n for n in g if n in table.options and n not in tied]
        if len(members) > 1:
            groups.append(members)
            tied.update(members)
    groups += [[n] for n in table.options if n not in tied]
    return groups


def _group_options(table: CostTable, members: list[str]) -> list[tuple[tuple[str, int], int, float]]:
    """((format, rank), summed bytes, summed cost) for every option all members share."""
    keys = None
    for m in members:
        k = {(o.format, o.rank) for o in table.options[m]}
        keys = k if keys is None else keys & k
    if not keys:
        raise EdgeqError(None, f"tied tensors {members} share no candidate format")
    out = []
    for key in sorted(keys):
        opts = [table.option(m, *key) for m in members]
        out.append((key, sum(o.bytes for o in opts), sum(o.cost for o in opts)))
    return out


def min_feasible_bytes(table: CostTable, ties: list[list[str]] = ()) -> int:
    return table.fixed_bytes + sum(min(b for _, b, _ in _group_options(table, g)) for g in _groups(table, list(ties)))


def budget_error(table: CostTable, budget: int, ties) -> EdgeqError:
    need = min_feasible_bytes(table, ties)
    return EdgeqError(None, f"budget {budget / MB:.3f} MB ({8 * budget / table.n_params:.3f} bpw) is below the "
                            f"smallest feasible size {need / MB:.3f} MB ({8 * need / table.n_params:.3f} bpw) "
                            f"with formats {', '.join(table.info.get('formats', []))}")


def solve_ilp(table: CostTable, budget: int, ties: list[list[str]] = (), extra_rows: list[ExtraRow] = (),
              time_limit: float = 120.0, gap: float = 0.0) -> Allocation:
    """The exact optimum (HiGHS, relative gap `gap`); raises EdgeqError when no plan fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    groups = _groups(table, list(ties))
    items = [_group_options(table, g) for g in groups]
    if budget < min_feasible_bytes(table, ties):
        raise budget_error(table, budget, ties)
    # Drop options another option of the same item beats on both bytes and cost (exact without extra rows).
    if not extra_rows:
        pruned = []
        for opts in items:
            keep = [o for o in opts if not any((p[1] <= o[1] and p[2] <= o[2]) and (p[1] < o[1] or p[2] < o[2])
                                               for p in opts)]
            pruned.append(keep)
        items = pruned
    index = [(i, j) for i, opts in enumerate(items) for j in range(len(opts))]
    n = len(index)
    cost = np.array([items[i][j][2] for i, j in index], dtype=np.float64)
    size = np.array([items[i][j][1] for i, j in index], dtype=np.float64)
    # Normalise: the objective of taking every item's worst option is 1. Subtracting each item's
    # best cost is a constant shift that keeps the optimum and improves conditioning.
    base = np.array([min(o[2] for o in items[i]) for i, _ in index])
    shifted = cost - base
    scale = sum(max(o[2] for o in opts) - min(o[2] for o in opts) for opts in items) or 1.0
    c = shifted / scale

    rows, lo, hi = [], [], []
    one = np.zeros((len(items), n))
    for k, (i, _) in enumerate(index):
        one[i, k] = 1.0
    rows.append(one)
    lo += [1.0] * len(items)
    hi += [1.0] * len(items)
    rows.append(size[None, :])
    lo.append(-np.inf)
    hi.append(float(budget - table.fixed_bytes))
    for r in extra_rows:
        coef = np.array([sum(r.coef(m, table.option(m, *items[i][j][0])) for m in groups[i]) for i, j in index])
        rows.append(coef[None, :])
        lo.append(-np.inf)
        hi.append(float(r.bound))
    A = np.vstack(rows)
    t0 = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": gap, "disp": False})
    elapsed = time.perf_counter() - t0
    if res.x is None:
        if res.status == 2 and extra_rows:
            raise EdgeqError(None, f"no plan fits both {budget / MB:.3f} MB and the "
                                   f"{', '.join(r.name for r in extra_rows)} bound")
        if res.status == 2:
            raise budget_error(table, budget, ties)
        raise EdgeqError(None, f"the ILP solver found no plan ({res.message})")
    x = np.round(res.x).astype(int)
    choice: dict[str, Option] = {}
    for k, (i, j) in enumerate(index):
        if x[k]:
            key = items[i][j][0]
            for m in groups[i]:
                choice[m] = table.option(m, *key)
    total_bytes = table.fixed_bytes + sum(o.bytes for o in choice.values())
    total_cost = sum(o.cost for o in choice.values())
    info = {"solver": "HiGHS (scipy.optimize.milp)", "status": int(res.status), "message": str(res.message),
            "optimal": res.status == 0, "mip_gap": float(getattr(res, "mip_gap", 0.0) or 0.0),
            "seconds": round(elapsed, 3), "variables": n, "items": len(items),
            "tied_groups": sum(1 for g in groups if len(g) > 1)}
    return Allocation(choice, total_bytes, total_cost, info)


def solve(table: CostTable, budget: int, ties: list[list[str]] = (), extra_rows: list[ExtraRow] = (),
          time_limit: float = 120.0, adapter_overhead: int = 0) -> Allocation:
    """solve_ilp, deciding also whether low-rank branches pay.

    Branches live in one extra file whose fixed bytes (`adapter_overhead`) are spent only if any branch
    is chosen: the best plan is the better of the plan without branches and the plan with them under
    the budget less that overhead (both exact).
    """
    has_rank = any(o.rank for opts in table.options.values() for o in opts)
    plain = CostTable({n: [o for o in v if not o.rank] for n, v in table.options.items()}, table.fixed_bytes,
                      table.n_params, table.info) if has_rank else table
    best = solve_ilp(plain, budget, ties, extra_rows, time_limit)
    best.info["adapter_overhead_bytes"] = 0
    if has_rank and budget - adapter_overhead >= min_feasible_bytes(table, ties):
        with_branches = solve_ilp(table, budget - adapter_overhead, ties, extra_rows, time_limit)
        if with_branches.total_cost < best.total_cost and any(o.rank for o in with_branches.choice.values()):
            with_branches.total_bytes += adapter_overhead
            with_branches.info["adapter_overhead_bytes"] = adapter_overhead
            best = with_branches
    best.info["branches"] = sum(1 for o in best.choice.values() if o.rank)
    return best


def solve_rows(table: CostTable, budget: int, ties: list[list[str]] = (), extra_rows: list[ExtraRow] = (),
               time_limit: float = 120.0, adapter_overhead: int = 0) -> Allocation:
    """`solve`, with every extra row that has an exact value checked on the solution: a row whose exact value is
    over its limit is solved again with its bound lowered by the excess, a few times at most."""
    rows = list(extra_rows)
    for tries in range(1, EXACT_TRIES + 1):
        alloc = solve(table, budget, ties, rows, time_limit, adapter_overhead)
        over = {}
        for i, r in enumerate(rows):
            if r.exact is not None and r.limit is not None:
                value = r.exact(alloc.choice)
                alloc.info.update({r.name: round(value, 6), f"{r.name}_limit": r.limit, **r.info})
                if value > r.limit:
                    over[i] = value - r.limit
        if not over:
            if rows:
                alloc.info["row_tries"] = tries
            return alloc
        rows = [replace(r, bound=r.bound - over[i]) if i in over else r for i, r in enumerate(rows)]
    names = ", ".join(rows[i].name for i in over)
    raise EdgeqError(None, f"no plan found within the {names} bound after {EXACT_TRIES} tries (the last was over "
                           f"by {max(over.values()):.4g})")


def budget_bytes(table: CostTable, budget_mb: float | None, bpw: float | None) -> int:
    if (budget_mb is None) == (bpw is None):
        raise EdgeqError(None, "give exactly one of --budget-mb and --bpw")
    if budget_mb is not None:
        if not budget_mb > 0:
            raise EdgeqError(None, "--budget-mb must be positive")
        return int(budget_mb * MB)
    if not bpw > 0:
        raise EdgeqError(None, "--bpw must be positive")
    return int(bpw * table.n_params / 8)


def plan_from_choice(graph: Graph, table: CostTable, choice: dict[str, Option], method: str, budget: int,
                     ties: list[list[str]], backend: str, info: dict[str, Any]) -> Plan:
    """A readable plan: per tensor format, rank, bytes, predicted error and why."""
    tie_of = {m: g[0] for g in ties for m in g if len(g) > 1 and m != g[0]}
    tensors: dict[str, TensorPlan] = {}
    for name, t in graph.weights.items():
        if name not in choice:
            tensors[name] = TensorPlan("f32", reason="1-D tensors stay f32")
            continue
        o = choice[name]
        smaller = [p for p in table.options[name] if p.bytes < o.bytes]
        bpw = 8 * o.bytes / t.n_elements
        why = f"{method}: {o.format}{f' + rank-{o.rank} branch' if o.rank else ''} ({bpw:.2f} bpw), error {o.cost:.3g}"
        if smaller:
            nxt = max(smaller, key=lambda p: (p.bytes, -p.cost))
            why += (f"; the next smaller option {nxt.format}{f'+r{nxt.rank}' if nxt.rank else ''} would add "
                    f"{nxt.cost - o.cost:.3g} to save {(o.bytes - nxt.bytes) / 1e3:.1f} kB")
        else:
            why += "; the smallest option"
        tensors[name] = TensorPlan(o.format, reason=why, rank=o.rank, bytes=o.bytes, predicted_error=o.cost,
                                   tie=tie_of.get(name))
    total = table.fixed_bytes + sum(o.bytes for o in choice.values()) + info.get("adapter_overhead_bytes", 0)
    search = {
        "method": method, "budget_bytes": budget, "budget_mb": budget / MB, "budget_bpw": 8 * budget / table.n_params,
        "predicted_bytes": total, "predicted_mb": total / MB, "predicted_bpw": 8 * total / table.n_params,
        "predicted_error": sum(o.cost for o in choice.values()), "fixed_bytes": table.fixed_bytes,
        "min_feasible_bytes": min_feasible_bytes(table, ties), "formats": table.info.get("formats"),
        "cost": table.info.get("cost"), "ties": [g for g in ties if len(g) > 1],
        **{k: table.info[k] for k in ("ranks", "lowrank_scaling") if k in table.info}, **info,
    }
    return Plan(tensors=tensors, preset=None, backend=backend, search=search)


def fit_exact_bytes(solve_at: Callable[[int], tuple[Allocation, Plan]], budget: int,
                    exact_bytes: Callable[[Plan], int] | None, n_params: int) -> tuple[Allocation, Plan]:
    """`solve_at(budget)`, checked against the files' exact size where option bytes are additive only to within a
    few bytes (FileLayout.exact_bytes, ONNX: node names carry running counters). A plan over the budget is solved
    again under a budget smaller by its excess, a few times at most: deterministic, and every allocator that
    plans such a backend shares it (the ILP, DynaQuant's repair)."""
    target = budget
    for tries in range(1, EXACT_TRIES + 1):
        alloc, out = solve_at(target)
        if exact_bytes is None:
            return alloc, out
        exact = exact_bytes(out)
        s = out.search
        alloc.info.update(additive_bytes=s["predicted_bytes"], exact_tries=tries)
        s.update(additive_bytes=s["predicted_bytes"], exact_tries=tries, predicted_bytes=exact,
                 predicted_mb=exact / MB, predicted_bpw=8 * exact / n_params)
        alloc.total_bytes = exact
        if exact <= budget:
            return alloc, out
        # this plan needs (exact - additive) beyond its table bytes, so it fits no target above budget - that: a
        # plan returned again under a target lowered only by its excess over the budget cost one try per few bytes
        target = min(target - (exact - budget), budget - (exact - s["additive_bytes"]))
    raise EdgeqError(None, f"no plan found whose files fit {budget / MB:.3f} MB exactly "
                           f"(the last was {alloc.total_bytes / MB:.6f} MB)")


class Allocate(Pass):
    """Replaces the plan with the ILP's choice for ctx.analysis['costs'] under the byte budget."""

    name = "allocate"

    def __init__(self, budget: int, ties: list[list[str]] = (), extra_rows: list[ExtraRow] = (),
                 time_limit: float = 120.0, adapter_overhead: int = 0,
                 exact_bytes: Callable[[Plan], int] | None = None):
        """`exact_bytes`: the true size of a plan's files where option bytes are additive only to within a few
        bytes (FileLayout.exact_bytes, ONNX); a plan over the budget is solved again under a budget smaller by
        the excess."""
        self.budget = budget
        self.adapter_overhead = adapter_overhead
        self.ties = list(ties)
        self.extra_rows = list(extra_rows)
        self.time_limit = time_limit
        self.exact_bytes = exact_bytes

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        table: CostTable = ctx.analysis["costs"]

        def solve_at(target: int) -> tuple[Allocation, Plan]:
            alloc = solve_rows(table, target, self.ties, self.extra_rows, self.time_limit, self.adapter_overhead)
            return alloc, plan_from_choice(graph, table, alloc.choice, "ilp", self.budget, self.ties, ctx.backend,
                                           alloc.info)

        alloc, out = fit_exact_bytes(solve_at, self.budget, self.exact_bytes, table.n_params)
        out.calibration = plan.calibration
        ctx.record(self.name, method="ilp", budget_bytes=self.budget, predicted_bytes=alloc.total_bytes,
                   predicted_error=alloc.total_cost, formats=out.format_counts(), **alloc.info)
        return graph, out
