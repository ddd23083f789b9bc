"""The Llama family (Llama, SmolLM, Qwen2-style): config, tensor names, graph.

Canonical tensor names follow Hugging Face (`model.layers.0.mlp.down_proj.weight`);
GGUF names (`blk.0.ffn_down.weight`) are aliases. Canonical layouts follow
Hugging Face too: Q/K rows are in HF's rotate-half RoPE order, and the GGUF
side applies llama.cpp's row permutation when writing and undoes it on import.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError, number
from edgeq.core.ir import Graph, Node, Tensor, Value, checked_weights
from edgeq.models import names


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied_embeddings: bool = True
    context_length: int = 2048
    rope_scaling: dict[str, Any] | None = None   # {"type": "linear", "factor": f} ; llama3 factors come as a tensor
    attention_bias: bool = False
    # each layer's MLP width where the layers differ (a pruned or searched model, llama.cpp's `deci` architecture);
    # None: every layer has intermediate_size (which is then the widest)
    ffn_widths: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["ffn_widths"] is None:
            del d["ffn_widths"]      # a uniform model's record stays what it was before per-layer widths existed
        else:
            d["ffn_widths"] = list(d["ffn_widths"])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        if d.get("ffn_widths") is not None:
            d["ffn_widths"] = tuple(d["ffn_widths"])
        return cls(**d)

    def ffn_width(self, layer: int) -> int:
        return self.intermediate_size if self.ffn_widths is None else self.ffn_widths[layer]


# --- names -----------------------------------------------------------------

_LAYER_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_HF_TO_GGUF = {
    names.EMBED: "token_embd.weight",
    names.FINAL_NORM: "output_norm.weight",
    names.LM_HEAD: "output.weight",
    "rope_freqs.weight": "rope_freqs.weight",
}
_LAYER_GGUF_TO_HF = {v: k for k, v in _LAYER_HF_TO_GGUF.items()}
_GLOBAL_GGUF_TO_HF = {v: k for k, v in _GLOBAL_HF_TO_GGUF.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_name(hf: str) -> str:
    m = _HF_LAYER.match(hf)
    if m:
        return f"blk.{m.group(1)}.{_LAYER_HF_TO_GGUF[m.group(2)]}"
    return _GLOBAL_HF_TO_GGUF[hf]


def hf_name(gguf: str) -> str | None:
    """Canonical name for a GGUF tensor name, or None if the family does not know it."""
    m = _GGUF_LAYER.match(gguf)
    if m:
        rest = _LAYER_GGUF_TO_HF.get(m.group(2))
        return None if rest is None else f"model.layers.{m.group(1)}.{rest}"
    return _GLOBAL_GGUF_TO_HF.get(gguf)


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape (numpy order) for every tensor the family defines, in canonical order."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.n_heads * d, cfg.n_kv_heads * d
    out: dict[str, tuple[int, ...]] = {names.EMBED: (cfg.vocab_size, h)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        f = cfg.ffn_width(i)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        if cfg.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (f, h)
        out[p + "mlp.up_proj.weight"] = (f, h)
        out[p + "mlp.down_proj.weight"] = (h, f)
    out[names.FINAL_NORM] = (h,)
    if not cfg.tied_embeddings:
        out[names.LM_HEAD] = (cfg.vocab_size, h)
    return out


# --- llama.cpp's Q/K row order ----------------------------------------------

def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved RoPE row order."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def unpermute_from_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_for_gguf."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def qk_heads(cfg: LlamaConfig, name: str) -> int | None:
    """Head count used by the GGUF permutation for this tensor, or None if it is not permuted."""
    if ".self_attn.q_proj." in name:
        return cfg.n_heads
    if ".self_attn.k_proj." in name:
        return cfg.n_kv_heads
    return None


# --- GGUF metadata -----------------------------------------------------------

# Far above any released model, far below what would make the shapes' byte sizes overflow or a vocabulary loop
# run for hours: a config outside them is refused before anything is sized or allocated.
LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "n_layers": 1 << 12,
          "n_heads": 1 << 12, "n_kv_heads": 1 << 12, "head_dim": 1 << 12, "context_length": 1 << 24}


def check_config(cfg: LlamaConfig, path=None, source: str = "config") -> LlamaConfig:
    """Every size positive and bounded, heads that divide, finite positive floats; one line otherwise."""
    for name, top in LIMITS.items():
        v = getattr(cfg, name)
        if type(v) is not int or not 0 < v <= top:
            raise EdgeqError(path, f"implausible {name} = {v!r} in the {source} (expected 1..{top})")
    if cfg.ffn_widths is not None:
        top = LIMITS["intermediate_size"]
        if (len(cfg.ffn_widths) != cfg.n_layers
                or any(type(v) is not int or not 0 < v <= top for v in cfg.ffn_widths)):
            raise EdgeqError(path, f"implausible per-layer MLP widths in the {source} (expected {cfg.n_layers} "
                                   f"widths in 1..{top})")
    if cfg.n_heads % cfg.n_kv_heads:
        raise EdgeqError(path, f"inconsistent attention heads ({cfg.n_heads} heads, {cfg.n_kv_heads} KV heads)")
    for name in ("rope_theta", "rms_eps"):
        v = getattr(cfg, name)
        if not isinstance(v, float) or not np.isfinite(v) or v <= 0:
            raise EdgeqError(path, f"implausible {name} = {v!r} in the {source}")
    for k, v in (cfg.rope_scaling or {}).items():
        if k != "type" and (not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0):
            raise EdgeqError(path, f"implausible rope scaling {k} = {v!r} in the {source}")
    return cfg


def _number(v: Any, key: str, path, kind: type, source: str):
    return number(v, key, path, kind, source)


PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")

# llama.cpp's two architectures for this family: `deci` is Llama whose layers may differ (per-layer FFN and head
# counts, from Nemotron); edgeq writes it for models whose MLP widths differ (a pruned or searched plan)
GGUF_ARCHITECTURES = ("llama", "deci")


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], path=None) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise EdgeqError(path, f"unsupported architecture {str(arch)[:60]!r} (edgeq imports llama- and "
                               "deci-architecture GGUF files)")

    def num(key: str, kind: type = int, default=None):
        full = f"{arch}.{key}"
        if full not in meta:
            if default is None:
                raise EdgeqError(path, f"missing metadata key {full}")
            return default
        v = meta[full]
        if isinstance(v, list) and kind is int and key in PER_LAYER_KEYS:
            if not v or len(v) > LIMITS["n_layers"]:
                raise EdgeqError(path, f"implausible {full}: {len(v)} per-layer values")
            return [_number(x, full, path, kind, "GGUF metadata") for x in v]
        return _number(v, full, path, kind, "GGUF metadata")

    def one(key: str, default=None) -> int:
        """A count every layer shares: a per-layer list (deci) must hold one value."""
        v = num(key, default=default)
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise EdgeqError(path, f"per-layer {arch}.{key} that differs between layers ({sorted(set(v))[:4]}) "
                                       "is not supported (edgeq's layers share their attention shape)")
            v = v[0]
        return v

    n_heads = one("attention.head_count")
    hidden = num("embedding_length")
    if n_heads <= 0:
        raise EdgeqError(path, f"implausible {arch}.attention.head_count = {n_heads}")
    n_kv = one("attention.head_count_kv", default=n_heads)
    head_dim = num("attention.key_length", default=hidden // n_heads)
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens", [])
        vocab = len(tokens) if isinstance(tokens, list) else 0
    scaling = None
    stype = meta.get(f"{arch}.rope.scaling.type")
    if stype and stype != "none":
        if stype != "linear":
            raise EdgeqError(path, f"unsupported rope scaling type {str(stype)[:40]!r} (supported: none, linear, "
                                   "llama3 frequency factors)")
        scaling = {"type": "linear", "factor": num("rope.scaling.factor", float)}
    elif f"{arch}.rope.scale_linear" in meta:
        scaling = {"type": "linear", "factor": num("rope.scale_linear", float)}
    rope_dims = num("rope.dimension_count", default=head_dim)
    if rope_dims != head_dim:
        raise EdgeqError(path, f"partial RoPE (rope.dimension_count {rope_dims} != head dim {head_dim}) is not supported")
    n_layers = num("block_count")
    ffn = num("feed_forward_length")
    widths = None
    if isinstance(ffn, list):
        if len(ffn) != n_layers:
            raise EdgeqError(path, f"{arch}.feed_forward_length has {len(ffn)} values for {n_layers} layers")
        widths = None if len(set(ffn)) == 1 else tuple(ffn)
        ffn = max(ffn)
    cfg = LlamaConfig(
        vocab_size=_number(vocab, f"{arch}.vocab_size", path, int, "GGUF metadata"),
        hidden_size=hidden,
        intermediate_size=ffn,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        rope_theta=num("rope.freq_base", float, 10000.0),
        rms_eps=num("attention.layer_norm_rms_epsilon", float),
        tied_embeddings="output.weight" not in tensor_names,
        context_length=num("context_length", default=2048),
        rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        ffn_widths=widths,
    )
    return check_config(cfg, path, "GGUF metadata")


def gguf_hparams(cfg: LlamaConfig, ffn_widths: list[int] | None = None) -> dict[str, Any]:
    """The llama.* keys llama.cpp reads, as (key -> value) in a fixed order. `ffn_widths`: each layer's MLP width
    when the graph's differ from the config's (a list when they differ between layers)."""
    ffn: int | list[int] = cfg.intermediate_size
    if ffn_widths is not None:
        ffn = ffn_widths[0] if len(set(ffn_widths)) == 1 else [int(v) for v in ffn_widths]
    kv: dict[str, Any] = {
        "llama.vocab_size": cfg.vocab_size,
        "llama.context_length": cfg.context_length,
        "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.n_layers,
        "llama.feed_forward_length": ffn,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.attention.key_length": cfg.head_dim,
        "llama.attention.value_length": cfg.head_dim,
        "llama.attention.layer_norm_rms_epsilon": cfg.rms_eps,
        "llama.rope.freq_base": cfg.rope_theta,
    }
    if cfg.rope_scaling and cfg.rope_scaling["type"] != "llama3":
        kv["llama.rope.scaling.type"] = cfg.rope_scaling["type"]
        kv["llama.rope.scaling.factor"] = cfg.rope_scaling["factor"]
    # llama3 scaling has no metadata key in llama.cpp: it is the rope_freqs.weight tensor (see llama3_rope_freqs)
    return kv


def llama3_freq_factors(inv: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1's per-frequency divisors (what GGUF stores as rope_freqs.weight)."""
    old_ctx = s["original_max_position_embeddings"]
    low_wl = old_ctx / s["low_freq_factor"]
    high_wl = old_ctx / s["high_freq_factor"]
    wl = 2 * np.pi / inv
    smooth = (old_ctx / wl - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    mid = 1.0 / ((1 - smooth) / s["factor"] + smooth)
    return np.where(wl < high_wl, 1.0, np.where(wl > low_wl, s["factor"], mid))


def llama3_rope_freqs(cfg: LlamaConfig) -> np.ndarray:
    """llama.cpp's representation of llama3 RoPE scaling: the per-frequency divisors, float32 (head_dim/2,)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    return llama3_freq_factors(inv, cfg.rope_scaling).astype(np.float32)


# --- graph -------------------------------------------------------------------

def build_graph(cfg: LlamaConfig, weights: dict[str, Tensor], metadata: dict[str, Any] | None = None) -> Graph:
    """The decoder as IR nodes; the executor and every backend read the same node list."""
    ordered = checked_weights(expected_shapes(cfg), weights)
    if "rope_freqs.weight" in weights:
        ordered["rope_freqs.weight"] = weights["rope_freqs.weight"]

    nodes: list[Node] = []
    rope = {"theta": cfg.rope_theta, "head_dim": cfg.head_dim, "scaling": cfg.rope_scaling,
            "freq_factors": "rope_freqs.weight" if "rope_freqs.weight" in weights else None}
    nodes.append(Node("embedding", ["tokens", names.EMBED], ["h0"]))
    h = "h0"
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        t = f"l{i}."
        bias = cfg.attention_bias
        nodes += [
            Node("rms_norm", [h, p + "input_layernorm.weight"], [t + "xa"], {"eps": cfg.rms_eps}),
            Node("linear", [t + "xa", p + "self_attn.q_proj.weight"] + ([p + "self_attn.q_proj.bias"] if bias else []), [t + "q"]),
            Node("linear", [t + "xa", p + "self_attn.k_proj.weight"] + ([p + "self_attn.k_proj.bias"] if bias else []), [t + "k"]),
            Node("linear", [t + "xa", p + "self_attn.v_proj.weight"] + ([p + "self_attn.v_proj.bias"] if bias else []), [t + "v"]),
            Node("rope", [t + "q", "positions"], [t + "qr"], {**rope, "n_heads": cfg.n_heads}),
            Node("rope", [t + "k", "positions"], [t + "kr"], {**rope, "n_heads": cfg.n_kv_heads}),
            Node("attention", [t + "qr", t + "kr", t + "v"], [t + "att"],
                 {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "causal": True,
                  "layer": i}),
            Node("linear", [t + "att", p + "self_attn.o_proj.weight"], [t + "ao"]),
            Node("add", [h, t + "ao"], [t + "h1"]),
            Node("rms_norm", [t + "h1", p + "post_attention_layernorm.weight"], [t + "xm"], {"eps": cfg.rms_eps}),
            Node("linear", [t + "xm", p + "mlp.gate_proj.weight"], [t + "g"]),
            Node("linear", [t + "xm", p + "mlp.up_proj.weight"], [t + "u"]),
            Node("swiglu", [t + "g", t + "u"], [t + "a"]),
            Node("linear", [t + "a", p + "mlp.down_proj.weight"], [t + "d"]),
            Node("add", [t + "h1", t + "d"], [t + "h2"]),
        ]
        h = t + "h2"
    nodes.append(Node("rms_norm", [h, names.FINAL_NORM], ["hn"], {"eps": cfg.rms_eps}))
    head = names.head(cfg.tied_embeddings)
    nodes.append(Node("linear", ["hn", head], ["logits"]))
    return Graph(
        arch="llama",
        kind="decoder",
        config=cfg,
        inputs=[Value("tokens", ("seq",), "i32"), Value("positions", ("seq",), "i32")],
        outputs=[Value("logits", ("seq", cfg.vocab_size))],
        nodes=nodes,
        weights=ordered,
        metadata=dict(metadata or {}),
    )


def residual_norms(graph: Graph) -> list[str]:
    """The norms that read the residual stream at each layer boundary, in order: layer i's input norm (what enters
    layer i), then the final norm (what leaves the last layer)."""
    return [f"model.layers.{i}.input_layernorm.weight" for i in range(graph.config.n_layers)] + [names.FINAL_NORM]


MLP_KINDS = ("gate_proj", "up_proj", "down_proj")


def mlp_weights(layer: int) -> tuple[str, str, str]:
    """Layer `layer`'s MLP weights, gate, up, down: the MLP's channels are gate's and up's rows and down's columns."""
    return tuple(f"model.layers.{layer}.mlp.{k}.weight" for k in MLP_KINDS)        # type: ignore[return-value]


