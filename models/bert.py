"""The BERT encoder family (all-MiniLM-L6-v2 and friends): config, tensor names, graph.

Canonical names are Hugging Face's `BertModel` names without the `bert.` prefix
(`encoder.layer.0.attention.self.query.weight`). The graph ends in what a
sentence-transformers model computes: mean pooling over the tokens, then L2
normalisation, so the IR's output is the sentence embedding itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgeq.core.ir import Graph, Node, Tensor, Value, checked_weights
from edgeq.models import names


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    max_positions: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    pooling: str = "mean"             # sentence-transformers pooling mode
    normalize: bool = True            # L2-normalised output (a Normalize module)
    context_length: int = 256         # sentence-transformers' max_seq_length: longer inputs are truncated

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BertConfig":
        return cls(**d)


def expected_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    out: dict[str, tuple[int, ...]] = {
        names.WORD_EMBED: (cfg.vocab_size, h),
        names.POSITION_EMBED: (cfg.max_positions, h),
        names.TOKEN_TYPE_EMBED: (cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(cfg.n_layers):
        p = f"encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            out[p + f"attention.self.{proj}.weight"] = (h, h)
            out[p + f"attention.self.{proj}.bias"] = (h,)
        out[p + "attention.output.dense.weight"] = (h, h)
        out[p + "attention.output.dense.bias"] = (h,)
        out[p + "attention.output.LayerNorm.weight"] = (h,)
        out[p + "attention.output.LayerNorm.bias"] = (h,)
        out[p + "intermediate.dense.weight"] = (f, h)
        out[p + "intermediate.dense.bias"] = (f,)
        out[p + "output.dense.weight"] = (h, f)
        out[p + "output.dense.bias"] = (h,)
        out[p + "output.LayerNorm.weight"] = (h,)
        out[p + "output.LayerNorm.bias"] = (h,)
    return out


def build_graph(cfg: BertConfig, weights: dict[str, Tensor], metadata: dict[str, Any] | None = None) -> Graph:
    ordered = checked_weights(expected_shapes(cfg), weights)
    eps = {"eps": cfg.ln_eps}
    nodes = [
        Node("embedding", ["tokens", names.WORD_EMBED], ["e_word"]),
        Node("embedding", ["positions", names.POSITION_EMBED], ["e_pos"]),
        Node("embedding", ["token_types", names.TOKEN_TYPE_EMBED], ["e_type"]),
        Node("add", ["e_word", "e_pos"], ["e_wp"]),
        Node("add", ["e_wp", "e_type"], ["e_sum"]),
        Node("layer_norm", ["e_sum", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"], ["h0"], eps),
    ]
    h = "h0"
    att = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads, "head_dim": cfg.head_dim, "causal": False}
    for i in range(cfg.n_layers):
        p = f"encoder.layer.{i}."
        t = f"l{i}."
        nodes += [
            Node("linear", [h, p + "attention.self.query.weight", p + "attention.self.query.bias"], [t + "q"]),
            Node("linear", [h, p + "attention.self.key.weight", p + "attention.self.key.bias"], [t + "k"]),
            Node("linear", [h, p + "attention.self.value.weight", p + "attention.self.value.bias"], [t + "v"]),
            Node("attention", [t + "q", t + "k", t + "v"], [t + "att"], {**att, "layer": i}),
            Node("linear", [t + "att", p + "attention.output.dense.weight", p + "attention.output.dense.bias"], [t + "ao"]),
            Node("add", [t + "ao", h], [t + "r1"]),
            Node("layer_norm", [t + "r1", p + "attention.output.LayerNorm.weight", p + "attention.output.LayerNorm.bias"],
                 [t + "h1"], eps),
            Node("linear", [t + "h1", p + "intermediate.dense.weight", p + "intermediate.dense.bias"], [t + "i"]),
            Node("gelu", [t + "i"], [t + "g"]),
            Node("linear", [t + "g", p + "output.dense.weight", p + "output.dense.bias"], [t + "o"]),
            Node("add", [t + "o", t + "h1"], [t + "r2"]),
            Node("layer_norm", [t + "r2", p + "output.LayerNorm.weight", p + "output.LayerNorm.bias"], [t + "h2"], eps),
        ]
        h = t + "h2"
    if cfg.normalize:
        nodes.append(Node("mean_pool", [h], ["pooled"]))
        nodes.append(Node("l2_normalize", ["pooled"], ["embedding"], {"eps": 1e-12}))
    else:
        nodes.append(Node("mean_pool", [h], ["embedding"]))
    return Graph(
        arch="bert", kind="encoder", config=cfg,
        inputs=[Value("tokens", ("seq",), "i32"), Value("positions", ("seq",), "i32")],
        outputs=[Value("embedding", (cfg.hidden_size,))],
        nodes=nodes, weights=ordered, metadata=dict(metadata or {}),
    )


def matmul_weights(graph: Graph) -> list[str]:
    """The 2-D weights a linear layer multiplies by (what an INT8 plan quantizes besides the embedding)."""
    return [n for n, t in graph.weights.items() if len(t.shape) == 2 and n.startswith("encoder.")]
