"""The joint search space of `edgeq search`: per layer an MLP width (UniQL's sorted prefixes), per tensor a format.

A candidate is a format for every decidable tensor (tensors tied together share one "gene") and a width for every
layer's MLP. Widths are prefixes of uniql_sort's ranking, so a width needs no refit and no requantization: it must
be a multiple of what every MLP tensor's format can slice along the channels (uniql_alloc.layer_alignment: the down
projection's block along its input, 32 for legacy GGUF types, 256 for K-types) — so formats and widths are decided
together, and `repair` narrows a width to the formats a mutation picked.

What a candidate costs is computed, never sampled:
- bytes: the target's FileLayout of the pruned shapes (exact: the GGUF header depends on the widths only through
  whether all layers are equal, which `overhead` is asked);
- latency: the predictor's full prediction for the pruned workload (predictor/budget.LatencyBudget.pruned_ms);
- the cheap accuracy label: the summed sensitivity cost of the formats (Fisher-weighted where the planner computed
  it), each MLP tensor's cost scaled by the share of channels it keeps, plus each layer's pruning cost (the output
  error of the channels it drops, in the same units).

Sampling respects the budgets without looping forever: a bounded number of random draws, then a walk, gene by gene
in random order, towards a feasible anchor (the smallest, or the fastest, point of the space), which ends after at
most one step per gene and layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.models import llama

DRAWS = 16                     # random draws before walking towards a feasible anchor


@dataclass(frozen=True)
class Candidate:
    """One point: the index of its format in each gene's choices, and each layer's MLP width."""

    formats: tuple[int, ...]
    widths: tuple[int, ...]


@dataclass
class Gene:
    """Tensors that share one format (a tie group, or one tensor) and the formats they may take."""

    members: list[str]
    formats: list[str]


@dataclass
class Budgets:
    bytes: int | None
    latency_ms: float | None

    def describe(self) -> str:
        parts = []
        if self.latency_ms is not None:
            parts.append(f"{self.latency_ms:g} ms")
        if self.bytes is not None:
            parts.append(f"{self.bytes / 1e6:.3f} MB")
        return " and ".join(parts)


@dataclass
class Measures:
    """What a candidate costs: exact bytes and predicted latency (None: no latency profile)."""

    bytes: int
    latency_ms: float | None

    def meets(self, b: Budgets) -> bool:
        return ((b.bytes is None or self.bytes <= b.bytes)
                and (b.latency_ms is None or self.latency_ms is None or self.latency_ms <= b.latency_ms))


class GeneSpace:
    """What every search space shares: a format per gene and a width per layer (or stage) from a menu, with
    constraint-respecting sampling, mutation and crossover. A subclass says what a point costs (`measures`), which
    widths its formats allow (`valid_widths`), and its anchors (the smallest and fastest points)."""

    # what to change when nothing meets the budgets (the end of feasible_anchor's error)
    hint = "raise the budget, allow more pruning (--max-prune) or smaller formats"

    def __init__(self, genes: list[Gene], full: list[int], menus: list[list[int]]):
        self.genes = genes
        self.full = full
        self.menus = menus
        self.gene_of = {m: i for i, g in enumerate(genes) for m in g.members}
        self._cache: dict[Candidate, Measures] = {}

    def measures(self, c: Candidate) -> Measures:
        raise NotImplementedError

    def anchors(self) -> dict[str, Candidate]:
        raise NotImplementedError

    def valid_widths(self, c: Candidate, layer: int) -> list[int]:
        return self.menus[layer]

    def format_of(self, c: Candidate, tensor: str) -> str:
        g = self.gene_of[tensor]
        return self.genes[g].formats[c.formats[g]]

    def formats(self, c: Candidate) -> dict[str, str]:
        return {m: g.formats[i] for g, i in zip(self.genes, c.formats) for m in g.members}

    def repair(self, c: Candidate) -> Candidate:
        """Each layer's width narrowed to the largest one its formats can slice (the full width always can)."""
        widths = []
        for i, w in enumerate(c.widths):
            ok = self.valid_widths(c, i)
            below = [v for v in ok if v <= w]
            widths.append(max(below) if below else self.full[i])
        return Candidate(c.formats, tuple(widths))

    def features(self, c: Candidate) -> np.ndarray:
        """What the accuracy predictor sees: each gene's bits per weight and each layer's kept share of channels."""
        bits = [get_format(g.formats[i]).bits_per_weight for g, i in zip(self.genes, c.formats)]
        return np.array(bits + [w / f for w, f in zip(c.widths, self.full)], dtype=np.float64)

    def _by_size(self, g: int) -> list[int]:
        fm = self.genes[g].formats
        return sorted(range(len(fm)), key=lambda i: (get_format(fm[i]).bits_per_weight, fm[i]))

    def random(self, rng: np.random.Generator) -> Candidate:
        """A point around a random overall level (small and fast .. large and precise), so that draws cover sizes
        evenly rather than piling up at the mean."""
        level = rng.random()
        fmts = []
        for g in range(len(self.genes)):
            order = self._by_size(g)
            k = int(np.clip(round(level * (len(order) - 1) + rng.normal(0, 0.8)), 0, len(order) - 1))
            fmts.append(order[k])
        raw = Candidate(tuple(fmts), tuple(self.full))
        widths = []
        for i in range(len(self.full)):
            ok = self.valid_widths(raw, i)
            k = int(np.clip(round(level * (len(ok) - 1) + rng.normal(0, 1.0)), 0, len(ok) - 1))
            widths.append(ok[k])
        return Candidate(tuple(fmts), tuple(widths))

    def uniform(self, rng: np.random.Generator) -> Candidate:
        """A point drawn uniformly: each gene's format, then each layer's width among those its formats allow."""
        raw = Candidate(tuple(int(rng.integers(len(g.formats))) for g in self.genes), tuple(self.full))
        return Candidate(raw.formats, tuple(int(rng.choice(self.valid_widths(raw, i))) for i in range(len(self.full))))

    def uniform_points(self) -> list[Candidate]:
        """One point per format at full width: every gene in that format, or the one nearest in bits per weight
        where its shapes do not allow it (the uniform presets' neighbours, to seed the population)."""
        names = sorted({f for g in self.genes for f in g.formats})
        out = []
        for name in names:
            bpw = get_format(name).bits_per_weight
            fmts = tuple(g.formats.index(name) if name in g.formats else
                         min(range(len(g.formats)), key=lambda i, g=g: (abs(get_format(g.formats[i]).bits_per_weight
                                                                            - bpw), g.formats[i]))
                         for g in self.genes)
            out.append(self.repair(Candidate(fmts, tuple(self.full))))
        return out

    def _narrowest(self, c: Candidate) -> Candidate:
        return Candidate(c.formats, tuple(self.valid_widths(c, i)[0] for i in range(len(self.full))))

    def feasible_anchor(self, budgets: Budgets) -> Candidate:
        """A point within the budgets to walk towards, or one clear error naming what the space can reach."""
        anchors = self.anchors()
        for a in anchors.values():
            if self.measures(a).meets(budgets):
                return a
        reach = "; ".join(f"the {k} point: {self.measures(a).bytes / 1e6:.3f} MB"
                          + (f", predicted {self.measures(a).latency_ms:.3f} ms" if self.measures(a).latency_ms
                             is not None else "") for k, a in anchors.items())
        raise EdgeqError(None, f"no configuration of the search space meets {budgets.describe()} ({reach}); "
                               f"{self.hint}")

    def toward(self, c: Candidate, anchor: Candidate, budgets: Budgets, rng: np.random.Generator) -> Candidate:
        """`c` if it meets the budgets, else `c` with genes and widths taken from the feasible `anchor` (a feasible
        anchor point, or a child's feasible parent) one at a time (random order) until it does: at most one step per
        gene and layer, ending at `anchor` at worst."""
        if self.measures(c).meets(budgets):
            return c
        steps = [("f", g) for g in range(len(self.genes))] + [("w", i) for i in range(len(self.full))]
        fmts, widths = list(c.formats), list(c.widths)
        for k in rng.permutation(len(steps)):
            kind, i = steps[k]
            if kind == "f":
                fmts[i] = anchor.formats[i]
            else:
                widths[i] = anchor.widths[i]
            trial = self.repair(Candidate(tuple(fmts), tuple(widths)))
            if self.measures(trial).meets(budgets):
                return trial
        return anchor

    def sample(self, rng: np.random.Generator, anchor: Candidate, budgets: Budgets) -> Candidate:
        """A random point within the budgets: up to DRAWS draws, then the last one walked towards the anchor."""
        c = anchor
        for _ in range(DRAWS):
            c = self.random(rng)
            if self.measures(c).meets(budgets):
                return c
        return self.toward(c, anchor, budgets, rng)

    def mutate(self, c: Candidate, rng: np.random.Generator, rate: float) -> Candidate:
        """Each gene re-drawn with probability `rate` (to a neighbouring format by size half of the time), each
        width likewise to a neighbouring valid width; then widths repaired for the new formats."""
        fmts = list(c.formats)
        for g in range(len(self.genes)):
            if rng.random() < rate:
                order = self._by_size(g)
                pos = order.index(fmts[g])
                if rng.random() < 0.5:
                    pos = int(np.clip(pos + rng.choice((-1, 1)), 0, len(order) - 1))
                else:
                    pos = int(rng.integers(len(order)))
                fmts[g] = order[pos]
        widths = list(self.repair(Candidate(tuple(fmts), c.widths)).widths)
        probe = Candidate(tuple(fmts), tuple(widths))
        for i in range(len(self.full)):
            if rng.random() < rate:
                ok = self.valid_widths(probe, i)
                pos = ok.index(widths[i]) if widths[i] in ok else len(ok) - 1
                widths[i] = ok[int(np.clip(pos + rng.choice((-1, 1)), 0, len(ok) - 1))]
        return self.repair(Candidate(tuple(fmts), tuple(widths)))

    def crossover(self, a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate:
        """Uniform crossover: each gene and each layer's width from either parent; widths repaired."""
        fmts = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.formats, b.formats))
        widths = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.widths, b.widths))
        return self.repair(Candidate(fmts, widths))


