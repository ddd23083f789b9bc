"""uniql_sort: rank every MLP's channels so that the best k of them make a good k-channel MLP, for every k (UniQL).

A SwiGLU MLP is a sum over its channels, y = Σ_j W_down[:, j]·h_j with h = silu(gate·x) ⊙ (up·x), so permuting
gate's and up's rows and down's columns together leaves the model's outputs unchanged, and the k best channels of a
ranking are the k-channel MLP that the ranking considers best. The down projection is never refitted: a refit would
be a different matrix for each width, and one file must serve every width.

Rankings (`--prune-order`):
- `uniql`: nested greedy removal on G = C ⊙ W_downᵀW_down, C = E[hhᵀ] (from the calibrate pass). G is the
  covariance of the channels' contributions to the MLP output (G_jk = E[(W_down[:, j]h_j)·(W_down[:, k]h_k)]), so
  what removing a set S of channels without a refit takes away from the output is 1_Sᵀ G 1_S, cross terms
  included; each step removes the channel that adds least to it, and every prefix of the ranking is the greedy
  choice for its width. On SmolLM2 (f32, held-out text, 3 disjoint calibration subsets, bench/uniql.py) its mean
  KLD at 15 % is 1.5 % below wanda's and `ridge`'s (lower on 2 of the 3 subsets), at 35 % 3.5-8 % below (2 subsets);
- `ridge`: ridge-leverage scores of G, s = diag(G(G + λI)⁻¹), λ = λ_rel·tr(G)/n (a channel scores high when its
  contribution carries a direction of the output that the others do not; the previous default);
- `leverage`: the same score on C itself, s = diag(C(C + λI)⁻¹) (the seed paper's, which a refit of the down
  projection would go with). Without a refit it ranks channels with large activations but small down weights high:
  on SmolLM2 at 15% uniform pruning (f32, scored on calibration text outside the calibration subset) it gave KLD
  0.259, 0.262, 0.231, 0.198, 0.192, 0.189 for λ_rel 0.01, 0.1, 1, 10, 100, 1000 (larger λ drifts towards ranking by
  E[h_j²]), against 0.175, 0.175, 0.175, 0.173 for `ridge` at λ_rel 0.01, 0.1, 1, 10 and 0.172 for `wanda`
  (bench/uniql.py --stage select, and README: UniQL).
  Why no ridge leverage serves without a refit: for any PSD M, diag(M(M + λI)⁻¹)_j = Σ_k λ_k/(λ_k + λ)·u_kj², which
  tends to 1 for every channel as λ → 0 and to M_jj/λ as λ → ∞. A channel scores low when the others span its
  direction, which is what a refit would recover; without one its whole contribution is lost all the same. In the
  output's metric (M = G, or D C D with D = diag(‖W_down[:, j]‖), whose diagonal is G's) the large-λ end is
  `wanda`'s order (G_jj = wanda²) and smaller λ only moves away from it. Measured on the proxy bench/uniql_proxy.py
  (the share of each MLP output's energy that the channels removed at 15 % carry, on a calibration subset the
  order was not computed from; SmolLM2, 16 windows per subset, 3 subsets, every layer): `ridge` at λ 10 and 100 ties
  `wanda`; D C D at λ 1, 10, 100 is 8.4 %, 3.3 %, 0.5 % above it, `leverage` (C, λ 1) 14 % above; only greedy
  removal is below (1.2 %);
- `magnitude`: the L1 norm of each column of the down projection;
- `wanda`: ‖W_down[:, j]‖·√E[h_j²] (Wanda's score, per channel: the diagonal of G, square-rooted);
- `random`: a fixed-seed permutation (the floor any order must beat).

With mean compensation (`--prune-compensate`: uniql_alloc puts W_down[:, S]·E[h_S] of the removed channels S into
the down projection's bias at each rate) what removing S takes away is 1_Sᵀ G_c 1_S with the centered
G_c = (C − μμᵀ) ⊙ WᵀW (μ = E[h]): the channels' mean is no longer lost, only their fluctuation. The covariance-based
orders (`uniql`, `ridge`, `leverage`) then score C − μμᵀ instead of C; `wanda`, `magnitude` and `random` keep their
published scores (the comparison bench/uniql.py makes, each with and without the bias).

The ranking goes to `ctx.analysis["mlp_ranking"]`; uniql_alloc turns it into widths and the stored channel order.
"""

from __future__ import annotations

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.models import llama
from edgeq.passes.base import Context, Pass

ORDERS = ("uniql", "ridge", "leverage", "magnitude", "wanda", "random")
# λ as a multiple of the matrix's mean eigenvalue, per order; chosen on calibration text (bench/uniql.py --stage select)
RIDGE = {"ridge": 10.0, "leverage": 1.0}
SEED = 0


