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
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor, rope_inv_freq
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.importers.calibration_text import CalibrationText
from edgeq.passes.base import Context, Pass
from edgeq.passes.calibrate import calibration_tokens, calibration_windows


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
        s = (qh @ kh.T) * scale
        if mask is not None:
            s += mask
        s -= s.max(-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(-1, keepdims=True)
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
    graph = tape.graph
    grads: dict[str, np.ndarray] = {graph.outputs[0].name: dlogits.astype(np.float32)}
    linear: dict[str, np.ndarray] = {}
    lookup: dict[str, np.ndarray] = {}
    positions = np.arange(len(tokens))

    def add(name: str, g: np.ndarray) -> None:
        if name in graph.weights or name in ("tokens", "positions"):
            return
        grads[name] = g if name not in grads else grads[name] + g

    for i in range(len(graph.nodes) - 1, -1, -1):
        node = graph.nodes[i]
        dy = grads.pop(node.outputs[0], None)
        if dy is None:
            continue
        args = tape.args[i]
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
            factors = tape.executor.weight(a["freq_factors"]) if a.get("freq_factors") else None
            add(node.inputs[0], _rope_backward(node, dy, positions, factors))
        elif node.op == "attention":
            for name, g in zip(node.inputs, _attention_backward(node, dy, *args)):
                add(name, g)
        else:
            raise EdgeqError(None, f"Fisher weighting does not know op {node.op!r}")
    return linear, lookup


def output_fisher(graph: Graph, windows: list[list[int]], seed: int = 0, progress: Callable | None = None,
                  token_weighted: bool = True) -> dict[str, np.ndarray]:
    """{weight: F per output channel} and {'lookup:<embedding>': F per embedding dimension}, mean over tokens;
    with `token_weighted`, also {'cov:<weight>': C_F} and {'lookup_tokens:<embedding>': mean a_t per token id,
    1 for ids the windows do not contain} (see the module docstring)."""
    rng = np.random.default_rng(seed)
    tape = _Tape(graph)
    sums: dict[str, np.ndarray] = {}
    outer: dict[str, np.ndarray] = {}           # Σ_t a_t x_t x_tᵀ with unnormalised a_t, and Σ_t a_t
    a_sum: dict[str, float] = {}
    tok_a: dict[str, tuple[np.ndarray, np.ndarray]] = {}      # per id: Σ a_t, occurrences
    inputs = {n.inputs[1]: i for i, n in enumerate(graph.nodes) if n.op == "linear"}
    count = 0
    for w in (windows if progress is None else progress(windows, desc="fisher", unit="window")):
        _, dlogits = _sample(tape.forward(w), rng)
        linear, lookup = backward(tape, w, dlogits)
        grads = {**linear, **{f"lookup:{k}": v for k, v in lookup.items()}}
        for key, g in grads.items():
            g2t = np.square(g, dtype=np.float64)
            sums[key] = g2t.sum(0) if key not in sums else sums[key] + g2t.sum(0)
            if not token_weighted:
                continue
            a = g2t.sum(1)
            a_sum[key] = a_sum.get(key, 0.0) + float(a.sum())
            if key in linear:
                x = tape.args[inputs[key]][0].astype(np.float64)
                o = (x * a[:, None]).T @ x
                outer[key] = o if key not in outer else outer[key] + o
            else:
                name = key.split(":", 1)[1]
                ids = np.asarray(w)
                rows = graph.weights[name].shape[0]
                s_a, n_a = tok_a.get(key, (np.zeros(rows), np.zeros(rows)))
                np.add.at(s_a, ids, a)
                np.add.at(n_a, ids, 1.0)
                tok_a[key] = (s_a, n_a)
        count += len(w)
        del linear, lookup, grads, dlogits
    tape.args.clear()
    out = {k: v / max(count, 1) for k, v in sums.items()}
    for key, o in outer.items():
        out[f"cov:{key}"] = (o / max(a_sum[key], 1e-300)).astype(np.float32)
    for key, (s_a, n_a) in tok_a.items():
        mean_a = a_sum[key] / max(count, 1)
        rel = np.ones_like(s_a)
        seen = n_a > 0
        rel[seen] = s_a[seen] / n_a[seen] / max(mean_a, 1e-300)
        out[f"lookup_tokens:{key.split(':', 1)[1]}"] = rel
    return out


class Fisher(Pass):
    """Analysis pass: ctx.analysis['fisher'] from the calibration windows (plan unchanged)."""

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
        ctx.analysis["fisher"] = output_fisher(graph, windows, progress=ctx.progress,
                                               token_weighted=self.token_weighted)
        text = {} if self.source is None or self.source.is_default else self.source.record()
        ctx.record(self.name, windows=len(windows), ctx=self.ctx_len, token_weighted=self.token_weighted,
                   weights=sum(1 for k in ctx.analysis["fisher"] if ":" not in k), **text)
        return graph, plan
