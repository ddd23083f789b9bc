"""BERT sentence encoders from Hugging Face / sentence-transformers folders (config, safetensors, tokenizer.json).

Every file is untrusted input: JSON files are size-bounded, shapes are checked against the config before any
tensor is read, and only safetensors is read (never a pickled checkpoint).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgeq.core.errors import EdgeqError, number, required
from edgeq.core.ir import Graph, Tensor
from edgeq.importers.safetensors_io import FLOAT_DTYPES, SafetensorsFile
from edgeq.models.bert import BertConfig, build_graph, expected_shapes

MAX_CONFIG_BYTES = 1 << 20


def _read_json(path: Path, want: type = dict) -> Any:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise EdgeqError(path, "implausibly large JSON file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EdgeqError(path, f"not valid JSON ({exc})") from None
    if not isinstance(d, want):
        raise EdgeqError(path, f"expected a JSON {'object' if want is dict else 'array'}")
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
        mods = _read_json(modules, list)
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in mods if isinstance(m, dict))
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        max_seq = _read_json(st).get("max_seq_length")
    path = folder / "config.json"

    def num(key: str, default=None, kind: type = int, lo=1, hi=1 << 22):
        v = required(c, key, path) if default is None else c.get(key, default)
        return number(v, key, path, kind, "config", lo, hi)

    n_heads = num("num_attention_heads", hi=1 << 12)
    hidden = num("hidden_size", hi=1 << 17)
    if hidden % n_heads:
        raise EdgeqError(path, f"hidden_size {hidden} is not a multiple of {n_heads} heads")
    max_pos = num("max_position_embeddings", 512, hi=1 << 20)
    if max_seq is not None:
        max_seq = number(max_seq, "max_seq_length", st, int, "sentence-transformers config", 1, 1 << 20)
    return BertConfig(
        vocab_size=num("vocab_size"), hidden_size=hidden, intermediate_size=num("intermediate_size", hi=1 << 20),
        n_layers=num("num_hidden_layers", hi=1 << 12), n_heads=n_heads, max_positions=max_pos,
        type_vocab_size=num("type_vocab_size", 2, hi=1 << 16),
        ln_eps=num("layer_norm_eps", 1e-12, float, lo=0.0, hi=1.0),
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
    f = SafetensorsFile(st)          # the header checked by edgeq before anything reads the file
    names = list(f.keys())
    strip = "bert." if any(n.startswith("bert.") for n in names) else ""
    by_canonical = {n[len(strip):]: n for n in names if n.startswith(strip)}
    weights: dict[str, Tensor] = {}
    for name, shape in expected.items():
        src = by_canonical.get(name)
        if src is None:
            raise EdgeqError(st, f"missing tensor {strip}{name}")
        t = f[src]
        if t.shape != shape:
            raise EdgeqError(st, f"tensor {src} has shape {t.shape}, config implies {shape}")
        if t.dtype not in FLOAT_DTYPES:
            raise EdgeqError(st, f"tensor {src} has dtype {t.dtype}, expected a float type")
        weights[name] = Tensor(name=name, shape=shape, load=t.load, source_format=t.dtype.lower())
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
        if cfg.stat().st_size > MAX_CONFIG_BYTES:
            return False
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "bert"
    except (UnicodeDecodeError, ValueError, RecursionError, AttributeError, OSError):
        return False


def encoder_tokenizer(graph: Graph):
    """The encoder's own tokenizer.json, unpadded and truncated at its context length."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(graph.metadata["tokenizer_json"])
    tok.no_padding()
    tok.enable_truncation(graph.config.context_length)
    return tok
