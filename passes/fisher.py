"""fisher: how much each linear output channel's error costs at the logits (HAWQ / LQ-LoRA's Fisher weighting).

tr(ΔW·C·ΔWᵀ) counts every layer's output error alike, but an error in one
layer's output moves the final distribution more than the same error in
another's. To second order, the KL divergence a small output perturbation δy
causes is ½·E[(gᵀδy)²] with g = ∂(−log p(ŷ))/∂y and ŷ sampled from the model
itself (the Fisher information of the predictive distribution). With the
diagonal approximation and δy = ΔW·x independent of g,

    cost ≈ Σ_o F_o · (ΔW C ΔWᵀ)_oo,   F_o = E_t[g_{t,o}²]

which the sensitivity pass computes per output row.

That factorisation E_t[g²_{t,o}·(Δw_o·x_t)²] ≈ E_t[g²_{t,o}]·E_t[(Δw_o·x_t)²]
fails where the tokens with large inputs are not the tokens whose outputs
matter: measured on SmolLM2 (bench/results/additivity_groups.json), it
overstates ffn_down's KLD 2.5-3.1x (q3_k, q4_0) and mis-ranks random plans. So by default
(`token_weighted`) each token is also weighted by its share of the output's
gradient energy, a_t = Σ_o g²_{t,o} / mean_t(Σ_o g²_{t,o}), i.e. g² ≈ F_o·a_t
(rank one over tokens × channels) and

    cost ≈ Σ_o F_o · (ΔW C_F ΔWᵀ)_oo,   C_F = Σ_t a_t x_t x_tᵀ / Σ_t a_t

(likewise each embedding row's lookup error is weighted by its tokens' mean
a_t). This pass runs the calibration windows forward through edgeq's own
numpy executor (its observers record every node's inputs) and backward
through the same ops by hand, so the compiler's main install needs no torch
for its best cost; it keeps F per linear weight (and, for a tied embedding,
the Fisher of its lookup output too), plus C_F per linear weight and the
per-token lookup weights. Only gradients with respect to activations are
formed, never with respect to weights.

Memory: the statistics are streamed (`FisherSource.stream`), so a plan holds about one layer of them and of
the weights, however big the model. The graph is cut where a single value (the residual stream) is live; the
forward keeps only those values per window, then the segments are walked from the top down: each is
recomputed from its stored input for every window, differentiated, and its weights' statistics are final
and handed on (to the sensitivity pass) before the next segment down is touched. The computation is the
same as one forward and backward per window (the same ops in the same order, the same sampled tokens).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import OPS, Executor, attention_probs, rope_inv_freq
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.importers.calibration_text import CalibrationText
from edgeq.passes.base import Context, Pass
from edgeq.passes.calibrate import calibration_tokens, calibration_windows
from edgeq.passes.calibrate_replay import segments


def _sample(logits: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ŷ sampled from the model's own distribution per position, ∂(−Σ_t log p(ŷ_t))/∂logits), in float64."""
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    u = rng.random(len(p))
    sampled = np.minimum((np.cumsum(p, -1) < u[:, None]).sum(-1), p.shape[1] - 1)
    grad = p
    grad[np.arange(len(p)), sampled] -= 1.0
    return sampled, grad


class _Tape:
    """The inputs of every node of one forward pass, recorded through the executor's observers, so that the
    backward pass differentiates exactly the forward the rest of edgeq computes (edgeq/core/executor.py)."""

    def __init__(self, graph: Graph, edits: dict[str, Callable] | None = None):
        self.graph = graph
        self.args: dict[int, list] = {}
        index = {id(n): i for i, n in enumerate(graph.nodes)}

        def record(node, args):
            self.args[index[id(node)]] = list(args)

        self.executor = Executor(graph, observers={op: record for op in {n.op for n in graph.nodes}}, edits=edits)

    def forward(self, tokens) -> np.ndarray:
        self.args.clear()
        return self.executor.logits(tokens)


