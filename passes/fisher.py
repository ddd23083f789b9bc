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
a_t). This pass runs the calibration windows forward and backward once, in
torch (a plan-time extra; the runtime never needs it), through a small
interpreter of the same IR nodes as the numpy executor, and keeps F per
linear weight (and, for a tied embedding, the Fisher of its lookup output
too), plus C_F per linear weight and the per-token lookup weights.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import rope_inv_freq
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.importers.calibration_text import CalibrationText
from edgeq.passes.base import Context, Pass
from edgeq.passes.calibrate import calibration_tokens, calibration_windows


def require_torch(what: str = "Fisher-weighted costs"):
    try:
        import torch
    except ImportError:
        raise EdgeqError(None, f"{what} need torch (pip install 'edgeq[search]')") from None
    return torch


def torch_forward(graph: Graph, tokens, weights: dict, torch, keep: dict, edit: dict[str, Callable] | None = None):
    """The IR's decoder ops in torch (mirrors edgeq/core/executor.py); linear outputs are kept with their grads.
    `edit`: {weight: f(x, out) -> out} changes a linear's output (bench/fisher_attention.py perturbs it)."""
    env = {"tokens": torch.as_tensor(tokens), "positions": torch.arange(len(tokens))}
    for node in graph.nodes:
        args = [env[i] if i in env else weights[i] for i in node.inputs]
        a = node.attrs
        if node.op == "embedding":
            # a leaf that requires grad: everything downstream carries gradients, no weight gradient is formed
            out = args[1][args[0]].detach().requires_grad_(torch.is_grad_enabled())
            keep[("lookup", node.inputs[1])] = out
        elif node.op == "rms_norm":
            x, w = args
            out = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + a["eps"]) * w
        elif node.op == "linear":
            keep[("input", node.inputs[1])] = args[0]
            out = args[0] @ args[1].T
            if len(args) > 2:
                out = out + args[2]
            if edit and node.inputs[1] in edit:
                out = edit[node.inputs[1]](args[0], out)
            if out.requires_grad:
                out.retain_grad()
            keep[("linear", node.inputs[1])] = out
        elif node.op == "add":
            out = args[0] + args[1]
        elif node.op == "swiglu":
            out = torch.nn.functional.silu(args[0]) * args[1]
        elif node.op == "rope":
            factors = weights[a["freq_factors"]].numpy() if a.get("freq_factors") else None
            inv = torch.from_numpy(rope_inv_freq(a, factors))
            ang = env["positions"].double()[:, None] * inv[None, :]
            cos, sin = ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]
            d = a["head_dim"]
            xh = args[0].reshape(len(tokens), a["n_heads"], d)
            x1, x2 = xh[..., : d // 2], xh[..., d // 2:]
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(len(tokens), -1)
        elif node.op == "attention":
            q, k, v = args
            seq, d, nh, nkv = q.shape[0], a["head_dim"], a["n_heads"], a["n_kv_heads"]
            qh = q.reshape(seq, nh, d).transpose(0, 1)
            kh = k.reshape(seq, nkv, d).transpose(0, 1).repeat_interleave(nh // nkv, 0)
            vh = v.reshape(seq, nkv, d).transpose(0, 1).repeat_interleave(nh // nkv, 0)
            out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=a.get("causal", True))
            out = out.transpose(0, 1).reshape(seq, nh * d)
        else:
            raise EdgeqError(None, f"Fisher weighting does not know op {node.op!r}")
        env[node.outputs[0]] = out
    return env[graph.outputs[0].name]


def output_fisher(graph: Graph, windows: list[list[int]], seed: int = 0, progress: Callable | None = None,
                  token_weighted: bool = True) -> dict[str, np.ndarray]:
    """{weight: F per output channel} and {'lookup:<embedding>': F per embedding dimension}, mean over tokens;
    with `token_weighted`, also {'cov:<weight>': C_F} and {'lookup_tokens:<embedding>': mean a_t per token id,
    1 for ids the windows do not contain} (see the module docstring)."""
    torch = require_torch()
    gen = torch.Generator().manual_seed(seed)
    weights = {n: torch.from_numpy(np.array(t.numpy(), dtype=np.float32))     # (a writable copy)
               for n, t in graph.weights.items()}
    sums: dict[str, np.ndarray] = {}
    outer: dict[str, np.ndarray] = {}           # Σ_t a_t x_t x_tᵀ with unnormalised a_t, and Σ_t a_t
    a_sum: dict[str, float] = {}
    tok_a: dict[str, tuple[np.ndarray, np.ndarray]] = {}      # per id: Σ a_t, occurrences
    count = 0
    for w in (windows if progress is None else progress(windows, desc="fisher", unit="window")):
        keep: dict = {}
        logits = torch_forward(graph, w, weights, torch, keep)
        logp = torch.log_softmax(logits.double(), -1)
        with torch.no_grad():
            sampled = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
        (-logp.gather(1, sampled[:, None]).sum()).backward()
        for (kind, name), t in keep.items():
            if kind == "input":
                continue
            key = name if kind == "linear" else f"lookup:{name}"
            g2t = t.grad.double().square()
            g2 = g2t.sum(0).numpy()
            sums[key] = g2 if key not in sums else sums[key] + g2
            if not token_weighted:
                continue
            a = g2t.sum(1)
            a_sum[key] = a_sum.get(key, 0.0) + float(a.sum())
            if kind == "linear":
                x = keep[("input", name)].detach().double()
                o = ((x * a[:, None]).T @ x).numpy()
                outer[key] = o if key not in outer else outer[key] + o
            else:
                ids = np.asarray(w)
                s_a, n_a = tok_a.get(key, (np.zeros(weights[name].shape[0]), np.zeros(weights[name].shape[0])))
                np.add.at(s_a, ids, a.numpy())
                np.add.at(n_a, ids, 1.0)
                tok_a[key] = (s_a, n_a)
        count += len(w)
        del keep, logits, logp
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