def mlp_widths(graph: Graph) -> list[int]:
    """Each layer's MLP width (its channels), read from the weights: a pruned graph's layers may differ."""
    return [graph.weights[mlp_weights(i)[0]].shape[0] for i in range(graph.config.n_layers)]


def prune_mlp(graph: Graph, channels: dict[int, np.ndarray]) -> Graph:
    """The graph whose layer i's MLP keeps channels `channels[i]` (indices into its channels, in that order): a
    permutation sorts the MLP, a shorter list also narrows it. The output is unchanged by a permutation (the MLP is a
    sum over its channels). Weights stay lazy: each is gathered from the source when loaded."""
    weights = dict(graph.weights)
    for layer, idx in channels.items():
        idx = np.asarray(idx, dtype=np.int64)
        for name, axis in zip(mlp_weights(layer), (0, 0, 1)):
            src = graph.weights[name]
            full = src.shape[axis]
            if idx.ndim != 1 or len(idx) == 0 or idx.min() < 0 or idx.max() >= full or len(np.unique(idx)) != len(idx):
                raise EdgeqError(None, f"layer {layer}: MLP channels must be distinct indices below {full}")
            shape = (len(idx), src.shape[1]) if axis == 0 else (src.shape[0], len(idx))
            weights[name] = Tensor(name, shape, load=lambda s=src, i=idx, a=axis: np.take(s.numpy(), i, axis=a),
                                   alias=src.alias, source_format=src.source_format)
    return Graph(graph.arch, graph.kind, graph.config, graph.inputs, graph.outputs, graph.nodes, weights,
                 dict(graph.metadata))


