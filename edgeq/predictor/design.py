"""The micro-models a latency profile measures: small synthetic decoders (or encoders) that put every candidate
format in every role.

A kernel's cost depends on its format and shape, and a little on what runs around it (caches, threads), so
the profile times whole small decoders in the real runtime, node by node, rather than kernels alone. Each
micro-model has its own widths (hidden 256-1024, FFN 2.7-4x, GQA, vocabularies 4k-49k, tied and untied heads)
and gives each role (q, k, v, o, gate, up, down, head) a different format in each layer, cycling through
every format the backend can write at that shape, so that one run yields a cost for most (format, shape)
pairs and the formats around a kernel vary. Widths that are not multiples of 256 are there on purpose:
K-quant types then fall back, as they do on real models (SmolLM2's 576); and some inner widths are not multiples
of 128 (704, 1888, 2080): onnxruntime's MatMulNBits computes the last K mod 128 columns about 3x slower per
multiply-add than the rest (measured, 1 thread, 128 tokens, 1536 rows: K 512 2.0 ms, 544 2.5, 576 2.9, 608 3.3,
640 2.6), which SmolLM2's 576 and 960 hit and a table of multiples of 128 never saw (model.KernelTable's
rows·(cols mod 128) term). No width here is a real model's width, so that predictions on real models are out of
sample.

Encoder micro-models (BERT, `encoder_micro_models`) do the same over the six linear roles of a layer with every
format the backend writes for encoders (static and dynamic int8 included), and in every third layer give q, k
and v one int8 format, so that the runtime's fused QAttention kernel is timed too. Their widths (256-768) and
head sizes (32 and 64) avoid MiniLM's 384; the widths of the model a profile is for are added apart
(`model_shapes`: its kernels are then looked up, not fitted across widths). A third variant per width is
dominated by one weight-only format (three linears in four, the rest cycling as above), as a preset's plan is: onnxruntime's 8-bit MatMulNBits dequantizes
the whole weight into a float buffer on each call, and that costs much less when the node before did the same
(measured at 128 tokens: a 1536x384 int8_b32 kernel 1.5-1.8 ms inside an int8_b32 MiniLM, 2.5-3 ms alone among
other formats), so the table must see both neighbourhoods.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeq.core.formats import FORMATS, Format
from edgeq.core.ir import Graph, Tensor
from edgeq.core.plan import Plan, TensorPlan
from edgeq.models import bert, llama, names
from edgeq.models.recipes.synthetic import byte_level_spec, write_bert_folder

STATIC_RANGE = [-8.0, 8.0]      # the activation range static int8 is written with where timing is all that matters


@dataclass(frozen=True)
class MicroModel:
    """One synthetic decoder to build and time, and the format of each of its 2-D weights."""

    name: str
    config: llama.LlamaConfig | bert.BertConfig
    formats: dict[str, str]
    n_ctx: int
    seed: int

    @property
    def kind(self) -> str:
        return "encoder" if isinstance(self.config, bert.BertConfig) else "decoder"

    def plan(self) -> Plan:
        return Plan(tensors={n: timing_plan(f, "latency profile micro-model") for n, f in self.formats.items()},
                    preset=None)

    def graph(self, work: Path) -> Graph:
        """The model with small random weights (latency does not depend on the values): a decoder generated
        tensor by tensor as the writer asks, with a complete byte-level tokenizer of the config's vocabulary; an
        encoder written as a Hugging Face folder under `work` (with a WordPiece tokenizer) and imported."""
        if self.kind == "encoder":
            from edgeq.importers.hf_bert import import_hf_folder

            return import_hf_folder(write_bert_folder(work / f"{self.name}-source", self.config, seed=self.seed))
        shapes = llama.expected_shapes(self.config)
        weights = {}
        for i, (name, shape) in enumerate(shapes.items()):
            weights[name] = Tensor(name, tuple(shape), functools.partial(_random, shape, self.seed * 1000 + i),
                                   alias=llama.gguf_name(name))
        meta = {"name": f"latency-micro-{self.name}", "license": "apache-2.0",
                "tokenizer_spec": padded_spec(self.config.vocab_size)}
        return llama.build_graph(self.config, weights, meta)


def timing_plan(fmt: str, reason: str) -> TensorPlan:
    """A weight's plan in a plan built to be timed: static int8 gets a fixed activation range (one for every
    input, so an encoder's q, k and v share it, as calibrated ranges of one input do)."""
    return TensorPlan(fmt, reason=reason, act_range=list(STATIC_RANGE) if fmt == "int8" else None)


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
    (704, 1888, 11, 1, 10, 16384, True, 2048),
    (768, 2080, 12, 4, 8, 24576, True, 1280),
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


