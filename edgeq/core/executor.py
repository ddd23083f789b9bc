"""Reference executor: runs the IR in numpy, float32, with no backend involved.

It is the float reference every backend is measured against (fidelity in
`edgeq eval`, reference outputs stored in bundles) and what calibration runs
on, so it is written for clarity and exactness, not speed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgeq.core.ir import Graph, Node
from edgeq.models.llama import llama3_freq_factors

OpFn = Callable[["Executor", Node, list], np.ndarray]
OPS: dict[str, OpFn] = {}


def op(name: str):
    def register(fn: OpFn) -> OpFn:
        OPS[name] = fn
        return fn
    return register


class Executor:
    """Runs a graph in float32.

    With `cache_weights` (the default) every weight is loaded once and kept, for
    repeated calls. Without it the executor streams: each 2-D weight is loaded
    when a node needs it and dropped right after, so a run costs about one
    layer's weights in memory (1-D weights, which are tiny, are kept). `run_many`
    feeds several sequences through each node in turn, so a streamed run loads
    every weight once for all of them. Activations are dropped after their
    last use either way.

    `observers` lets passes (calibration, the Fisher pass's backward) see the
    inputs of every node by op, without the executor knowing about them;
    `edits` ({weight: f(x, out) -> out}) changes a linear layer's output, so a
    benchmark can perturb one layer and measure what a cost model missed.
    `before` ({op: f(node, envs)}) sees a node's inputs in every sequence before
    its weights are loaded, so a pass can decide a weight from the activations
    that reach it (sequential GPTQ quantizes each layer from the inputs its
    already-quantized predecessors produce). `run_paired` runs a second
    executor's graph (the float model) in step, and its `before` hooks see both
    runs' inputs, so a pass can also aim at what the float model computes.
    """

    def __init__(self, graph: Graph, observers: dict[str, Callable[[Node, list], None]] | None = None,
                 cache_weights: bool = True, edits: dict[str, Callable] | None = None,
                 before: dict[str, Callable[[Node, list[dict]], None]] | None = None):
        self.graph = graph
        self.before = before or {}
        self._weights: dict[str, np.ndarray] = {}
        self.observers = observers or {}
        self.cache_weights = cache_weights
        self.edits = edits or {}

    def weight(self, name: str) -> np.ndarray:
        w = self._weights.get(name)
        if w is None:
            tensor = self.graph.weights[name]
            w = tensor.numpy()
            if self.cache_weights or len(tensor.shape) < 2:
                self._weights[name] = w
        return w

    def run(self, tokens, outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray] | np.ndarray:
        return self.run_many([tokens], outputs)[0]

    def run_many(self, sequences, outputs: tuple[str, ...] = ("logits",)) -> list:
        """Each sequence on its own (no batching across them), every node applied to all of them in turn."""
        envs = self._run_envs(_token_envs(sequences), outputs)
        if outputs == ("logits",):
            return [env["logits"] for env in envs]
        return envs

    def run_paired(self, reference: "Executor", sequences, outputs: tuple[str, ...]) -> tuple[list, list]:
        """`run_many` of this graph and of `reference` (the same nodes, other weights) node by node in step:
        `before` hooks are called as f(node, envs, reference_envs). Returns (envs, reference_envs)."""
        envs, ref = _token_envs(sequences), _token_envs(sequences)
        return self._run_envs(envs, outputs, (reference, ref)), [{k: env[k] for k in outputs} for env in ref]

    def run_inputs(self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]:
        """Graphs fed by named arrays rather than tokens (CNNs: {"images": (batch, C, H, W) float32}); batch kept."""
        for v in self.graph.inputs:
            if v.name not in inputs:
                raise ValueError(f"missing input {v.name!r}")
            x = np.asarray(inputs[v.name])
            if x.ndim != len(v.shape) or any(isinstance(d, int) and d != s for d, s in zip(v.shape, x.shape)):
                raise ValueError(f"input {v.name!r} has shape {x.shape}; expected {v.shape}")
        env = {v.name: np.asarray(inputs[v.name], dtype=np.float32 if v.dtype == "f32" else None)
               for v in self.graph.inputs}
        return self._run_envs([env], outputs)[0]

    def _run_envs(self, envs: list[dict], outputs: tuple[str, ...],
                  paired: tuple["Executor", list[dict]] | None = None) -> list[dict[str, np.ndarray]]:
        # Nodes are in execution order: stop after the last one that produces a requested output.
        keep = set(outputs)
        last = max((i for i, n in enumerate(self.graph.nodes) if keep & set(n.outputs)), default=-1)
        if last < 0:
            raise ValueError(f"no node produces any of {sorted(keep)}")
        nodes = self.graph.nodes[:last + 1]
        last_use: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for name in node.inputs:
                last_use[name] = i
        fed = set(envs[0]) if envs else set()
        runs = [(self, envs)] + ([paired] if paired is not None else [])
        for i, node in enumerate(nodes):
            if node.op in self.before:
                self.before[node.op](node, envs, *([paired[1]] if paired is not None else []))
            for ex, group in runs:
                weights = {n: ex.weight(n) for n in node.inputs if n in ex.graph.weights}
                hook = self.observers.get(node.op) if ex is self else None
                for env in group:
                    args = [env[n] if n in env else weights[n] for n in node.inputs]
                    if hook is not None:
                        hook(node, args)
                    env[node.outputs[0]] = OPS[node.op](ex, node, args)
                    for n in node.inputs:
                        if last_use.get(n) == i and n in env and n not in keep and n not in fed:
                            del env[n]
                del weights
        return [{k: env[k] for k in outputs} for env in envs]

    def logits(self, tokens) -> np.ndarray:
        return self.run(tokens)

    def logits_many(self, sequences) -> list[np.ndarray]:
        return self.run_many(sequences)

    def embed(self, tokens) -> np.ndarray:
        """An encoder's sentence embedding for one tokenised sentence (special tokens included)."""
        return self.run(tokens, outputs=("embedding",))["embedding"]


def _token_envs(sequences) -> list[dict]:
    envs = []
    for tokens in sequences:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence")
        envs.append({"tokens": tokens, "positions": np.arange(tokens.size), "token_types": np.zeros_like(tokens)})
    return envs


@op("embedding")
def _embedding(ex, node, args):
    tokens, table = args
    if tokens.max(initial=0) >= table.shape[0] or tokens.min(initial=0) < 0:
        raise ValueError("token id out of range of the embedding table")
    return table[tokens]


@op("rms_norm")
def _rms_norm(ex, node, args):
    x, w = args
    var = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(var + np.float32(node.attrs["eps"]))) * w


