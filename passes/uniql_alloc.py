"""uniql_alloc: per-layer MLP widths for each global pruning rate, and the stored channel order that serves them all.

The pruning rate is the fraction of all MLP channels removed (so of the MLPs' parameters: a channel is one row of
gate and of up and one column of down in every layer). For each rate the pass picks every layer's width:

- `uniql`: layers that change the residual stream less are pruned more. Importance I_l = 1 − cos(layer input,
  layer output), averaged over the calibration tokens (the calibrate pass); a layer's share of the removed channels
  is softmax(−I/τ) with τ = `temperature` × std(I), clamped at `max_layer_rate` of the layer and renormalised;
- `uniform`: every layer loses the same share.

Widths are multiples of each layer's alignment: the block of the down projection's format along its input (the
registry's `block`; 32 for legacy GGUF types and 4-bit groups, 256 for K-types), and whatever the target needs along
the MLP's channels (TVM's weight panels), so a width is a byte prefix of every stored row and whole panels of rows.
The rounding keeps the global count exact whenever the alignments allow it (the `achieved` rate says otherwise).

Stored order: a runtime keeps a prefix of the stored channels, so the channels kept at a layer's smallest width come
first, then those the next width adds, and so on (uniql_sort's ranking cut at the layer's widths). Within each
segment the channels keep their source order: sorting them by rank too would put the strongest channels of a layer
into the same quantization blocks, where one scale serves them all (SmolLM2, q4_0 with the importance matrix: the
down projections' output error tr(ΔW·C·ΔWᵀ) 1.45x the unsorted one in rank order, 1.15x in segments, 1.14x for a
random permutation, which is what moving SmolLM2's Q4_1-quantized columns out of their source blocks costs).

With `--prune-attention` (uniql_attention sorted the heads) each rate's entry also gets every layer's Q/K and V
head widths (`qk`, `v`: dimensions per head) at the same rate and layer shares, in whole RoPE pairs and whole blocks
of the output projection's input (see `_attention_table`); the head order itself is the sorted graph's.

Mean compensation (`compensate`, `--prune-compensate`; FLAP's bias): at each rate, layer l's down projection gets
the bias b = W_down[:, R]·E[h_R] of the channels R the rate removes (E[h] over the calibration tokens), so a removed
channel's average contribution stays in the output and only its fluctuation is lost; uniql_sort then scores the
centered covariance. One bias per layer per rate, in the table (`bias`, base64 float32), applied by the runtime when
it narrows the file; rate 0 has none (the source model). llama.cpp's llama and deci architectures both read an
optional `blk.N.ffn_down.bias`; ONNX and TVM bundles do not carry it yet (the export refuses).

A plan file can instead fix each layer's width (`keep` on the MLP tensors): the graph is narrowed to those widths
and written as an already-pruned model; or give the stored `order` itself and a table (what `edgeq plan` wrote).
"""

from __future__ import annotations

import math

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.models import llama
from edgeq.passes.base import Context, Pass
from edgeq.runtime.manifest import encode_bias

ALLOCS = ("uniql", "uniform")
# softmax temperature in units of the importances' spread; bench/uniql.py --temperature sweeps it
TEMPERATURE = 1.0
MAX_LAYER_RATE = 0.9          # no layer loses more than this share of its channels
# --prune-attention: the Q/K and the V head dimensions' pruning rates as multiples of the MLPs'. Chosen on calibration
# text (bench/uniql.py --stage attention; SmolLM2, ONNX f32, KLD at equal parameters removed, rates 15/25/35%): the
# MLPs alone 0.215/0.439/0.762; Q/K:V 1:1 0.367/0.708/1.108, 0.5:0.5 0.319/0.558/0.819, 0.25:0.25 0.299/0.558/0.798,
# 1:0 0.246/0.559/0.978, 0.5:0 0.209/0.446/0.783, 0.25:0 0.207/0.432/0.731. A V dimension costs far more than a Q/K
# pair per parameter (one V row feeds every query head of its group), so V stays whole by default.
ATTENTION_RATIO = (0.25, 0.0)
MAX_ATTENTION_RATIO = 4.0     # a family's rate is capped at MAX_LAYER_RATE whatever the multiple