# (hidden, ffn, heads, layers, vocab): 6-30 M parameters each; head sizes 32 and 64
ENCODER_SHAPES: tuple[tuple[int, int, int, int, int], ...] = (
    (256, 1024, 8, 6, 4000),
    (320, 1280, 5, 5, 8000),
    (448, 1344, 14, 4, 6000),
    (512, 2048, 8, 4, 12000),
    (640, 2560, 20, 3, 3000),
    (768, 3072, 12, 3, 16000),
)
QUICK_ENCODER_SHAPES = ENCODER_SHAPES[:2]
MODEL_SHAPE_LAYERS = 6          # micro-models at a profiled model's own widths (encoder_micro_models' model_shapes)
MODEL_SHAPE_VOCAB = 5000
ENCODER_ROLES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")
FUSING_FORMATS = ("int8", "int8_dyn")       # q, k and v all in one of these: one QAttention kernel


def encoder_formats(backend: str) -> list[Format]:
    """Every format the backend writes an encoder's linear layers in (activation-quantizing int8 included)."""
    return [f for f in FORMATS.values() if backend in f.backends and f.quantize_fn is not None]


def encoder_micro_models(formats: list[Format], variants: int = 2, quick: bool = False,
                         dominated: bool = False, model_shapes: tuple[tuple[int, int, int], ...] = ()) \
        -> list[MicroModel]:
    """`variants` micro-models per width cycling the formats; `dominated`: one more per width where one
    weight-only format (MatMulNBits) that carries the width runs three linears in four: 8-bit at every third
    width (its kernel is the one whose time depends most on its neighbours), the 4-bit ones in turn between.

    `model_shapes`: (hidden, ffn, heads) of the models whose plans the profile is for; each gets micro-models
    (MODEL_SHAPE_LAYERS layers, the same variants, and both an 8-bit and a 4-bit dominated one), so the kernel
    table looks their kernels up at the exact shape instead of fitting across the widths above: onnxruntime's 8-bit
    MatMulNBits is not smooth in the shape (at 128 tokens, 1 thread: 384x384 0.49 ms, 448x448 1.1-1.9 ms), which
    the per-format fit cannot follow (s28: MiniLM plans with more than 5 int8_b32 linears were the misses)."""
    eight = [x.name for x in formats if x.name.startswith("int8_b")]
    four = [x.name for x in formats if x.name.startswith("int4")]
    out = []
    shapes_ = QUICK_ENCODER_SHAPES if quick else ENCODER_SHAPES
    extra = [(d, f, h, MODEL_SHAPE_LAYERS, MODEL_SHAPE_VOCAB) for d, f, h in dict.fromkeys(model_shapes)]
    for ci, (d, f, h, n_layers, vocab) in enumerate(shapes_ + tuple(extra)):
        cfg = bert.BertConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, n_layers=n_layers, n_heads=h,
                              max_positions=512, context_length=512)
        shapes = bert.expected_shapes(cfg)
        fusing = [x for x in FUSING_FORMATS if x in {y.name for y in formats}]
        pick = (eight if ci % 3 == 0 else four[ci - ci // 3 - 1:] + four[:ci - ci // 3 - 1]) + eight + four
        carries = [x for x in pick if FORMATS[x].can_carry((d, d)) and FORMATS[x].can_carry((d, f))]
        mains = carries[:1] if dominated else []
        if dominated and ci >= len(shapes_):        # a model's own widths: 8-bit and 4-bit neighbourhoods both
            mains = [x for x in (next((y for y in carries if y in eight), None),
                                 next((y for y in carries if y in four), None)) if x is not None]
        for v in range(variants + len(mains)):
            seed = 500 + 100 * ci + v
            rng = np.random.default_rng(seed)
            chosen: dict[str, str] = {}
            main = mains[v - variants] if v >= variants else None
            for r, role in enumerate(ENCODER_ROLES):
                shape = shapes[f"encoder.layer.0.{role}.weight"]
                order = list(rng.permutation([x.name for x in formats if x.can_carry(shape)]))
                for i in range(n_layers):
                    fmt = str(order[(i + r + v) % len(order)])
                    if main is not None and (i * len(ENCODER_ROLES) + r) % 4 != 3 and FORMATS[main].can_carry(shape):
                        fmt = main
                    chosen[f"encoder.layer.{i}.{role}.weight"] = fmt
            for i in range(n_layers):
                if fusing and (i + v) % 3 == 0 and main is None:
                    fmt = fusing[(i // 3 + v + ci) % len(fusing)]
                    for role in ENCODER_ROLES[:3]:
                        chosen[f"encoder.layer.{i}.{role}.weight"] = fmt
            for name, shape in shapes.items():
                if len(shape) == 1 or name in chosen:
                    continue
                chosen[name] = "f32" if name != names.WORD_EMBED else str(["f32", "f16", "int8"][int(rng.integers(3))])
            name = f"enc-d{d}-f{f}-h{h}-l{n_layers}-{v if main is None else main}"
            out.append(MicroModel(name, cfg, chosen, 512, seed))
    return out
