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