class SearchSpace(GeneSpace):
    """Formats per gene x widths per layer, with the exact bytes, predicted latency and cheap label of a point."""

    def __init__(self, genes: list[Gene], shapes: dict[str, tuple[int, int]], full: list[int],
                 costs: dict[tuple[str, str], float], prune_costs: list[np.ndarray],
                 tensor_bytes: Callable[[str, tuple[int, int], str], int], overhead: Callable[[bool], int],
                 latency: Callable[[dict[str, str], list[int] | None], float] | None,
                 width_step: int = 32, max_prune: float = 0.5, channel_multiple: int = 1):
        if not 0 <= max_prune < 1:
            raise EdgeqError(None, f"--max-prune {max_prune} is outside [0, 1)")
        step = max(1, int(width_step))
        super().__init__(genes, full, [sorted({f} | {w for w in range(step, f, step)
                                                     if w >= math.ceil((1 - max_prune) * f)}) for f in full])
        self.shapes = shapes
        self.costs = costs
        self.prune_costs = prune_costs
        self._tensor_bytes = tensor_bytes
        self._overhead = overhead
        self._latency = latency
        self.channel_multiple = channel_multiple
        self.width_step, self.max_prune = width_step, max_prune
        self.mlp = [llama.mlp_weights(i) for i in range(len(full))]

    def variant(self, width_step: int, keep: Callable[[str], bool]) -> "SearchSpace":
        """The same model and budgets' data with another width step and only the formats `keep` accepts (a gene
        none of whose formats it accepts keeps them all: its tensors' shapes allow nothing else)."""
        genes = [Gene(g.members, [f for f in g.formats if keep(f)] or list(g.formats)) for g in self.genes]
        return SearchSpace(genes, self.shapes, self.full, self.costs, self.prune_costs, self._tensor_bytes,
                           self._overhead, self._latency, width_step, self.max_prune, self.channel_multiple)

    def alignment(self, c: Candidate, layer: int) -> int:
        gate, up, down = self.mlp[layer]
        return math.lcm(get_format(self.format_of(c, down)).slice_step, get_format(self.format_of(c, gate)).block[0],
                        get_format(self.format_of(c, up)).block[0], self.channel_multiple)

    def valid_widths(self, c: Candidate, layer: int) -> list[int]:
        a = self.alignment(c, layer)
        return [w for w in self.menus[layer] if w == self.full[layer] or w % a == 0]

    def shape(self, tensor: str, widths: tuple[int, ...]) -> tuple[int, int]:
        rows, cols = self.shapes[tensor]
        for i, (gate, up, down) in enumerate(self.mlp):
            if tensor in (gate, up):
                return widths[i], cols
            if tensor == down:
                return rows, widths[i]
        return rows, cols

    def tensor_bytes(self, tensor: str, widths: tuple[int, ...], fmt: str) -> int:
        return self._tensor_bytes(tensor, self.shape(tensor, widths), fmt)

    def measures(self, c: Candidate) -> Measures:
        m = self._cache.get(c)
        if m is None:
            fm = self.formats(c)
            pruned = any(w != f for w, f in zip(c.widths, self.full))
            nbytes = self._overhead(len(set(c.widths)) == 1) + sum(
                self.tensor_bytes(t, c.widths, f) for t, f in fm.items())
            lat = None if self._latency is None else self._latency(fm, list(c.widths) if pruned else None)
            m = self._cache[c] = Measures(int(nbytes), lat)
        return m

    def layer_of(self, tensor: str) -> int | None:
        """The layer whose MLP `tensor` is in (None: not an MLP tensor)."""
        return next((i for i, names in enumerate(self.mlp) if tensor in names), None)

    def tensor_costs(self, c: Candidate) -> dict[str, float]:
        """Each tensor's sensitivity cost at the point's format, MLP tensors scaled by the channels kept."""
        out = {}
        for t, f in self.formats(c).items():
            layer = self.layer_of(t)
            out[t] = self.costs[(t, f)] * (1.0 if layer is None else c.widths[layer] / self.full[layer])
        return out

    def pruning_cost(self, c: Candidate) -> float:
        return sum(float(pc[w]) for pc, w in zip(self.prune_costs, c.widths))

    def cheap_label(self, c: Candidate) -> float:
        """Summed sensitivity cost, MLP tensors scaled by the channels kept, plus each layer's pruning cost."""
        return sum(self.tensor_costs(c).values()) + self.pruning_cost(c)

    def anchors(self) -> dict[str, Candidate]:
        """The smallest point (fewest bytes per gene, narrowest widths) and the fastest (least predicted time of
        each gene's products, narrowest widths)."""
        small = Candidate(tuple(min(range(len(g.formats)), key=lambda i, g=g: (sum(
            self._tensor_bytes(m, self.shapes[m], g.formats[i]) for m in g.members), g.formats[i]))
            for g in self.genes), tuple(self.full))
        out = {"smallest": self._narrowest(small)}
        if self._latency is not None:
            base = self.formats(small)
            fmts = []
            for g in self.genes:
                def ms(i: int, g=g) -> float:
                    trial = dict(base)
                    trial.update({m: g.formats[i] for m in g.members})
                    return self._latency(trial, None)
                fmts.append(min(range(len(g.formats)), key=lambda i: (ms(i), g.formats[i])))
            out["fastest"] = self._narrowest(Candidate(tuple(fmts), tuple(self.full)))
        return out



