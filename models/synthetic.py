"""Small random Llama models built from a config, for fast tests that need no model file."""

from __future__ import annotations

import numpy as np

from edgeq.ir import Graph
from edgeq.models import llama


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
    from edgeq.tokenizer import TokenizerSpec

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
