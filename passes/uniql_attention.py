"""uniql_attention: sort every attention layer's head dimensions so that every prefix is a good narrower attention
(UniQL, `--prune-attention`).

Q/K. A head's score is Σ_j q_j·k_j over its dimensions; with RoPE, dimensions j and j + d/2 (HF's rotate-half layout,
the IR's) rotate together by one angle, so a pair is the unit: its contribution q_p·k_p is bounded by ‖q_p‖·‖k_p‖,
and the rotation keeps both norms. Each KV group's pairs are ranked by ‖k_p‖·Σ_h ‖q_{h,p}‖ (the K head and every Q
head that reads it; one order for the group, since the group's queries all meet the same keys), the norms being the
root mean square of the projections' outputs on the calibration text (√(wᵀCw) with C = E[xxᵀ] of the attention
input; the weights' own row norms without calibration). The rope nodes learn which source pair each stored pair is,
so every pair keeps its frequency: a runtime needs per-layer, per-group frequency tables (why GGUF cannot carry it:
llama.cpp's llama architecture has one head size, one RoPE dimension count and one `rope_freqs` tensor for all
layers, and asserts key, value and RoPE widths equal).

V/O. Attention is linear in V: for an orthogonal U_g per KV group, V rows U_gᵀ·W_V[g] and O columns W_O[:, h]·U_g
for every head h of the group give the same output. U_g are the left singular vectors of W_V[g]·C^½ (the
eigenvectors of W_V[g]·C·W_V[g]ᵀ, computed so), by decreasing singular value: a prefix of the stored V dimensions
keeps most of the value vectors' energy on the calibration inputs. The singular values stay on the V side (V rows
U_gᵀ·W_V[g]) and O is only rotated, so O's columns keep their source scale and quantize as well as before (the
quantization-aware choice of UniQL: putting S on O would spread the values' range over O's blocks).

The output is unchanged at full width (the sorted model is the source's, up to float rounding); the output
projection's input statistics (its importance matrix) are rotated with it.
"""

from __future__ import annotations

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.models import llama
from edgeq.passes.base import Context, Pass


def pair_order(q: np.ndarray, k: np.ndarray, cov: np.ndarray | None, n_heads: int, n_kv: int,
               q_bias: np.ndarray | None = None, k_bias: np.ndarray | None = None) -> np.ndarray:
    """(n_kv, d/2): each KV group's rotation pairs, best first (ties in source order)."""
    def rms(w: np.ndarray, b: np.ndarray | None, heads: int) -> np.ndarray:     # (heads, d/2) pair norms
        w = w.astype(np.float64)
        e = np.einsum("ij,ij->i", w @ cov, w) if cov is not None else np.einsum("ij,ij->i", w, w)
        if b is not None:
            e = e + b.astype(np.float64) ** 2
        e = np.maximum(e, 0.0).reshape(heads, 2, -1)
        return np.sqrt(e.sum(axis=1))

    qn, kn = rms(q, q_bias, n_heads), rms(k, k_bias, n_kv)
    score = kn * qn.reshape(n_kv, n_heads // n_kv, -1).sum(axis=1)
    return np.stack([np.argsort(-s, kind="stable") for s in score])


def value_rotation(v: np.ndarray, cov: np.ndarray | None, n_kv: int, v_bias: np.ndarray | None = None) -> np.ndarray:
    """(n_kv, d, d): per KV group, the left singular vectors of W_V[g]·C^½ by decreasing singular value, each
    column's largest entry positive (a deterministic sign)."""
    w = v.astype(np.float64).reshape(n_kv, -1, v.shape[1])
    out = []
    for g in range(n_kv):
        m = w[g] @ cov @ w[g].T if cov is not None else w[g] @ w[g].T
        if v_bias is not None:
            b = v_bias.astype(np.float64).reshape(n_kv, -1)[g]
            m = m + np.outer(b, b)
        vals, vecs = np.linalg.eigh((m + m.T) / 2)
        u = vecs[:, np.argsort(-vals, kind="stable")]
        sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
        out.append(u * np.where(sign == 0, 1.0, sign))
    return np.stack(out)


class UniqlAttention(Pass):
    """Sorts every layer's Q/K pairs and rotates its V/O (the graph the target lowers changes; its output does not).
    ctx.analysis["attention_sorted"] says the table should carry attention widths."""

    name = "uniql_attention"

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        cfg = graph.config
        if cfg.head_dim % 2:
            raise EdgeqError(None, f"--prune-attention needs an even head size (RoPE pairs), not {cfg.head_dim}")
        cal = ctx.analysis.get("calibration")
        pairs, rotations, o_maps = {}, {}, {}
        layers = range(cfg.n_layers)
        for i in (ctx.progress(layers, desc="sort attention", unit="layer") if ctx.progress is not None else layers):
            q, k, v, o = llama.attention_weights(i)
            stats = cal.stats(q) if cal is not None else None
            cov = None if stats is None else stats.full()
            if cal is not None and cov is None:
                raise EdgeqError(None, f"{q}: --prune-attention needs the full covariance of the attention input "
                                       "(calibration with full statistics; an --imatrix file has only their diagonal)")
            bias = lambda n: (graph.weights[n.removesuffix("weight") + "bias"].numpy()     # noqa: E731
                              if cfg.attention_bias else None)
            pairs[i] = pair_order(graph.weights[q].numpy(), graph.weights[k].numpy(), cov, cfg.n_heads,
                                  cfg.n_kv_heads, bias(q), bias(k))
            rotations[i] = value_rotation(graph.weights[v].numpy(), cov, cfg.n_kv_heads, bias(v))
            if cal is not None and cal.stats(o) is not None:
                rep = cfg.n_heads // cfg.n_kv_heads
                o_maps[o] = _block_diag(np.repeat(rotations[i], rep, axis=0))
        if cal is not None and o_maps:
            ctx.analysis.setdefault("calibration_source", cal)
            ctx.analysis["calibration"] = cal.rotated(o_maps)
        ctx.analysis["attention_sorted"] = True
        ctx.record(self.name, layers=cfg.n_layers, calibrated=cal is not None)
        return llama.reshape_attention(graph, pairs, rotations), plan


def _block_diag(blocks: np.ndarray) -> np.ndarray:
    n, d, _ = blocks.shape
    out = np.zeros((n * d, n * d))
    for h in range(n):
        out[h * d:(h + 1) * d, h * d:(h + 1) * d] = blocks[h]
    return out
