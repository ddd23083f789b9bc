"""The BERT encoder family (all-MiniLM-L6-v2 and friends): config, tensor names, graph, HF import.

Canonical names are Hugging Face's `BertModel` names without the `bert.` prefix
(`encoder.layer.0.attention.self.query.weight`). The graph ends in what a
sentence-transformers model computes: mean pooling over the tokens, then L2
normalisation, so the IR's output is the sentence embedding itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import Graph, Node, Tensor, Value, checked_weights

MAX_CONFIG_BYTES = 1 << 20


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
        "embeddings.word_embeddings.weight": (cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": (cfg.max_positions, h),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
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
        Node("embedding", ["tokens", "embeddings.word_embeddings.weight"], ["e_word"]),
        Node("embedding", ["positions", "embeddings.position_embeddings.weight"], ["e_pos"]),
        Node("embedding", ["token_types", "embeddings.token_type_embeddings.weight"], ["e_type"]),
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


# --- Hugging Face folders ------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise EdgeqError(path, "implausibly large JSON file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeqError(path, f"not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise EdgeqError(path, "expected a JSON object")
    return d


def config_from_hf(folder: Path) -> BertConfig:
    c = _read_json(folder / "config.json")
    if c.get("model_type") != "bert":
        raise EdgeqError(folder / "config.json", f"model_type {c.get('model_type')!r} is not a BERT encoder")
    if c.get("hidden_act", "gelu") != "gelu":
        raise EdgeqError(folder / "config.json", f"hidden_act {c.get('hidden_act')!r} is not supported (gelu)")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise EdgeqError(folder / "config.json", "only absolute position embeddings are supported")
    pooling, normalize, max_seq = "mean", True, None
    pool_cfg = folder / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        p = _read_json(pool_cfg)
        if not p.get("pooling_mode_mean_tokens", False) or any(
                p.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")):
            raise EdgeqError(pool_cfg, "only mean pooling is supported")
    modules = folder / "modules.json"
    if modules.is_file():
        mods = json.loads(modules.read_text(encoding="utf-8"))
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in mods if isinstance(m, dict))
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        max_seq = _read_json(st).get("max_seq_length")
    n_heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    if n_heads <= 0 or hidden % n_heads:
        raise EdgeqError(folder / "config.json", f"hidden_size {hidden} is not a multiple of {n_heads} heads")
    max_pos = int(c.get("max_position_embeddings", 512))
    return BertConfig(
        vocab_size=int(c["vocab_size"]), hidden_size=hidden, intermediate_size=int(c["intermediate_size"]),
        n_layers=int(c["num_hidden_layers"]), n_heads=n_heads, max_positions=max_pos,
        type_vocab_size=int(c.get("type_vocab_size", 2)), ln_eps=float(c.get("layer_norm_eps", 1e-12)),
        pooling=pooling, normalize=normalize, context_length=int(min(max_seq or max_pos, max_pos)),
    )


def import_hf_folder(folder: str | os.PathLike) -> Graph:
    """A BERT sentence encoder from a Hugging Face / sentence-transformers folder (safetensors only)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    cfg = config_from_hf(folder)
    st = folder / "model.safetensors"
    if not st.is_file():
        raise EdgeqError(folder, "no model.safetensors (edgeq never unpickles .bin checkpoints)")
    if not (folder / "tokenizer.json").is_file():
        raise EdgeqError(folder, "no tokenizer.json (a Hugging Face tokenizers file is needed for encoders)")
    expected = expected_shapes(cfg)
    try:
        f = safe_open(str(st), "np")
        names = list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise EdgeqError(st, f"not a readable safetensors file ({exc})") from None
    strip = "bert." if any(n.startswith("bert.") for n in names) else ""
    by_canonical = {n[len(strip):]: n for n in names if n.startswith(strip)}
    weights: dict[str, Tensor] = {}
    for name, shape in expected.items():
        src = by_canonical.get(name)
        if src is None:
            raise EdgeqError(st, f"missing tensor {strip}{name}")
        sl = f.get_slice(src)
        got = tuple(int(x) for x in sl.get_shape())
        if got != shape:
            raise EdgeqError(st, f"tensor {src} has shape {got}, config implies {shape}")

        def load(src=src, path=str(st)) -> np.ndarray:
            with safe_open(path, "np") as g:
                return g.get_tensor(src).astype(np.float32)

        weights[name] = Tensor(name=name, shape=shape, load=load, source_format=str(sl.get_dtype()).lower())
    metadata = {"source_path": str(folder), "name": folder.name if folder.name != "model" else folder.parent.name,
                "license": "apache-2.0", "tokenizer_json": str(folder / "tokenizer.json")}
    readme = folder / "README.md"
    if readme.is_file():
        head = readme.read_text(encoding="utf-8", errors="replace")[:2000]
        for line in head.splitlines():
            if line.startswith("license:"):
                metadata["license"] = line.split(":", 1)[1].strip()
    return build_graph(cfg, weights, metadata)


def is_bert_folder(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "bert"
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