ATTN_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_weights(layer: int) -> tuple[str, str, str, str]:
    """Layer `layer`'s attention projections q, k, v, o: Q/K head dimensions are q's and k's rows within each head,
    V head dimensions v's rows and o's columns within each head."""
    return tuple(f"model.layers.{layer}.self_attn.{k}.weight" for k in ATTN_KINDS)   # type: ignore[return-value]


def attention_widths(graph: Graph) -> tuple[list[int], list[int]]:
    """Each layer's Q/K and V head widths (dimensions per head), read from the weights: a pruned graph's differ."""
    cfg: LlamaConfig = graph.config
    qk, v = [], []
    for i in range(cfg.n_layers):
        q, _, vw, _ = attention_weights(i)
        qk.append(graph.weights[q].shape[0] // cfg.n_heads)
        v.append(graph.weights[vw].shape[0] // cfg.n_kv_heads)
    return qk, v


def qk_rows(pairs: np.ndarray, keep_pairs: int, head_dim: int) -> np.ndarray:
    """Rows of a Q or K weight (HF rotate-half layout: pair j is rows j and j + d/2 of its head) that keep, per head,
    the rotation pairs `pairs[h][:keep_pairs]`, in that order, as a narrowed head's rotate-half layout."""
    half = head_dim // 2
    return np.concatenate([h * head_dim + np.concatenate([p[:keep_pairs], p[:keep_pairs] + half])
                           for h, p in enumerate(np.asarray(pairs, dtype=np.int64))])


def reshape_attention(graph: Graph, pairs: dict[int, np.ndarray] | None = None,
                      rotations: dict[int, np.ndarray] | None = None,
                      keep: tuple[list[int], list[int]] | None = None) -> Graph:
    """The graph whose attention is sorted and/or narrowed, per layer:
    - `pairs[l]` (n_kv, d/2): each KV group's rotation pairs in their new order (its K head and every Q head sharing
      it); the rope nodes learn which source pair (so which frequency) each stored pair is;
    - `rotations[l]` (n_kv, d, d) orthogonal: V rows of group g become U_gᵀ·W_V[g] and the O columns of every head
      of the group W_O[:, head]·U_g, so the output is unchanged (attention is linear in V);
    - `keep` (Q/K widths, V widths per head, per layer): a prefix of each head's stored pairs and V dimensions.
    Weights stay lazy."""
    cfg: LlamaConfig = graph.config
    nh, nkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rep = nh // nkv
    weights = dict(graph.weights)
    nodes = list(graph.nodes)
    rope_at = {n.outputs[0]: k for k, n in enumerate(nodes) if n.op == "rope"}
    widths = attention_widths(graph)

    def put(name: str, fn, axis: int = 0, width: int = 0) -> None:
        src = graph.weights.get(name)
        if src is None:
            return
        shape = tuple(width if a == axis else n for a, n in enumerate(src.shape))
        weights[name] = Tensor(name, shape, load=lambda s=src: fn(s.numpy()), alias=src.alias,
                               source_format=src.source_format)

    for i in range(cfg.n_layers):
        q, k, v, o = attention_weights(i)
        bias = lambda n: n[: -len("weight")] + "bias"             # noqa: E731
        dq, dv = widths[0][i], widths[1][i]
        kq = dq // 2 if keep is None else keep[0][i] // 2
        kv = dv if keep is None else keep[1][i]
        if kq * 2 > dq or kv > dv or kq < 1 or kv < 1:
            raise EdgeqError(None, f"layer {i}: attention widths {2 * kq}/{kv} outside the heads' {dq}/{dv}")
        perm = np.asarray(pairs[i], dtype=np.int64) if pairs and i in pairs else np.tile(np.arange(dq // 2), (nkv, 1))
        if perm.shape != (nkv, dq // 2) or any(sorted(p) != list(range(dq // 2)) for p in perm.tolist()):
            raise EdgeqError(None, f"layer {i}: Q/K pair orders must be {nkv} permutations of {dq // 2} pairs")
        q_rows = qk_rows(np.repeat(perm, rep, axis=0), kq, dq)
        k_rows = qk_rows(perm, kq, dq)
        for name in (q, bias(q)):
            put(name, lambda a, r=q_rows: np.take(a, r, axis=0), width=len(q_rows))
        for name in (k, bias(k)):
            put(name, lambda a, r=k_rows: np.take(a, r, axis=0), width=len(k_rows))
        rot = None if not rotations or i not in rotations else np.asarray(rotations[i], dtype=np.float64)
        if rot is not None and rot.shape != (nkv, dv, dv):
            raise EdgeqError(None, f"layer {i}: V rotations must be {nkv} matrices {dv}x{dv}")

        def v_side(a, r=rot, kv=kv, dv=dv):                      # (nkv·dv, ...) -> (nkv·kv, ...)
            g = a.reshape(nkv, dv, -1).astype(np.float64 if r is not None else a.dtype)
            if r is not None:
                g = np.einsum("gde,gdx->gex", r, g)
            return g[:, :kv].reshape(nkv * kv, *a.shape[1:]).astype(np.float32)

        def o_side(a, r=rot, kv=kv, dv=dv):                      # (hidden, nh·dv) -> (hidden, nh·kv)
            g = a.reshape(a.shape[0], nh, dv).astype(np.float64 if r is not None else a.dtype)
            if r is not None:
                g = np.einsum("xhd,hde->xhe", g, np.repeat(r, rep, axis=0))
            return np.ascontiguousarray(g[:, :, :kv].reshape(a.shape[0], nh * kv)).astype(np.float32)

        for name in (v, bias(v)):
            put(name, v_side, width=nkv * kv)
        put(o, o_side, axis=1, width=nh * kv)
        if pairs and i in pairs or keep is not None:     # a narrowed head's rope needs its pairs named too
            old = nodes[rope_at[f"l{i}.qr"]].attrs.get("pairs")
            src = np.asarray(old, dtype=np.int64) if old is not None else np.tile(np.arange(d // 2), (nkv, 1))
            new = np.take_along_axis(src[:, :dq // 2], perm, axis=1).tolist()
            for out in (f"l{i}.qr", f"l{i}.kr"):
                at = rope_at[out]
                nodes[at] = Node(nodes[at].op, nodes[at].inputs, nodes[at].outputs, {**nodes[at].attrs, "pairs": new})
    return Graph(graph.arch, graph.kind, graph.config, graph.inputs, graph.outputs, nodes, weights,
                 dict(graph.metadata))


def linear_weights(graph: Graph) -> list[str]:
    """Canonical names of the 2-D weights that a quantization plan decides on (embedding and head included)."""
    return [n for n, t in graph.weights.items() if len(t.shape) == 2]


# --- Hugging Face config and tensors ---------------------------------------------

def config_from_hf(c: dict[str, Any], path=None) -> LlamaConfig:
    """A transformers LlamaConfig dict (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
    if c.get("model_type") not in (None, "llama", "smollm", "smollm2", "qwen2", "mistral"):
        raise EdgeqError(path, f"model_type {str(c.get('model_type'))[:40]!r} is not a llama-family model")

    def num(v: Any, key: str, kind: type = int):
        return _number(v, key, path, kind, "config")

    def need(d: dict, key: str):
        if key not in d:
            raise EdgeqError(path, f"config.json lacks {key}")
        return d[key]

    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise EdgeqError(path, "rope_parameters / rope_scaling must be an object")
    theta = num(rope.get("rope_theta", c.get("rope_theta", 10000.0)), "rope_theta", float)
    rtype = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rtype == "linear":
        scaling = {"type": "linear", "factor": num(need(rope, "factor"), "factor", float)}
    elif rtype == "llama3":
        scaling = {"type": "llama3", "factor": num(need(rope, "factor"), "factor", float),
                   "low_freq_factor": num(need(rope, "low_freq_factor"), "low_freq_factor", float),
                   "high_freq_factor": num(need(rope, "high_freq_factor"), "high_freq_factor", float),
                   "original_max_position_embeddings": num(need(rope, "original_max_position_embeddings"),
                                                           "original_max_position_embeddings")}
    elif rtype not in ("default", None):
        raise EdgeqError(path, f"rope type {str(rtype)[:40]!r} is not supported (default, linear, llama3)")
    n_heads = num(need(c, "num_attention_heads"), "num_attention_heads")
    hidden = num(need(c, "hidden_size"), "hidden_size")
    if n_heads <= 0:
        raise EdgeqError(path, f"implausible num_attention_heads = {n_heads}")
    cfg = LlamaConfig(
        vocab_size=num(need(c, "vocab_size"), "vocab_size"),
        hidden_size=hidden,
        intermediate_size=num(need(c, "intermediate_size"), "intermediate_size"),
        n_layers=num(need(c, "num_hidden_layers"), "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=num(c.get("num_key_value_heads") or n_heads, "num_key_value_heads"),
        head_dim=num(c.get("head_dim") or hidden // n_heads, "head_dim"),
        rope_theta=theta,
        rms_eps=num(c.get("rms_norm_eps", 1e-6), "rms_norm_eps", float),
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        context_length=num(c.get("max_position_embeddings", 2048), "max_position_embeddings"),
        rope_scaling=scaling,
        attention_bias=bool(c.get("attention_bias", False)),
    )
    return check_config(cfg, path, "config")


def hf_config_dict(cfg: LlamaConfig) -> dict[str, Any]:
    """The transformers config for this model (used to build an independent reference in tests)."""
    d: dict[str, Any] = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": cfg.tied_embeddings, "max_position_embeddings": cfg.context_length,
        "attention_bias": cfg.attention_bias, "hidden_act": "silu", "mlp_bias": False,
    }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**{k: v for k, v in cfg.rope_scaling.items() if k != "type"}, "rope_type": cfg.rope_scaling["type"],
                "rope_theta": cfg.rope_theta}
    d["rope_parameters"] = rope
    return d


def graph_from_arrays(cfg: LlamaConfig, arrays: dict[str, np.ndarray], metadata: dict[str, Any] | None = None) -> Graph:
    """A graph over in-memory canonical tensors (HF names); extra HF buffers are ignored."""
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        if name not in arrays:
            raise EdgeqError(None, f"missing tensor {name}")
        arr = np.asarray(arrays[name], dtype=np.float32)
        weights[name] = Tensor(name=name, shape=tuple(arr.shape), load=(lambda a=arr: a), alias=gguf_name(name))
    return build_graph(cfg, weights, metadata)


_FUSED = {
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def fused_groups(graph: Graph, kinds: list[str] | tuple[str, ...]) -> list[list[str]]:
    """Groups of tensors a runtime may fuse (one input, one kernel), per layer, for the kinds asked:
    "qkv" (q/k/v projections) and "gate_up" (the MLP's gate and up projections)."""
    groups = []
    for kind in kinds:
        if kind not in _FUSED:
            raise EdgeqError(None, f"unknown tie {kind!r}; choose from {', '.join(_FUSED)}")
        for i in range(graph.config.n_layers):
            members = [f"model.layers.{i}.{s}" for s in _FUSED[kind]]
            if all(m in graph.weights for m in members):
                groups.append(members)
    return groups
