"""fisher: how much each linear output channel's error costs at the logits (HAWQ / LQ-LoRA's Fisher weighting).

tr(ΔW·C·ΔWᵀ) counts every layer's output error alike, but an error in one
layer's output moves the final distribution more than the same error in
another's. To second order, the KL divergence a small output perturbation δy
causes is ½·E[(gᵀδy)²] with g = ∂(−log p(ŷ))/∂y and ŷ sampled from the model
itself (the Fisher information of the predictive distribution). With the
diagonal approximation and δy = ΔW·x independent of g,

    cost ≈ Σ_o F_o · (ΔW C ΔWᵀ)_oo,   F_o = E_t[g_{t,o}²]

which the sensitivity pass computes per output row. This pass runs the
calibration windows forward and backward once, in torch (a plan-time extra;
the runtime never needs it), through a small interpreter of the same IR nodes
as the numpy executor, and keeps F per linear weight (and, for a tied
embedding, the Fisher of its lookup output too).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import Graph
from edgeq.passes.base import Context, Pass
from edgeq.plan import Plan


def _torch():
    try:
        import torch
    except ImportError:
        raise EdgeqError(None, "Fisher-weighted costs need torch (pip install 'edgeq[search]')") from None
    return torch


def _forward(graph: Graph, tokens, weights: dict, torch, keep: dict):
    """The IR's decoder ops in torch (mirrors edgeq/executor.py); linear outputs are kept with their grads."""
    from edgeq.executor import rope_inv_freq

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
            out = args[0] @ args[1].T
            if len(args) > 2:
                out = out + args[2]
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


def output_fisher(graph: Graph, windows: list[list[int]], seed: int = 0,
                  progress: Callable | None = None) -> dict[str, np.ndarray]:
    """{weight: F per output channel} and {'lookup:<embedding>': F per embedding dimension}, mean over tokens."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    weights = {n: torch.from_numpy(np.array(t.numpy(), dtype=np.float32))     # (a writable copy)
               for n, t in graph.weights.items()}
    sums: dict[str, np.ndarray] = {}
    count = 0
    for w in (windows if progress is None else progress(windows, desc="fisher", unit="window")):
        keep: dict = {}
        logits = _forward(graph, w, weights, torch, keep)
        logp = torch.log_softmax(logits.double(), -1)
        with torch.no_grad():
            sampled = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
        (-logp.gather(1, sampled[:, None]).sum()).backward()
        for (kind, name), t in keep.items():
            key = name if kind == "linear" else f"lookup:{name}"
            g2 = t.grad.double().square().sum(0).numpy()
            sums[key] = g2 if key not in sums else sums[key] + g2
        count += len(w)
        del keep, logits, logp
    return {k: v / max(count, 1) for k, v in sums.items()}


class Fisher(Pass):
    """Analysis pass: ctx.analysis['fisher'] from the calibration windows (plan unchanged)."""

    name = "fisher"

    def __init__(self, n_windows: int = 2, ctx: int = 512):
        self.n_windows = n_windows
        self.ctx_len = ctx

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        from edgeq.passes.calibrate import calibration_tokens, calibration_windows

        tokens, bos, add_bos = calibration_tokens(graph)
        windows = calibration_windows(tokens, self.ctx_len, self.n_windows, bos, add_bos)
        ctx.analysis["fisher"] = output_fisher(graph, windows, progress=ctx.progress)
        ctx.record(self.name, windows=len(windows), ctx=self.ctx_len, weights=len(ctx.analysis["fisher"]))
        return graph, plan