def genes_of(table, ties: list[list[str]]) -> list[Gene]:
    """One gene per tie group (the formats all its members may take) and per other tensor of a CostTable."""
    groups, seen = [], set()
    for g in ties:
        members = [m for m in g if m in table.options]
        if len(members) > 1:
            groups.append(members)
            seen.update(members)
    groups += [[n] for n in table.options if n not in seen]
    genes = []
    for members in groups:
        shared = [o.format for o in table.options[members[0]] if o.rank == 0
                  and all(any(p.format == o.format and p.rank == 0 for p in table.options[m]) for m in members)]
        if not shared:
            raise EdgeqError(None, f"tied tensors {', '.join(members)} share no candidate format")
        genes.append(Gene(members, shared))
    return genes


def pruning_costs(down: np.ndarray, ranking: np.ndarray, cov: np.ndarray | None, diag: np.ndarray | None,
                  scale: float = 1.0) -> np.ndarray:
    """cost[k] = the output error of keeping only the first k channels of `ranking` (no refit): tr(W_R C_RR W_Rᵀ)
    over the dropped channels R, times `scale` (the down projection's Fisher cost per unit of plain output error,
    so that pruning and formats add up in one unit). Index 0..channels."""
    n = down.shape[1]
    w = down[:, ranking].astype(np.float64)
    if cov is not None:
        c = cov[np.ix_(ranking, ranking)].astype(np.float64)
        g = (w.T @ w) * c                      # G_jk = E[(W_j h_j)·(W_k h_k)]
    else:
        d = np.ones(n) if diag is None else np.asarray(diag, dtype=np.float64)[ranking]
        g = np.diag((w * w).sum(0) * d)
    # suffix sums of the dropped block: cost[k] = Σ_{j,l >= k} G_jl
    rev = g[::-1, ::-1]
    block = np.cumsum(np.cumsum(rev, axis=0), axis=1)
    tail = np.diagonal(block)[::-1]             # tail[k] = Σ_{j,l >= k} G_jl
    return np.maximum(np.append(tail, 0.0), 0.0) * scale