def ridge_leverage(cov: np.ndarray, ridge: float = 1.0) -> np.ndarray:
    """diag(C (C + λI)⁻¹) with λ = ridge · tr(C)/n (C symmetric PSD, float64).

    C(C + λI)⁻¹ = I − λ(C + λI)⁻¹, and C + λI is positive definite, so the scores are 1 − λ·diag((C + λI)⁻¹) from
    one Cholesky factorisation and its inverse (LAPACK potrf/potri): a third of an eigendecomposition's work."""
    from scipy.linalg import lapack

    n = cov.shape[0]
    lam = ridge * float(np.trace(cov)) / n
    if not lam > 0:
        return np.zeros(n)
    a = np.array(cov, dtype=np.float64, order="F")
    a[np.diag_indices(n)] += lam
    c, info = lapack.dpotrf(a, lower=0, overwrite_a=1)
    if info == 0:
        inv, info = lapack.dpotri(c, lower=0, overwrite_c=1)
    if info != 0:
        raise EdgeqError(None, f"the MLP input covariance is not positive semi-definite (LAPACK info {info})")
    return np.clip(1.0 - lam * np.diag(inv), 0.0, 1.0)


def greedy_removal(g: np.ndarray) -> np.ndarray:
    """Scores from nested greedy removal on G: each step removes the channel that adds least to 1_Sᵀ G 1_S,
    G_jj + 2 Σ_{i∈S} G_ij (O(n) a step with the running sums). The score is the step a channel is removed at."""
    n = g.shape[0]
    acc = np.diag(g).copy()
    scores = np.empty(n)
    alive = np.ones(n, bool)
    for step in range(n):
        j = int(np.argmin(np.where(alive, acc, np.inf)))
        scores[j] = step
        alive[j] = False
        acc += 2.0 * g[:, j]
    return scores


def channel_scores(order: str, down: np.ndarray, cov: np.ndarray | None, second_moment: np.ndarray, layer: int,
                   ridge: float | None = None, seed: int = SEED) -> np.ndarray:
    """Higher is kept longer. `down`: (out, channels); `cov`: E[hhᵀ] or None; `second_moment`: E[h_j²]."""
    if order in RIDGE or order == "uniql":
        if cov is None:
            raise EdgeqError(None, f"--prune-order {order} needs the full covariance of each down projection's input "
                                   "(calibration with full statistics; an --imatrix file has only their diagonal)")
        if order == "leverage":
            return ridge_leverage(cov, RIDGE[order] if ridge is None else ridge)
        w = down.astype(np.float64)
        g = cov * (w.T @ w)             # the covariance of the channels' contributions to the MLP output
        if order == "uniql":
            return greedy_removal(g)
        return ridge_leverage(g, RIDGE[order] if ridge is None else ridge)
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
    """Ranks every MLP's channels (ctx.analysis["mlp_ranking"]: layer -> channels, best first). Layers whose order a
    plan file fixes are not ranked: that order is already the stored one."""

    name = "uniql_sort"

    def __init__(self, order: str = "uniql", ridge: float | None = None, seed: int = SEED, centered: bool = False):
        """`centered`: score the covariance-based orders on C − μμᵀ (with mean compensation, see the docstring)."""
        if order not in ORDERS:
            raise EdgeqError(None, f"unknown --prune-order {order!r} ({', '.join(ORDERS)})")
        self.order = order
        self.centered = centered
        self.ridge = ridge
        self.seed = seed

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        cal = ctx.analysis.get("calibration")
        todo = [i for i in range(graph.config.n_layers)
                if all(n not in plan.tensors or plan.tensors[n].order is None for n in llama.mlp_weights(i))]
        if todo and cal is None and self.order in ("uniql", "ridge", "wanda"):
            raise EdgeqError(None, f"--prune-order {self.order} needs calibration (drop --no-calibration)")
        ranking: dict[int, np.ndarray] = {}
        for i in (ctx.progress(todo, desc=f"rank MLP channels ({self.order})", unit="layer")
                  if ctx.progress is not None else todo):
            down = llama.mlp_weights(i)[2]
            stats = cal.stats(down) if cal is not None else None
            w = graph.weights[down].numpy()
            cov = None if stats is None else stats.full()
            if self.centered and cov is not None and self.order in (*RIDGE, "uniql"):
                mu = stats.mean()
                if mu is None:
                    raise EdgeqError(None, f"{down}: centering the order needs the first moments of its input "
                                           "(calibration with edgeq calibrate's statistics, not an --imatrix file)")
                cov = cov - np.outer(mu, mu)
            scores = channel_scores(self.order, w, cov,
                                    np.zeros(w.shape[1]) if stats is None else stats.diag(), i, self.ridge, self.seed)
            ranking[i] = sort_order(scores)
        ctx.analysis["mlp_ranking"] = ranking
        ctx.record(self.name, order=self.order,
                   **({"ridge": RIDGE[self.order] if self.ridge is None else self.ridge} if self.order in RIDGE else {}),
                   **({"seed": self.seed} if self.order == "random" else {}),
                   **({"centered": True} if self.centered else {}), ranked=len(ranking),
                   from_plan=graph.config.n_layers - len(ranking))
        return graph, plan
