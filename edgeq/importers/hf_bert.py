"""BERT sentence encoders from Hugging Face / sentence-transformers folders (config, safetensors, tokenizer.json).

Every file is untrusted input: JSON files are size-bounded, shapes are checked against the config before any
tensor is read, and only safetensors is read (never a pickled checkpoint).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph, Tensor
from edgeq.models.bert import BertConfig, build_graph, expected_shapes

MAX_CONFIG_BYTES = 1 << 20


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


def encoder_tokenizer(graph: Graph):
    """The encoder's own tokenizer.json, unpadded and truncated at its context length."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(graph.metadata["tokenizer_json"])
    tok.no_padding()
    tok.enable_truncation(graph.config.context_length)
    return tok
