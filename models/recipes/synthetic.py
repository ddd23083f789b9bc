"""Small random Llama models built from a config, for fast tests that need no model file."""

from __future__ import annotations

import numpy as np

from edgeq.core.ir import Graph
from edgeq.models import bert, llama
from edgeq.models.bert import BertConfig
from edgeq.runtime.tokenizer import TokenizerSpec


def random_llama(cfg: llama.LlamaConfig, seed: int = 0, scale: float = 0.05) -> Graph:
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in llama.expected_shapes(cfg).items():
        if len(shape) == 1:
            arrays[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arrays[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return llama.graph_from_arrays(cfg, arrays, {"name": "synthetic-llama", "license": "apache-2.0"})


def tiny_config(**overrides) -> llama.LlamaConfig:
    base = dict(vocab_size=384, hidden_size=256, intermediate_size=512, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=64, rope_theta=10000.0, rms_eps=1e-5, tied_embeddings=False, context_length=256)
    base.update(overrides)
    return llama.LlamaConfig(**base)


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_level_spec(vocab_size: int):
    """A complete byte-level BPE vocabulary of `vocab_size` tokens, for synthetic models llama.cpp can load.

    Three control tokens (end of text, chat turn start/end), the 256 byte tokens,
    then merged tokens built from the most common English letter pairs, so that
    text really exercises merges.
    """
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_tokens = _byte_chars()
    if vocab_size < len(specials) + len(byte_tokens):
        raise ValueError("vocab_size must be at least 259")
    tokens = specials + byte_tokens
    merges: list[str] = []
    known = set(tokens)
    alphabet = "etaoinshrdlcumwfgypbvkjxqz"
    pairs = [("Ġ", c) for c in alphabet] + [(a, b) for a in alphabet for b in alphabet]
    for a, b in pairs:
        if len(tokens) >= vocab_size:
            break
        if a in known and b in known and a + b not in known:
            merges.append(f"{a} {b}")
            tokens.append(a + b)
            known.add(a + b)
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return TokenizerSpec(model="gpt2", pre="smollm", tokens=tuple(tokens), token_types=tuple(types),
                         merges=tuple(merges), bos_id=1, eos_id=2, eot_id=None, pad_id=2, unk_id=0,
                         add_bos=False, add_eos=False, chat_template=template)


def tiny_bert_config(**overrides):
    base = dict(vocab_size=160, hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4, max_positions=64,
                context_length=64)
    base.update(overrides)
    return BertConfig(**base)


def random_bert(cfg, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Random weights for a BERT config, in canonical names (norm weights near 1, biases small)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in bert.expected_shapes(cfg).items():
        if name.endswith("LayerNorm.weight"):
            arrays[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif len(shape) == 1:
            arrays[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arrays[name] = (scale * rng.standard_normal(shape) * (10 if "embeddings" in name else 1)).astype(np.float32)
    return arrays


def write_bert_folder(folder, cfg=None, seed: int = 0):
    """A small sentence-transformers style BERT folder (config, safetensors, WordPiece tokenizer.json).

    The vocabulary is the special tokens, single characters and a few words, so any
    ASCII text tokenizes; the weights are random. For tests of the encoder paths
    without the real model's compile and run time.
    """
    import json
    from pathlib import Path

    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    cfg = cfg or tiny_bert_config()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("0"), ord("9") + 1)] + list(".,!?'-")
    words = ["the", "a", "is", "of", "and", "to", "in", "it", "that", "for", "function", "value", "model", "capital"]
    vocab = specials + words + chars + ["##" + c for c in chars]
    vocab = vocab[:cfg.vocab_size] + [f"[unused{i}]" for i in range(cfg.vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"model_type": "bert", "hidden_act": "gelu", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "max_position_embeddings": cfg.max_positions,
              "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.ln_eps}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "type": "sentence_transformers.models.Transformer"},
                                                     {"idx": 1, "type": "sentence_transformers.models.Pooling"},
                                                     {"idx": 2, "type": "sentence_transformers.models.Normalize"}]),
                                         encoding="utf-8")
    save_file(random_bert(cfg, seed), str(folder / "model.safetensors"))
    return folder