def layer_alignment(graph: Graph, plan: Plan, layer: int, channel_multiple: int = 1) -> int:
    """The step of layer `layer`'s width: every MLP tensor's format block along the channels (down's columns: the
    registry's slice step, a block or two; gate's and up's rows) and the target's multiple."""
    gate, up, down = llama.mlp_weights(layer)
    steps = [get_format(plan.tensors[down].format).slice_step, get_format(plan.tensors[gate].format).block[0],
             get_format(plan.tensors[up].format).block[0], max(1, channel_multiple)]
    return math.lcm(*steps)


def attention_alignment(graph: Graph, plan: Plan, layer: int) -> tuple[int, int]:
    """The steps of layer `layer`'s Q/K and V head widths (dimensions per head): whole RoPE pairs and whole row blocks
    of Q and K; whole blocks of the output projection's input per head (its columns), or no V pruning where a head is
    not a whole number of them."""
    q, k, v, o = llama.attention_weights(layer)
    d = graph.config.head_dim
    qk = math.lcm(2, *(get_format(plan.tensors[n].format).block[0] for n in (q, k)))
    vs = math.lcm(get_format(plan.tensors[o].format).slice_step, get_format(plan.tensors[v].format).block[0])
    return (qk if d % qk == 0 else d), (vs if d % vs == 0 else d)


def layer_shares(importance: np.ndarray, rate: float, alloc: str, temperature: float = TEMPERATURE,
                 max_layer_rate: float = MAX_LAYER_RATE) -> np.ndarray:
    """Each layer's pruning rate, averaging `rate` over layers (equal widths; `channels_removed` weights them)."""
    n = len(importance)
    if alloc == "uniform" or rate <= 0:
        return np.full(n, rate)
    if alloc != "uniql":
        raise EdgeqError(None, f"unknown --prune-alloc {alloc!r} ({', '.join(ALLOCS)})")
    spread = float(np.std(importance))
    if spread == 0 or temperature <= 0:
        return np.full(n, rate)
    z = -(importance - importance.mean()) / (temperature * spread)
    w = np.exp(z - z.max())
    p = rate * n * w / w.sum()
    cap = max(max_layer_rate, rate)
    for _ in range(n):                      # water-filling: clamp, hand the excess to the unclamped layers
        over = p > cap
        if not over.any():
            break
        excess = float((p[over] - cap).sum())
        p[over] = cap
        free = p < cap
        p[free] += excess * p[free] / p[free].sum()
    return p


