"""The IR's decoder ops in torch, for the passes that train (UniQL recovery's masked LoRA) and as the autograd
oracle the numpy Fisher backward (passes/fisher.py) is tested against. torch is a plan-time extra; nothing that
edgeq needs by default imports this module.
"""

from __future__ import annotations

from typing import Callable

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import rope_inv_freq
from edgeq.core.ir import Graph


def require_torch(what: str):
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
        if node.op == "embedding":
            # a leaf that requires grad: everything downstream carries gradients, no weight gradient is formed
            out = args[1][args[0]].detach().requires_grad_(torch.is_grad_enabled())
            keep[("lookup", node.inputs[1])] = out
        elif node.op == "linear":
            keep[("input", node.inputs[1])] = args[0]
            out = torch_node(node, args, env["positions"], weights, torch)
            if edit and node.inputs[1] in edit:
                out = edit[node.inputs[1]](args[0], out)
            if out.requires_grad:
                out.retain_grad()
            keep[("linear", node.inputs[1])] = out
        else:
            out = torch_node(node, args, env["positions"], weights, torch)
        env[node.outputs[0]] = out
    return env[graph.outputs[0].name]


def torch_node(node, args: list, positions, weights: dict, torch):
    """One IR node in torch: `args` its inputs (values and weights), `positions` the tokens' positions. Separate
    from the graph walk so that a caller can run the nodes across many windows at once (bench/uniql_orders.py
    computes each layer's channel order between its MLP's input and its down projection)."""
    a = node.attrs
    if node.op == "embedding":
        return args[1][args[0]]
    if node.op == "rms_norm":
        x, w = args
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + a["eps"]) * w
    if node.op == "linear":
        out = args[0] @ args[1].T
        return out + args[2] if len(args) > 2 else out
    if node.op == "add":
        return args[0] + args[1]
    if node.op == "swiglu":
        return torch.nn.functional.silu(args[0]) * args[1]
    if node.op == "rope":
        factors = weights[a["freq_factors"]].numpy() if a.get("freq_factors") else None
        inv = torch.from_numpy(rope_inv_freq(a, factors))
        ang = positions.double()[:, None] * inv[None, :]
        cos, sin = ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]
        d, seq = a["head_dim"], len(positions)
        xh = args[0].reshape(seq, a["n_heads"], d)
        x1, x2 = xh[..., : d // 2], xh[..., d // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(seq, -1)
    if node.op == "attention":
        q, k, v = args
        seq, d, nh, nkv = q.shape[0], a["head_dim"], a["n_heads"], a["n_kv_heads"]
        qh = q.reshape(seq, nh, d).transpose(0, 1)
        kh = k.reshape(seq, nkv, d).transpose(0, 1).repeat_interleave(nh // nkv, 0)
        vh = v.reshape(seq, nkv, d).transpose(0, 1).repeat_interleave(nh // nkv, 0)
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=a.get("causal", True))
        return out.transpose(0, 1).reshape(seq, nh * d)
    raise EdgeqError(None, f"the torch interpreter does not know op {node.op!r}")