def _rope_backward(node, dy: np.ndarray, positions: np.ndarray, freq_factors) -> np.ndarray:
    a = node.attrs
    inv = rope_inv_freq(a, freq_factors)
    ang = positions.astype(np.float64)[:, None] * inv[None, :]
    c, s = np.cos(ang).astype(np.float32)[:, None, :], np.sin(ang).astype(np.float32)[:, None, :]
    d = a["head_dim"]
    gh = dy.reshape(len(positions), a["n_heads"], d)
    g1, g2 = gh[..., : d // 2], gh[..., d // 2:]
    return np.concatenate([g1 * c + g2 * s, g2 * c - g1 * s], axis=-1).reshape(dy.shape)


def _attention_backward(node, dy: np.ndarray, q, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Causal GQA attention's input gradients, one head at a time (probabilities recomputed, not stored)."""
    a = node.attrs
    seq, d, nh, nkv = q.shape[0], a["head_dim"], a["n_heads"], a["n_kv_heads"]
    rep = nh // nkv
    scale = np.float32(1.0 / np.sqrt(d))
    mask = np.triu(np.full((seq, seq), -np.inf, dtype=np.float32), k=1) if a.get("causal", True) else None
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for h in range(nh):
        g = h // rep
        qh, kh, vh = q[:, h * d:(h + 1) * d], k[:, g * d:(g + 1) * d], v[:, g * d:(g + 1) * d]
        s = attention_probs(qh, kh, scale, mask)
        do = dy[:, h * d:(h + 1) * d]
        dv[:, g * d:(g + 1) * d] += s.T @ do
        dp = do @ vh.T
        ds = s * (dp - np.sum(dp * s, -1, keepdims=True)) * scale
        dq[:, h * d:(h + 1) * d] = ds @ kh
        dk[:, g * d:(g + 1) * d] += ds.T @ qh
    return dq, dk, dv


def backward(tape: _Tape, tokens, dlogits: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({linear weight: ∂loss/∂its output (seq, out)}, {embedding: ∂loss/∂its lookup (seq, dim)}) for the loss
    whose gradient at the logits is `dlogits` (float32 throughout, as the forward)."""
    grads = {tape.graph.outputs[0].name: dlogits.astype(np.float32)}
    return _backward_nodes(tape.graph, 0, len(tape.graph.nodes), tape.args, grads, np.arange(len(tokens)),
                           tape.executor)


def _backward_nodes(graph: Graph, lo: int, hi: int, args_of: dict[int, list], grads: dict[str, np.ndarray],
                    positions: np.ndarray, ex: Executor) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Backward through nodes [lo, hi) given their recorded inputs; `grads` holds the gradients of the values
    they produce and is left holding those of the values they read from before `lo`."""
    linear: dict[str, np.ndarray] = {}
    lookup: dict[str, np.ndarray] = {}

    def add(name: str, g: np.ndarray) -> None:
        if name in graph.weights or name in ("tokens", "positions"):
            return
        grads[name] = g if name not in grads else grads[name] + g

    for i in range(hi - 1, lo - 1, -1):
        node = graph.nodes[i]
        dy = grads.pop(node.outputs[0], None)
        if dy is None:
            continue
        args = args_of[i]
        if node.op == "linear":
            linear[node.inputs[1]] = dy
            add(node.inputs[0], dy @ args[1])
        elif node.op == "embedding":
            lookup[node.inputs[1]] = dy
        elif node.op == "add":
            add(node.inputs[0], dy)
            add(node.inputs[1], dy)
        elif node.op == "rms_norm":
            x, w = args
            r = 1.0 / np.sqrt(np.mean(np.square(x, dtype=np.float64), -1, keepdims=True) + node.attrs["eps"])
            u = dy.astype(np.float64) * w
            add(node.inputs[0], (r * u - x * r ** 3 * np.mean(u * x, -1, keepdims=True)).astype(np.float32))
        elif node.op == "swiglu":
            g, u = args
            sig = np.float32(1.0) / (np.float32(1.0) + np.exp(-g))
            add(node.inputs[0], dy * u * sig * (np.float32(1.0) + g * (np.float32(1.0) - sig)))
            add(node.inputs[1], dy * g * sig)
        elif node.op == "rope":
            a = node.attrs
            factors = ex.weight(a["freq_factors"]) if a.get("freq_factors") else None
            add(node.inputs[0], _rope_backward(node, dy, positions, factors))
        elif node.op == "attention":
            for name, g in zip(node.inputs, _attention_backward(node, dy, *args)):
                add(name, g)
        else:
            raise EdgeqError(None, f"Fisher weighting does not know op {node.op!r}")
    return linear, lookup


FISHER_VERSION = 2      # of the statistics' definition: part of the sensitivity cache's key


def output_fisher(graph: Graph, windows: list[list[int]], seed: int = 0, progress: Callable | None = None,
                  token_weighted: bool = True) -> dict[str, np.ndarray]:
    """{weight: F per output channel} and {'lookup:<embedding>': F per embedding dimension}, mean over tokens;
    with `token_weighted`, also {'cov:<weight>': C_F} and {'lookup_tokens:<embedding>': mean a_t per token id,
    1 for ids the windows do not contain} (see the module docstring). All at once: `FisherSource.stream`
    gives the same a layer at a time."""
    return FisherSource(graph, windows, seed, token_weighted).collect(progress)


def token_weights(graph: Graph, windows: list[list[int]], seed: int = 0, batch: int = 4,
                  progress: Callable | None = None) -> dict[str, np.ndarray]:
    """{linear weight: a_t = Σ_o g²_{t,o} of its output per token of `windows`, in window order} (float64): how
    much each token's output error in that layer costs at the logits (see the module docstring), for weighting
    GPTQ's H. Windows go `batch` at a time, so the residual streams held stay a calibration's worth."""
    out: dict[str, list[np.ndarray]] = {}
    starts = range(0, len(windows), batch)
    for i in (starts if progress is None else progress(starts, desc="fisher token weights", unit="batch")):
        src = FisherSource(graph, windows[i:i + batch], seed + i, per_token=True)
        for part in src.stream():
            for key, a in part.items():
                if key.startswith("tokens:"):
                    out.setdefault(key.split(":", 1)[1], []).append(a)
    return {name: np.concatenate(parts) for name, parts in out.items()}


@dataclass
class FisherSource:
    """What the Fisher statistics are computed from; `stream()` computes them a segment at a time, so a
    consumer that uses each weight's statistics as they come holds one segment's worth."""

    graph: Graph
    windows: list[list[int]]
    seed: int = 0
    token_weighted: bool = True
    per_token: bool = False         # hand out each linear's a_t per token instead of C_F (token_weights)

    def key(self) -> str:
        """Identifies the statistics (with the source model's digest, which the consumer adds)."""
        return hashlib.sha256(json.dumps([FISHER_VERSION, self.windows, self.seed, self.token_weighted],
                                         default=int).encode()).hexdigest()

    def linear_weights(self) -> list[str]:
        return list(dict.fromkeys(n.inputs[1] for n in self.graph.nodes if n.op == "linear"))

    def collect(self, progress: Callable | None = None) -> dict[str, np.ndarray]:
        """Every weight's statistics at once (benchmarks and tests; a plan streams them)."""
        out: dict[str, np.ndarray] = {}
        for part in self.stream(progress):
            out.update(part)
        return out

    def stream(self, progress: Callable | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Dicts of output_fisher's entries, each holding every entry of some weights, top layer first."""
        graph, windows = self.graph, self.windows
        rng = np.random.default_rng(self.seed)
        ex = Executor(graph, cache_weights=False)
        segs = segments(graph)
        count = max(sum(len(w) for w in windows), 1)
        envs = [{"tokens": np.asarray(w, dtype=np.int64), "positions": np.arange(len(w)),
                 "token_types": np.zeros(len(w), dtype=np.int64)} for w in windows]
        # the lowest segment that reads each weight: its statistics are final once that segment is done
        lowest: dict[str, int] = {}
        for k, (lo, hi, _) in enumerate(segs):
            for node in graph.nodes[lo:hi]:
                if node.op in ("linear", "embedding"):
                    lowest.setdefault(node.inputs[1], k)
        bounds = self._forward(ex, segs, envs)
        dys: list[dict[str, np.ndarray]] = [{} for _ in windows]
        stats = _Stats(graph, count, self.token_weighted, self.per_token)
        order = range(len(segs) - 1, -1, -1)
        for k in (order if progress is None else progress(order, desc="fisher", unit="segment")):
            lo, hi, entry = segs[k]
            weights = self._load(ex, lo, hi)
            for w, tokens in enumerate(windows):
                env = {key: envs[w][key] for key in ("tokens", "positions", "token_types")}
                if entry is not None:
                    env[entry] = bounds[k][w]
                args_of = self._recompute(ex, lo, hi, env, weights)
                if hi == len(graph.nodes):          # the top: sample ŷ and start the backward at the logits
                    _, dlogits = _sample(env[graph.outputs[0].name], rng)
                    dys[w] = {graph.outputs[0].name: dlogits.astype(np.float32)}
                    del dlogits
                linear, lookup = _backward_nodes(graph, lo, hi, args_of, dys[w], envs[w]["positions"], ex)
                stats.add(linear, lookup, args_of, graph.nodes, tokens)
                del args_of, env, linear, lookup
            bounds[k] = None
            del weights
            done = [n for n, lk in lowest.items() if lk == k]
            if done:
                yield stats.finish(done)

    def _forward(self, ex: Executor, segs, envs) -> list[list[np.ndarray] | None]:
        """The value live on entry to each segment, per window (node by node over all windows, each weight
        loaded once and dropped, as the streaming executor runs)."""
        nodes = self.graph.nodes
        last_use: dict[str, int] = {}
        for i, n in enumerate(nodes):
            for v in n.inputs:
                last_use[v] = i
        entry_at = {lo: v for lo, _, v in segs if v is not None}
        bounds: list[list[np.ndarray] | None] = [None] * len(segs)
        seg_of = {lo: k for k, (lo, _, _) in enumerate(segs)}
        top = segs[-1][0]
        fed = {"tokens", "positions", "token_types"}
        for i, node in enumerate(nodes[:top]):
            if i in entry_at:
                bounds[seg_of[i]] = [env[entry_at[i]] for env in envs]
            weights = {n: ex.weight(n) for n in node.inputs if n in self.graph.weights}
            for env in envs:
                args = [env[n] if n in env else weights[n] for n in node.inputs]
                env[node.outputs[0]] = OPS[node.op](ex, node, args)
                for n in node.inputs:
                    if last_use.get(n) == i and n in env and n not in fed:
                        del env[n]
            del weights
        if top in entry_at:
            bounds[seg_of[top]] = [env[entry_at[top]] for env in envs]
        for env in envs:                           # what is left is the top segment's entry, kept in bounds
            for n in [n for n in env if n not in fed]:
                del env[n]
        return bounds

    def _load(self, ex: Executor, lo: int, hi: int) -> dict[str, np.ndarray]:
        return {n: ex.weight(n) for node in self.graph.nodes[lo:hi] for n in node.inputs if n in self.graph.weights}

    def _recompute(self, ex: Executor, lo: int, hi: int, env: dict, weights: dict) -> dict[int, list]:
        """Run nodes [lo, hi) in `env`; the inputs of each, for the backward."""
        args_of = {}
        for i in range(lo, hi):
            node = self.graph.nodes[i]
            args = [env[n] if n in env else weights[n] for n in node.inputs]
            args_of[i] = args
            env[node.outputs[0]] = OPS[node.op](ex, node, args)
        return args_of


class _Stats:
    """The sums behind output_fisher's entries, accumulated window by window (in window order, as one full
    backward per window would) and handed out per weight once final."""

    def __init__(self, graph: Graph, count: int, token_weighted: bool, per_token: bool = False):
        self.graph, self.count, self.token_weighted, self.per_token = graph, count, token_weighted, per_token
        self.tokens: dict[str, list[np.ndarray]] = {}      # per linear: a_t of each window (per_token only)
        self.sums: dict[str, np.ndarray] = {}
        self.outer: dict[str, np.ndarray] = {}      # Σ_t a_t x_t x_tᵀ with unnormalised a_t
        self.a_sum: dict[str, float] = {}
        self.tok_a: dict[str, tuple[np.ndarray, np.ndarray]] = {}      # per id: Σ a_t, occurrences

    def add(self, linear: dict, lookup: dict, args_of: dict[int, list], nodes, tokens) -> None:
        inputs = {nodes[i].inputs[1]: args[0] for i, args in args_of.items() if nodes[i].op == "linear"}
        grads = {**linear, **{f"lookup:{k}": v for k, v in lookup.items()}}
        for key, g in grads.items():
            g2t = np.square(g, dtype=np.float64)
            self.sums[key] = g2t.sum(0) if key not in self.sums else self.sums[key] + g2t.sum(0)
            if not self.token_weighted:
                continue
            a = g2t.sum(1)
            self.a_sum[key] = self.a_sum.get(key, 0.0) + float(a.sum())
            if key in linear and self.per_token:
                self.tokens.setdefault(key, []).append(a)
            elif key in linear:
                # float32 BLAS and a float32 sum: one (width x width) matrix per weight of the segment is what
                # is held; windows' sums lose nothing that matters to a cost
                x = inputs[key]
                o = (x * a.astype(np.float32)[:, None]).T @ x
                if key in self.outer:
                    self.outer[key] += o
                else:
                    self.outer[key] = o
            else:
                name = key.split(":", 1)[1]
                ids = np.asarray(tokens)
                rows = self.graph.weights[name].shape[0]
                s_a, n_a = self.tok_a.get(key, (np.zeros(rows), np.zeros(rows)))
                np.add.at(s_a, ids, a)
                np.add.at(n_a, ids, 1.0)
                self.tok_a[key] = (s_a, n_a)

    def finish(self, names: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name in names:
            if name in self.tokens:
                out[f"tokens:{name}"] = np.concatenate(self.tokens.pop(name))
            for key in (name, f"lookup:{name}"):
                if key in self.sums:
                    out[key] = self.sums.pop(key) / self.count
                if key in self.outer:
                    o = self.outer.pop(key)
                    o /= np.float32(max(self.a_sum[key], 1e-30))
                    out[f"cov:{key}"] = o
                if key in self.tok_a:
                    s_a, n_a = self.tok_a.pop(key)
                    mean_a = self.a_sum[key] / self.count
                    rel = np.ones_like(s_a)
                    seen = n_a > 0
                    rel[seen] = s_a[seen] / n_a[seen] / max(mean_a, 1e-300)
                    out[f"lookup_tokens:{name}"] = rel
                self.a_sum.pop(key, None)
        return out


class Fisher(Pass):
    """Analysis pass: ctx.analysis['fisher'], a FisherSource over the calibration windows (plan unchanged)."""

    name = "fisher"

    def __init__(self, n_windows: int = 2, ctx: int = 512, token_weighted: bool = True,
                 source: CalibrationText | None = None):
        self.source = source
        self.n_windows = n_windows
        self.ctx_len = ctx
        self.token_weighted = token_weighted

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        tokens, bos, add_bos = calibration_tokens(graph, self.source)
        windows = calibration_windows(tokens, self.ctx_len, self.n_windows, bos, add_bos, self.source)
        # computed as the sensitivity pass consumes it, a segment at a time (or not at all when its costs are
        # cached)
        src = ctx.analysis["fisher"] = FisherSource(graph, windows, token_weighted=self.token_weighted)
        text = {} if self.source is None or self.source.is_default else self.source.record()
        ctx.record(self.name, windows=len(windows), ctx=self.ctx_len, token_weighted=self.token_weighted,
                   weights=len(src.linear_weights()), **text)
        return graph, plan
