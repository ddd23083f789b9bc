"""uniql_sort: order every MLP's channels so that each prefix is a good smaller MLP (UniQL).

A SwiGLU MLP is a sum over its channels, y = Σ_j W_down[:, j]·h_j with h = silu(gate·x) ⊙ (up·x), so permuting
gate's and up's rows and down's columns together leaves the model's outputs unchanged, and keeping the first k
channels of the sorted MLP is the k-channel MLP that the order considers best. The down projection is never
refitted: a refit would be a different matrix for each width, and one file must serve every width.

Orders (`--prune-order`):
- `uniql`: ridge-leverage scores of the down projection's input covariance C = E[hhᵀ] (from the calibrate pass),
  s = diag(C(C + λI)⁻¹) with λ = λ_rel·tr(C)/n: how much of the calibration activations' span channel j carries
  that the others do not, with directions weaker than λ (noise at this many tokens) discounted;
- `magnitude`: the L1 norm of each column of the down projection;
- `wanda`: ‖W_down[:, j]‖·√E[h_j²] (Wanda's score, per channel);
- `random`: a fixed-seed permutation (the floor any order must beat).

The pass returns the sorted graph (weights stay lazy) and records each MLP tensor's `order` in the plan; the
calibration statistics of the down projections' inputs are reindexed to match, so that later passes and the
quantizers' importance matrices see the sorted model.
"""

from __future__ import annotations

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.models import llama
from edgeq.passes.base import Context, Pass

ORDERS = ("uniql", "magnitude", "wanda", "random")
# λ as a fraction of C's mean eigenvalue; bench/uniql.py --ridge sweeps it (KLD at 15% pruning on held-out text)
RIDGE = 1.0
SEED = 0


def ridge_leverage(cov: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """diag(C (C + λI)⁻¹) with λ = ridge · tr(C)/n, from C's eigendecomposition (C symmetric PSD, float64)."""
    n = cov.shape[0]
    lam = ridge * float(np.trace(cov)) / n
    if not lam > 0:
        return np.zeros(n)
    evals, vecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, 0.0)
    return (vecs * vecs) @ (evals / (evals + lam))


def channel_scores(order: str, down: np.ndarray, cov: np.ndarray | None, second_moment: np.ndarray, layer: int,
                   ridge: float = RIDGE, seed: int = SEED) -> np.ndarray:
    """Higher is kept longer. `down`: (out, channels); `cov`: E[hhᵀ] or None; `second_moment`: E[h_j²]."""
    if order == "uniql":
        if cov is None:
            raise EdgeqError(None, "--prune-order uniql needs the full covariance of each down projection's input "
                                   "(calibration with full statistics; an --imatrix file has only their diagonal)")
        return ridge_leverage(cov, ridge)
    if order == "magnitude":
        return np.abs(down).sum(axis=0, dtype=np.float64)
    if order == "wanda":
        return np.linalg.norm(down.astype(np.float64), axis=0) * np.sqrt(np.maximum(second_moment, 0.0))
    if order == "random":
        return np.random.default_rng([seed, layer]).random(down.shape[1])
    raise EdgeqError(None, f"unknown --prune-order {order!r} ({', '.join(ORDERS)})")


def sort_order(scores: np.ndarray) -> np.ndarray:
    """Channels by decreasing score; ties keep the source order (deterministic)."""
    return np.argsort(-scores, kind="stable")


class UniqlSort(Pass):
    """Sorts every MLP's channels; in the plan, each MLP tensor's `order`."""

    name = "uniql_sort"

    def __init__(self, order: str = "uniql", ridge: float = RIDGE, seed: int = SEED):
        if order not in ORDERS:
            raise EdgeqError(None, f"unknown --prune-order {order!r} ({', '.join(ORDERS)})")
        self.order = order
        self.ridge = ridge
        self.seed = seed

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        cal = ctx.analysis.get("calibration")
        given = {i: _plan_order(plan, i, graph) for i in range(graph.config.n_layers)}
        orders: dict[int, np.ndarray] = {}
        for i, fixed in given.items():
            if fixed is not None:         # a plan file's order wins (it was computed on this model before)
                orders[i] = fixed
                continue
            if cal is None and self.order in ("uniql", "wanda"):
                raise EdgeqError(None, f"--prune-order {self.order} needs calibration (drop --no-calibration)")
            down = llama.mlp_weights(i)[2]
            stats = cal.stats(down) if cal is not None else None
            w = graph.weights[down].numpy()
            scores = channel_scores(self.order, w, None if stats is None else stats.full(),
                                    np.zeros(w.shape[1]) if stats is None else stats.diag(), i, self.ridge, self.seed)
            orders[i] = sort_order(scores)
        for i, o in orders.items():
            for name in llama.mlp_weights(i):
                plan.tensors[name].order = [int(v) for v in o]
        if cal is not None:
            ctx.analysis.setdefault("calibration_source", cal)
            ctx.analysis["calibration"] = cal.reindexed({llama.mlp_weights(i)[2]: o for i, o in orders.items()})
        ctx.record(self.name, order=self.order, **({"ridge": self.ridge} if self.order == "uniql" else {}),
                   **({"seed": self.seed} if self.order == "random" else {}),
                   from_plan=sum(1 for o in given.values() if o is not None), layers=len(orders))
        return llama.prune_mlp(graph, orders), plan


def _plan_order(plan: Plan, layer: int, graph: Graph) -> np.ndarray | None:
    """The order a plan file gives layer `layer`'s MLP: the same permutation on gate, up and down, or none."""
    names = llama.mlp_weights(layer)
    given = [plan.tensors[n].order for n in names]
    if all(o is None for o in given):
        return None
    if any(o != given[0] for o in given):
        raise EdgeqError(None, f"layer {layer}: the plan's MLP orders differ between {', '.join(names)} (they must be "
                               "one permutation of the MLP's channels)")
    full = graph.weights[names[0]].shape[0]
    o = np.asarray(given[0], dtype=np.int64)
    if o.shape != (full,) or sorted(o.tolist()) != list(range(full)):
        raise EdgeqError(None, f"{names[0]}: order must be a permutation of its {full} channels")
    return o
