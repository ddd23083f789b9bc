"""The micro-models a latency profile measures: small synthetic decoders that put every candidate format in
every role.

A kernel's cost depends on its format and shape, and a little on what runs around it (caches, threads), so
the profile times whole small decoders in the real runtime, node by node, rather than kernels alone. Each
micro-model has its own widths (hidden 256-1024, FFN 2.7-4x, GQA, vocabularies 4k-49k, tied and untied heads)
and gives each role (q, k, v, o, gate, up, down, head) a different format in each layer, cycling through
every format the backend can write at that shape, so that one run yields a cost for most (format, shape)
pairs and the formats around a kernel vary. Widths that are not multiples of 256 are there on purpose:
K-quant types then fall back, as they do on real models (SmolLM2's 576). No width here is a real model's
width, so that predictions on real models are out of sample.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from edgeq.core.formats import Format
from edgeq.core.ir import Graph, Tensor
from edgeq.core.plan import Plan, TensorPlan
from edgeq.models import llama, names
from edgeq.models.recipes.synthetic import byte_level_spec


@dataclass(frozen=True)
class MicroModel:
    """One synthetic decoder to build and time, and the format of each of its 2-D weights."""

    name: str
    config: llama.LlamaConfig
    formats: dict[str, str]
    n_ctx: int
    seed: int

    def plan(self) -> Plan:
        return Plan(tensors={n: TensorPlan(f, reason="latency profile micro-model") for n, f in self.formats.items()},
                    preset=None)

    def graph(self) -> Graph:
        """The decoder with small random weights (latency does not depend on the values), generated tensor by
        tensor as the writer asks, and a complete byte-level tokenizer of the config's vocabulary."""
        shapes = llama.expected_shapes(self.config)
        weights = {}
        for i, (name, shape) in enumerate(shapes.items()):
            weights[name] = Tensor(name, tuple(shape), functools.partial(_random, shape, self.seed * 1000 + i),
                                   alias=llama.gguf_name(name))
        meta = {"name": f"latency-micro-{self.name}", "license": "apache-2.0",
                "tokenizer_spec": padded_spec(self.config.vocab_size)}
        return llama.build_graph(self.config, weights, meta)


def _random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def padded_spec(vocab_size: int):
    """byte_level_spec, padded with control tokens up to `vocab_size` (it stops at its merges' end)."""
    spec = byte_level_spec(min(vocab_size, 900))
    extra = vocab_size - len(spec.tokens)
    if extra <= 0:
        return spec
    return replace(spec, tokens=spec.tokens + tuple(f"<|pad_{i}|>" for i in range(extra)),
                   token_types=spec.token_types + (3,) * extra)


# (hidden, ffn, heads, kv heads, layers, vocab, tied, n_ctx): ~15-75 M parameters each
DECODER_SHAPES: tuple[tuple[int, int, int, int, int, int, bool, int], ...] = (
    (256, 1024, 4, 2, 12, 8192, True, 2048),
    (384, 1024, 6, 2, 14, 49152, True, 2048),
    (512, 1408, 8, 4, 12, 32768, False, 4096),
    (640, 1792, 10, 2, 10, 16384, True, 2048),
    (768, 2048, 12, 4, 8, 24576, True, 1280),
    (1024, 2816, 16, 4, 5, 4096, False, 2048),
)
QUICK_SHAPES = DECODER_SHAPES[:2]

ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def decoder_micro_models(formats: list[Format], variants: int = 2, quick: bool = False) -> list[MicroModel]:
    """Micro-models for a backend whose candidate weight formats are `formats`."""
    out = []
    for ci, (d, f, h, kvh, n_layers, vocab, tied, n_ctx) in enumerate(QUICK_SHAPES if quick else DECODER_SHAPES):
        cfg = llama.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, n_layers=n_layers, n_heads=h,
                                n_kv_heads=kvh, head_dim=64, tied_embeddings=tied, context_length=n_ctx)
        shapes = llama.expected_shapes(cfg)
        for v in range(variants):
            seed = 100 * ci + v
            rng = np.random.default_rng(seed)
            chosen: dict[str, str] = {}
            for r, role in enumerate(ROLES):
                shape = shapes[f"model.layers.0.{role}.weight"]
                fits = [x.name for x in formats if x.can_carry(shape)]
                order = list(rng.permutation(fits))
                for i in range(n_layers):
                    chosen[f"model.layers.{i}.{role}.weight"] = str(order[(i + r + v) % len(order)])
            for name in (names.EMBED, names.LM_HEAD):
                if name in shapes:
                    fits = [x.name for x in formats if x.can_carry(shapes[name])]
                    chosen[name] = str(fits[int(rng.integers(len(fits)))])
            out.append(MicroModel(f"d{d}-f{f}-l{n_layers}-v{vocab}-{v}", cfg, chosen, n_ctx, seed))
    return out