@op("layer_norm")
def _layer_norm(ex, node, args):
    x, w, b = args
    mu = x.mean(-1, keepdims=True)
    var = np.mean(np.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + np.float32(node.attrs["eps"])) * w + b


@op("linear")
def _linear(ex, node, args):
    x, w = args[0], args[1]
    y = x @ w.T
    if len(args) > 2:
        y = y + args[2]
    edit = ex.edits.get(node.inputs[1])
    if edit is not None:
        y = edit(x, y)
    return y.astype(np.float32, copy=False)


@op("add")
def _add(ex, node, args):
    return args[0] + args[1]


@op("swiglu")
def _swiglu(ex, node, args):
    g, u = args
    return (g / (np.float32(1.0) + np.exp(-g))) * u


def rope_inv_freq(attrs: dict, freq_factors: np.ndarray | None) -> np.ndarray:
    d = attrs["head_dim"]
    inv = 1.0 / (attrs["theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = attrs.get("scaling")
    if scaling and scaling.get("type") == "linear":
        inv = inv / scaling["factor"]
    elif scaling and scaling.get("type") == "llama3":
        inv = inv / llama3_freq_factors(inv, scaling)
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float64)
    return inv


@op("rope")
def _rope(ex, node, args):
    """HF rotate-half RoPE on canonical (un-permuted) Q/K rows. `pairs` (attention pruning): which of the head's
    rotation pairs each stored pair is (their frequencies follow them); a narrowed head keeps a prefix of them."""
    x, pos = args
    a = node.attrs
    factors = ex.weight(a["freq_factors"]) if a.get("freq_factors") else None
    inv = rope_inv_freq(a, factors)
    seq = x.shape[0]
    d = x.shape[1] // a["n_heads"]
    if a.get("pairs") is not None:         # one order per KV group, shared by the group's query heads
        pairs = np.asarray(a["pairs"], dtype=np.int64)[:, : d // 2]
        inv = np.repeat(inv[pairs], a["n_heads"] // len(pairs), axis=0)          # (heads, d/2)
        ang = pos.astype(np.float64)[:, None, None] * inv[None]                  # (seq, heads, d/2)
        c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    else:
        ang = pos.astype(np.float64)[:, None] * inv[None, :]          # (seq, d/2)
        c, s = np.cos(ang).astype(np.float32)[:, None, :], np.sin(ang).astype(np.float32)[:, None, :]
    xh = x.reshape(seq, a["n_heads"], d)
    x1, x2 = xh[..., : d // 2], xh[..., d // 2:]
    out = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.reshape(seq, -1)


@op("attention")
def _attention(ex, node, args):
    """Causal GQA attention, one 2-D BLAS matmul per head (numpy's batched matmul is far slower)."""
    q, k, v = args
    a = node.attrs
    seq, nh, nkv = q.shape[0], a["n_heads"], a["n_kv_heads"]
    d, dv = q.shape[1] // nh, v.shape[1] // nkv      # pruned attention: narrower heads, the source's scale
    rep = nh // nkv
    scale = np.float32(1.0 / np.sqrt(a["head_dim"]))
    mask = np.triu(np.full((seq, seq), -np.inf, dtype=np.float32), k=1) if a.get("causal", True) else None
    out = np.empty((seq, nh * dv), dtype=np.float32)
    for h in range(nh):
        g = h // rep
        qh = q[:, h * d:(h + 1) * d]
        kh = k[:, g * d:(g + 1) * d]
        vh = v[:, g * dv:(g + 1) * dv]
        out[:, h * dv:(h + 1) * dv] = attention_probs(qh, kh, scale, mask) @ vh
    return out


def attention_probs(qh: np.ndarray, kh: np.ndarray, scale: np.float32, mask: np.ndarray | None) -> np.ndarray:
    """One head's softmax(q·kᵀ·scale + mask), in place in float32 (the Fisher backward recomputes it so)."""
    s = (qh @ kh.T) * scale
    if mask is not None:
        s += mask
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    return s


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - scipy is a dependency; keep the executor usable without it
        import math

        return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))
    return erf(x.astype(np.float64))


@op("gelu")
def _gelu(ex, node, args):
    """BERT's exact (erf) GELU, computed in float64 and rounded once."""
    x = args[0]
    return (0.5 * x.astype(np.float64) * (1.0 + _erf(x / np.sqrt(2.0)))).astype(np.float32)


@op("mean_pool")
def _mean_pool(ex, node, args):
    """Mean over the tokens of one unpadded sentence (sentence-transformers' mean pooling)."""
    return args[0].astype(np.float64).mean(0).astype(np.float32)


@op("l2_normalize")
def _l2_normalize(ex, node, args):
    x = args[0]
    n = np.sqrt(np.sum(np.square(x, dtype=np.float64), -1, keepdims=True))
    return (x / np.maximum(n, node.attrs.get("eps", 1e-12))).astype(np.float32)


# --- CNN ops (NCHW float32; see edgeq.models.cnn) ----------------------------------

def _windows(x: np.ndarray, kernel, stride, padding, dilation=(1, 1), fill=0.0) -> np.ndarray:
    """(N, C, Ho, Wo, kh, kw) views of the padded input, one per output position."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


@op("conv2d")
def _conv2d(ex, node, args):
    """Grouped, strided, dilated conv as one matmul per group over the unfolded input (im2col)."""
    x, w, b = args
    a = node.attrs
    g = int(a.get("groups", 1))
    n, c = x.shape[:2]
    out, cg, kh, kw = w.shape
    win = _windows(x, (kh, kw), a["stride"], a["padding"], a.get("dilation", (1, 1)))
    ho, wo = win.shape[2:4]
    cols = win.reshape(n, g, cg, ho, wo, kh, kw).transpose(0, 1, 3, 4, 2, 5, 6).reshape(n, g, ho * wo, cg * kh * kw)
    wg = w.reshape(g, out // g, cg * kh * kw).transpose(0, 2, 1)              # (g, K, out/g)
    y = np.matmul(cols, wg)                                                    # (n, g, P, out/g)
    y = y.transpose(0, 1, 3, 2).reshape(n, out, ho, wo)
    return (y + b[None, :, None, None]).astype(np.float32, copy=False)


@op("relu")
def _relu(ex, node, args):
    return np.maximum(args[0], np.float32(0))


@op("relu6")
def _relu6(ex, node, args):
    return np.clip(args[0], np.float32(0), np.float32(6))


@op("max_pool2d")
def _max_pool2d(ex, node, args):
    a = node.attrs
    return _windows(args[0], a["kernel"], a["stride"], a["padding"], fill=-np.inf).max(axis=(-2, -1))


@op("avg_pool2d")
def _avg_pool2d(ex, node, args):
    """Padding counts in the divisor (torch's count_include_pad=True default)."""
    a = node.attrs
    win = _windows(args[0], a["kernel"], a["stride"], a["padding"])
    return win.astype(np.float64).mean(axis=(-2, -1)).astype(np.float32)


@op("global_avg_pool")
def _global_avg_pool(ex, node, args):
    return args[0].astype(np.float64).mean(axis=(2, 3), keepdims=True).astype(np.float32)


@op("flatten")
def _flatten(ex, node, args):
    x = args[0]
    return x.reshape(x.shape[0], -1)