def widths_for(full: list[int], align: list[int], shares: np.ndarray, rate: float) -> list[int]:
    """Aligned widths whose removed channels total round(rate · Σ full), as close to `shares` as the steps allow."""
    full_a, align_a = np.asarray(full), np.asarray(align)
    target = rate * full_a.sum()
    g = math.gcd(*align)
    goal = int(round(target / g)) * g
    ideal = shares * full_a                     # channels each layer would lose
    most = full_a - align_a                     # at least one step stays
    steps = np.minimum(np.floor(ideal / align_a), most // align_a).astype(np.int64)
    removed = int((steps * align_a).sum())
    while removed < goal:
        room = (steps * align_a + align_a <= most) & (align_a <= goal - removed)
        if not room.any():
            break
        deficit = np.where(room, (ideal - steps * align_a) / align_a, -np.inf)
        i = int(np.argmax(deficit))
        steps[i] += 1
        removed += int(align_a[i])
    return [int(f - s * a) for f, s, a in zip(full, steps, align)]


class UniqlAlloc(Pass):
    """Writes the plan's `pruning` table (rate -> per-layer widths) and each MLP tensor's stored `order`, and returns
    the graph in that order (narrowed, for a plan's `keep`)."""

    name = "uniql_alloc"

    def __init__(self, rates: list[float] | None, alloc: str = "uniql", channel_multiple: int = 1,
                 temperature: float = TEMPERATURE, order: str = "uniql",
                 attention_ratio: tuple[float, float] = ATTENTION_RATIO, compensate: bool = False):
        """`rates` None: the plan file's table (checked against this plan's alignments), or its `keep`."""
        if alloc not in ALLOCS:
            raise EdgeqError(None, f"unknown --prune-alloc {alloc!r} ({', '.join(ALLOCS)})")
        bad = [r for r in rates or [] if not 0 <= r < 1]
        if bad:
            raise EdgeqError(None, f"pruning rate {bad[0]} is outside [0, 1)")
        self.rates = None if rates is None else sorted(set([0.0] + [float(r) for r in rates]))
        self.alloc = alloc
        self.channel_multiple = channel_multiple
        self.temperature = temperature
        self.order = order
        if len(attention_ratio) != 2 or not all(0 <= b <= MAX_ATTENTION_RATIO for b in attention_ratio):
            raise EdgeqError(None, f"--prune-attention-ratio takes two multiples (Q/K, V) in [0, {MAX_ATTENTION_RATIO}]"
                                   f", not {','.join(map(str, attention_ratio))}")
        self.attention_ratio = (float(attention_ratio[0]), float(attention_ratio[1]))
        self.compensate = compensate

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        n = graph.config.n_layers
        full = llama.mlp_widths(graph)
        align = [layer_alignment(graph, plan, i, self.channel_multiple) for i in range(n)]
        keep = _plan_keep(plan, n, full, align)
        cal = ctx.analysis.get("calibration")
        if self.rates is not None and (plan.pruning or any(t.order is not None for t in plan.tensors.values())):
            raise EdgeqError(None, "the plan already orders the MLPs (and has its pruning table); export it without "
                                   "--pruning-rates, or drop its orders to make a new table")
        if keep is not None:
            if self.rates is not None or plan.pruning:
                raise EdgeqError(None, "the plan fixes the MLP widths (keep); a pruning table would prune it again")
            cuts = [[k] for k in keep]
            ctx.record(self.name, keep=keep)
        elif self.rates is None:
            if plan.pruning and plan.pruning.get("attention"):
                raise EdgeqError(None, "the plan's pruning table has attention widths, whose sorted attention a plan "
                                       "does not record; export with --pruning-rates --prune-attention instead")
            if plan.pruning:
                _check_table(plan.pruning, full, align)
                ctx.record(self.name, table="from the plan", rates=[r["rate"] for r in plan.pruning["rates"]])
            cuts = [[e["widths"][i] for e in (plan.pruning or {}).get("rates", [])] for i in range(n)]
        else:
            importance = None
            if cal is not None and cal.layer_cos is not None:
                importance = 1.0 - np.asarray(cal.layer_cos, dtype=np.float64)
            if importance is None and self.alloc == "uniql":
                raise EdgeqError(None, "--prune-alloc uniql needs calibration (layer importances); use --prune-alloc "
                                       "uniform without it")
            table = []
            total = sum(full)
            attention = bool(ctx.analysis.get("attention_sorted"))
            split = _rate_split(graph, self.attention_ratio) if attention else 1.0
            for r in self.rates:
                r_mlp = min(r * split, MAX_LAYER_RATE)
                shares = layer_shares(importance if importance is not None else np.zeros(n), r_mlp, self.alloc,
                                      self.temperature)
                widths = widths_for(full, align, shares, r_mlp)
                table.append({"rate": r, "achieved": round(1 - sum(widths) / total, 6), "widths": widths})
            plan.pruning = {"what": "mlp channels", "order": self.order, "alloc": self.alloc,
                            **({"temperature": self.temperature} if self.alloc == "uniql" else {}),
                            "full": full, "align": align,
                            "importance": None if importance is None else [round(float(v), 6) for v in importance],
                            "rates": table}
            if attention:
                plan.pruning["attention"] = _attention_table(graph, plan, table, importance, self.alloc,
                                                             self.temperature,
                                                             tuple(split * b for b in self.attention_ratio))
            cuts = [[e["widths"][i] for e in table] for i in range(n)]
            ctx.record(self.name, alloc=self.alloc, rates=self.rates, achieved=[t["achieved"] for t in table],
                       align=sorted(set(align)))
        ranking = ctx.analysis.get("mlp_ranking", {})
        channels: dict[int, np.ndarray] = {}
        for i in range(n):
            stored = _plan_order(plan, i, full[i])
            if stored is None:
                if i not in ranking:
                    raise EdgeqError(None, f"layer {i}: no MLP channel ranking (uniql_sort runs first)")
                stored = segmented(ranking[i], cuts[i])
            for name in llama.mlp_weights(i):
                plan.tensors[name].order = [int(v) for v in stored]
            channels[i] = stored[:keep[i]] if keep is not None else stored
        if self.compensate:
            if self.rates is None or keep is not None:
                raise EdgeqError(None, "--prune-compensate makes a new pruning table (--pruning-rates); a plan's "
                                       "table or keep carries no biases")
            _add_biases(graph, plan.pruning, {i: _plan_order(plan, i, full[i]) for i in range(n)}, cal)
            ctx.record(self.name, compensate=True)
        if cal is not None:
            ctx.analysis.setdefault("calibration_source", cal)
            ctx.analysis["calibration"] = cal.reindexed({llama.mlp_weights(i)[2]: c for i, c in channels.items()})
        return llama.prune_mlp(graph, channels), plan


def _add_biases(graph: Graph, table: dict, stored: dict[int, np.ndarray], cal) -> None:
    """Each rate's per-layer down-projection bias, W_down[:, R]·E[h_R] over the channels R the rate removes (the
    source weights and the calibration's first moments, float64 sums)."""
    n = graph.config.n_layers
    means = []
    for i in range(n):
        down = llama.mlp_weights(i)[2]
        stats = None if cal is None else cal.stats(down)
        mu = None if stats is None else stats.mean()
        if mu is None:
            raise EdgeqError(None, f"--prune-compensate needs the mean of {down}'s input (edgeq's calibration, not an "
                                   "--imatrix file or --no-calibration)")
        means.append(mu)
    table["compensate"] = {"what": "ffn_down bias = W_down[:, removed] . E[h_removed]", "dtype": "float32",
                           "width": graph.config.hidden_size}
    for entry in table["rates"]:
        if all(w == f for w, f in zip(entry["widths"], table["full"])):
            continue                       # the source model: no bias
        out = []
        for i in range(n):
            removed = stored[i][entry["widths"][i]:]
            w = graph.weights[llama.mlp_weights(i)[2]].numpy()
            out.append(encode_bias(w[:, removed].astype(np.float64) @ means[i][removed]))
        entry["bias"] = out


def _rate_split(graph: Graph, ratio: tuple[float, float]) -> float:
    """With attention pruning the rate is the share of all the layers' prunable parameters removed (the MLPs' and the
    attention projections'), the Q/K and V head dimensions pruned at `ratio` times the MLPs' rate: the MLPs' rate is
    the returned factor times the rate. One Q/K dimension removes the same Q and K rows in every head, one V
    dimension a V row and an O column per head: the same count, so Q/K and V hold half the attention's parameters
    each."""
    c = graph.config
    mlp = 3 * c.hidden_size * sum(llama.mlp_widths(graph))
    att = 2 * c.hidden_size * c.head_dim * (c.n_heads + c.n_kv_heads) * c.n_layers
    return (mlp + att) / (mlp + att * (ratio[0] + ratio[1]) / 2)


def _attention_table(graph: Graph, plan: Plan, table: list[dict], importance: np.ndarray | None, alloc: str,
                     temperature: float, factors: tuple[float, float]) -> dict:
    """Per rate, each layer's Q/K and V head widths (added to the rate's entry as `qk` and `v`) at `factors` times the
    rate, with the layers' shares of the MLPs (by the layers' importance)."""
    n, d = graph.config.n_layers, graph.config.head_dim
    steps = [attention_alignment(graph, plan, i) for i in range(n)]
    full = [d] * n
    out = {"full_qk": full, "align_qk": [s[0] for s in steps], "full_v": full, "align_v": [s[1] for s in steps]}
    for entry in table:
        for key, factor in zip(("qk", "v"), factors):
            r = min(entry["rate"] * factor, MAX_LAYER_RATE)
            shares = layer_shares(importance if importance is not None else np.zeros(n), r, alloc, temperature)
            entry[key] = widths_for(full, out[f"align_{key}"], shares, r)
        entry["achieved_attention"] = round(1 - (sum(entry["qk"]) + sum(entry["v"])) / (2 * sum(full)), 6)
    return out


def segmented(ranking: np.ndarray, widths: list[int]) -> np.ndarray:
    """The stored order: the best `w` channels first for every width `w` the layer is loaded at, each segment
    between two widths in source order (see the module's docstring)."""
    out, start = [], 0
    for w in sorted(set(int(v) for v in widths) | {len(ranking)}):
        out.append(np.sort(ranking[start:w]))
        start = w
    return np.concatenate(out)


def _plan_order(plan: Plan, layer: int, full: int) -> np.ndarray | None:
    """The stored order a plan file gives layer `layer`'s MLP: the same permutation on gate, up and down, or none."""
    names = llama.mlp_weights(layer)
    given = [plan.tensors[n].order for n in names]
    if all(o is None for o in given):
        return None
    if any(o != given[0] for o in given):
        raise EdgeqError(None, f"layer {layer}: the plan's MLP orders differ between {', '.join(names)} (they must be "
                               "one permutation of the MLP's channels)")
    o = np.asarray(given[0], dtype=np.int64)
    if o.shape != (full,) or sorted(o.tolist()) != list(range(full)):
        raise EdgeqError(None, f"{names[0]}: order must be a permutation of its {full} channels")
    return o


def _check_table(table: dict, full: list[int], align: list[int]) -> None:
    """A plan file's pruning table must fit this model and the formats the plan now has."""
    if table.get("full") != full or not isinstance(table.get("rates"), list):
        raise EdgeqError(None, f"the plan's pruning table is for MLP widths {table.get('full')}, the model has {full}")
    for entry in table["rates"]:
        w = entry.get("widths") if isinstance(entry, dict) else None
        if not isinstance(w, list) or len(w) != len(full) or any(
                not isinstance(v, int) or not 0 < v <= f or v % a for v, f, a in zip(w, full, align)):
            raise EdgeqError(None, f"the plan's pruning table at rate {entry.get('rate') if isinstance(entry, dict) else entry}: "
                                   f"widths must be multiples of {align} within {full}")
    table["align"] = align


def _plan_keep(plan: Plan, n: int, full: list[int], align: list[int]) -> list[int] | None:
    """Per-layer widths a plan file fixes (`keep` on each MLP tensor, the same in a layer), or None."""
    out, any_keep = [], False
    for i in range(n):
        names = llama.mlp_weights(i)
        keeps = [plan.tensors[m].keep for m in names]
        if all(k is None for k in keeps):
            out.append(full[i])
            continue
        any_keep = True
        if any(k != keeps[0] for k in keeps):
            raise EdgeqError(None, f"layer {i}: the plan's keep differs between {', '.join(names)} (one width per MLP)")
        k = keeps[0]
        if not isinstance(k, int) or not 0 < k <= full[i] or k % align[i]:
            raise EdgeqError(None, f"layer {i}: keep {k} must be a multiple of {align[i]} in 1..{full[i]} (the formats' "
                                   "blocks along the MLP's channels)")
        out.append(k)
    return out if any_keep else None
