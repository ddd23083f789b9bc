"""llama.cpp's quantization presets, predicted tensor by tensor.

`--quant q4_k_m` must produce the same file as `llama-quantize ... Q4_K_M`,
and the planner must know the size of that file before writing it. So this
module re-derives, in Python, the per-tensor type that `llama_model_quantize`
(llama.cpp as vendored in llama-cpp-python 0.3.36, src/llama-quant.cpp)
picks for a llama-architecture model without experts, including the shape
fallbacks that dominate small models such as SmolLM2 (576-wide rows cannot
hold 256-element K-blocks).

The mixture rules are kept as data (`_RULES`) so that every choice carries a
sentence saying which llama.cpp rule made it; tests compare the prediction
with files written by llama.cpp itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format, shape_fallback

GGUF_PRESETS: tuple[str, ...] = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s",
    "q4_0", "q4_1", "q5_0", "q5_1", "q3_k_m", "q3_k_s", "q3_k_l", "q2_k",
    "iq4_nl", "iq4_xs", "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s",
)

# llama.h: enum llama_ftype -- what llama.cpp stores as general.file_type.
_FILE_TYPE: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "bf16": 32,
    "iq2_xxs": 19, "iq2_xs": 20, "iq3_xs": 22, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25, "iq3_s": 26, "iq3_m": 27,
    "iq2_s": 28, "iq2_m": 29, "iq4_xs": 30, "iq1_m": 31,
}

# llama_ftype_get_default_type: the type a preset gives a tensor no rule mentions.
_DEFAULT_TYPE: dict[str, str] = {
    "f32": "f32", "f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q6_k": "q6_k",
    "q5_k_m": "q5_k", "q5_k_s": "q5_k", "q4_k_m": "q4_k", "q4_k_s": "q4_k",
    "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1",
    "q3_k_m": "q3_k", "q3_k_s": "q3_k", "q3_k_l": "q3_k", "q2_k": "q2_k",
    "iq2_xxs": "iq2_xxs", "iq2_xs": "iq2_xs", "iq2_s": "iq2_xs", "iq2_m": "iq2_s", "iq3_xs": "iq3_s",
    "iq3_xxs": "iq3_xxs", "iq1_s": "iq1_s", "iq1_m": "iq1_m", "iq4_nl": "iq4_nl", "iq4_xs": "iq4_xs", "iq3_s": "iq3_s",
    "iq3_m": "iq3_s",
}

# The lowest-bit presets, which llama.cpp treats as one group (its first branch after the output and embedding).
_LOW_BIT = "iq2_xxs iq2_xs iq1_s iq2_s iq2_m iq1_m"

# tensor_allows_quantization: name fragments that keep a weight in its input
# type whatever the preset (small or precision-critical tensors of various
# architectures; only the norms occur in a llama model).
_NEVER_QUANTIZED_FRAGMENTS: tuple[tuple[str, str], ...] = (
    ("_norm.weight", "normalisation weight"),
    ("ffn_gate_inp.weight", "expert router"),
    ("ffn_gate_tid2eid.weight", "expert routing table"),
    ("altup", "tiny altup tensor"),
    ("laurel", "tiny laurel tensor"),
    ("per_layer_model_proj", "per-layer model projection"),
    ("ssm_conv1d", "small conv1d weight"),
    ("shortconv.conv.weight", "small conv weight"),
    ("indexer.k_proj.weight", "tiny indexer projection"),
    ("indexer.q_proj.weight", "tiny indexer projection"),
    *((f"time_mix_{s}.weight", "small RWKV weight") for s in (
        "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
        "decay_w1", "decay_w2", "lerp_fused")),
    ("attn_rel_b.weight", "relative position bias"),
    (".position_embd", "multimodal position embedding"),
    ("sam.pos_embd", "multimodal position embedding"),
    ("sam.neck.", "multimodal tensor"),
    ("sam.net_", "multimodal tensor"),
    (".rel_pos", "multimodal tensor"),
    (".patch_embd", "multimodal patch embedding"),
    (".patch_merger", "multimodal patch merger"),
    ("a.rvq.codebook", "audio codebook"),
    ("mm.a.code_embd", "audio codebook"),
)
_NEVER_QUANTIZED_NAMES: dict[str, str] = {
    "position_embd.weight": "positional embedding",
    "token_types.weight": "token-type embedding",
}

# tensor_get_category: first matching test wins, in llama.cpp's order.
_CATEGORY_FRAGMENTS: tuple[tuple[str, str], ...] = (
    ("attn_qkv.weight", "attn_v"),  # fused QKV counts as attn_v-like
    ("attn_kv_b.weight", "attn_v"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)

_LAYER_RE = re.compile(r"^blk\.\s*([+-]?\d+)")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]


@dataclass(frozen=True)
class PresetChoice:
    type: str
    reason: str
    requested: str | None


@dataclass(frozen=True)
class _Ctx:
    """What a rule may look at: the tensor's position among its kind, and the model."""

    i: int  # index among tensors of this kind, in llama.cpp's order
    n: int  # how many of this kind (attn_v: counted; ffn_*: n_layer)
    n_gqa: int
    has_imatrix: bool = False  # llama.cpp's qs.has_imatrix: an importance matrix was given


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's favoured layers: the first and last eighth, and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class _Rule:
    presets: frozenset[str]
    kind: str
    when: Callable[[_Ctx], bool]
    to: str
    why: str


def _rule(presets: str, kind: str, to: str, why: str, when: Callable[[_Ctx], bool] = lambda c: True) -> _Rule:
    return _Rule(frozenset(presets.split()), kind, when, to, why)


# llama_tensor_get_type_impl for the llama arch, n_expert <= 1 (not Falcon).
# Within one (preset, kind) the first rule whose condition holds applies;
# none holding means the preset's default type.
_RULES: tuple[_Rule, ...] = (
    # the lowest-bit presets
    _rule(_LOW_BIT, "attn_v", "q4_k", "attn_v with n_gqa >= 4", lambda c: c.n_gqa >= 4),
    _rule("iq2_s iq2_m", "attn_v", "iq3_s", "attn_v with n_gqa < 4"),
    _rule("iq2_xxs iq2_xs iq1_s iq1_m", "attn_v", "q2_k", "attn_v with n_gqa < 4"),
    _rule("iq2_s iq2_m", "ffn_down", "iq3_s", "ffn_down in the first eighth of layers", lambda c: c.i < c.n // 8),
    _rule("iq2_xxs iq2_xs iq1_s iq1_m", "ffn_down", "q2_k", "ffn_down in the first eighth of layers",
          lambda c: c.i < c.n // 8),
    _rule("iq1_s iq1_m", "attn_output", "iq2_xxs", "attn_output"),
    _rule("iq2_s iq2_m", "attn_output", "iq3_s", "attn_output"),
    _rule("iq2_xxs iq2_xs iq1_s iq1_m", "token_embd", "q2_k", "token_embd (untied)"),
    _rule("iq2_s iq2_m iq3_xxs", "token_embd", "iq3_s", "token_embd (untied)"),
    # the 3- and 4-bit i-quant presets
    _rule("iq3_xxs", "attn_v", "q4_k", "attn_v with n_gqa >= 4", lambda c: c.n_gqa >= 4),
    _rule("iq3_xxs", "attn_v", "iq3_s", "attn_v without an imatrix", lambda c: not c.has_imatrix),
    _rule("iq3_xxs", "attn_v", "iq3_xxs", "attn_v with an imatrix"),
    _rule("iq3_xs iq3_s", "attn_v", "q4_k", "attn_v with n_gqa >= 4", lambda c: c.n_gqa >= 4),
    _rule("iq3_m", "attn_v", "q4_k", "attn_v"),
    _rule("iq4_nl iq4_xs", "attn_v", "q5_k", "attn_v with n_gqa >= 4", lambda c: c.n_gqa >= 4),
    _rule("iq3_xs", "attn_k", "iq3_xxs", "attn_k"),
    _rule("iq3_xxs", "attn_k", "iq2_s", "attn_k"),
    _rule("iq3_xs", "attn_q", "iq3_xxs", "attn_q"),
    _rule("iq3_xxs", "attn_q", "iq2_s", "attn_q"),
    _rule("iq3_xxs", "ffn_down", "q4_k", "ffn_down in the first eighth of layers, without an imatrix",
          lambda c: not c.has_imatrix and c.i < c.n // 8),
    _rule("iq3_xxs", "ffn_down", "q3_k", "ffn_down after the first eighth of layers, without an imatrix",
          lambda c: not c.has_imatrix),
    _rule("iq3_m", "ffn_down", "q4_k", "ffn_down in the first eighth of layers", lambda c: c.i < c.n // 8),
    _rule("iq4_nl iq4_xs", "ffn_down", "q5_k", "ffn_down in the first eighth of layers, without an imatrix",
          lambda c: not c.has_imatrix and c.i < c.n // 8),
    _rule("iq3_xxs", "attn_output", "iq3_s", "attn_output"),
    _rule("iq3_m", "attn_output", "q4_k", "attn_output"),
    _rule("iq3_xs", "ffn_gate", "iq3_xxs", "ffn_gate in the middle three quarters of layers",
          lambda c: c.n // 8 <= c.i < 7 * c.n // 8),
    _rule("iq3_xs", "ffn_up", "iq3_xxs", "ffn_up in the middle three quarters of layers",
          lambda c: c.n // 8 <= c.i < 7 * c.n // 8),
    # the k-quant and legacy presets
    _rule("q2_k", "attn_v", "q4_k", "attn_v with n_gqa >= 4", lambda c: c.n_gqa >= 4),
    _rule("q2_k", "attn_v", "q3_k", "attn_v with n_gqa < 4"),
    _rule("q3_k_m", "attn_v", "q5_k", "one of the first two attn_v", lambda c: c.i < 2),
    _rule("q3_k_m", "attn_v", "q4_k", "attn_v after the first two"),
    _rule("q3_k_l", "attn_v", "q5_k", "attn_v"),
    _rule("q4_k_m q5_k_m", "attn_v", "q6_k", "attn_v in a use_more_bits layer",
          lambda c: _use_more_bits(c.i, c.n)),
    _rule("q4_k_s", "attn_v", "q5_k", "one of the first four attn_v", lambda c: c.i < 4),
    _rule("q2_k", "ffn_down", "q3_k", "ffn_down"),
    _rule("q3_k_m", "ffn_down", "q5_k", "ffn_down in the first sixteenth of layers", lambda c: c.i < c.n // 16),
    _rule("q3_k_m", "ffn_down", "q4_k", "ffn_down after the first sixteenth of layers"),
    _rule("q3_k_l", "ffn_down", "q5_k", "ffn_down"),
    _rule("q4_k_m q5_k_m", "ffn_down", "q6_k", "ffn_down in a use_more_bits layer",
          lambda c: _use_more_bits(c.i, c.n)),
    _rule("q4_k_s", "ffn_down", "q5_k", "ffn_down in the first eighth of layers", lambda c: c.i < c.n // 8),
    # "Guard against craziness in the first few ffn_down layers" -- only with an importance matrix.
    _rule("q4_0", "ffn_down", "q4_1", "ffn_down in the first eighth of layers, with an imatrix",
          lambda c: c.has_imatrix and c.i < c.n // 8),
    _rule("q5_0", "ffn_down", "q5_1", "ffn_down in the first eighth of layers, with an imatrix",
          lambda c: c.has_imatrix and c.i < c.n // 8),
    _rule("q2_k", "attn_output", "q3_k", "attn_output"),
    _rule("q3_k_m", "attn_output", "q4_k", "attn_output"),
    _rule("q3_k_l", "attn_output", "q5_k", "attn_output"),
)


def _check_preset(preset: str) -> None:
    if preset not in GGUF_PRESETS:
        raise EdgeqError(None, f"unknown --quant preset '{preset}'; choose one of {', '.join(GGUF_PRESETS)}")


def preset_file_type(preset: str) -> int:
    """The llama_ftype llama.cpp records, so an edgeq file is labelled like a llama-quantize one."""
    _check_preset(preset)
    return _FILE_TYPE[preset]


def _block_size(type_name: str) -> int:
    return get_format(type_name).block[1]


def _is_quantized(type_name: str) -> bool:
    """ggml_is_quantized: only block types go through the mixture rules and fallbacks."""
    return _block_size(type_name) > 1


def _layer_of(name: str) -> int:
    """The layer number llama.cpp's loader parses from a name; -1 for global tensors."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else -1


def llama_cpp_order(tensors: list[TensorInfo]) -> list[TensorInfo]:
    """The loader's weights_map order (layer, then name): the attn_v counter follows it."""
    return sorted(tensors, key=lambda t: (_layer_of(t.name), t.name.encode()))


def _n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    dims = len(ne)
    while dims > 1 and ne[dims - 1] <= 1:
        dims -= 1
    return max(dims, 1)


def _not_quantized_because(t: TensorInfo) -> str | None:
    """Why llama.cpp copies this tensor unchanged (edgeq's input is F32, so it stays f32), or None."""
    if _n_dims(t.ne) < 2:
        return "1-D tensor"
    if not t.name.endswith("weight"):
        return "not a weight"
    for fragment, why in _NEVER_QUANTIZED_FRAGMENTS:
        if fragment in t.name:
            return why
    return _NEVER_QUANTIZED_NAMES.get(t.name)


def _kind(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for fragment, kind in _CATEGORY_FRAGMENTS:
        if fragment in name:
            return kind
    return "other"


def _reject_experts(tensors: list[TensorInfo]) -> None:
    """The expert paths (layer parsed from names, n_expert == 8 bumps) are not modelled."""
    for t in tensors:
        if "_exps" in t.name or "ffn_gate_inp" in t.name or (len(t.ne) > 2 and any(d > 1 for d in t.ne[2:])):
            raise NotImplementedError(f"{t.name}: mixture-of-experts tensors are not supported by preset_types")


def _output_rule(preset: str, default: str, ne0: int, tied: bool) -> tuple[str, str]:
    """Output projection (or the tied embedding that doubles as it): more bits than the body."""
    who = "token_embd (tied, so it follows the output rule)" if tied else "output"
    if ne0 % _block_size(default) != 0:
        return "q8_0", f"{preset}: {who}, row length {ne0} does not hold {default} blocks -> q8_0"
    if preset in _LOW_BIT.split() or preset == "iq3_xxs":
        return "q5_k", f"{preset}: {who} -> q5_k"
    if default != "q8_0":
        return "q6_k", f"{preset}: {who} -> q6_k"
    return default, f"{preset}: {who} stays {default}"


def _mixture_rule(preset: str, kind: str, ctx: _Ctx) -> tuple[str, str] | None:
    for r in _RULES:
        if preset in r.presets and r.kind == kind and r.when(ctx):
            return r.to, f"{preset}: {r.why} -> {r.to}"
    return None


# the kinds a rule may single out; llama.cpp counts the first four in its running indices
_COUNTED_KINDS = ("attn_v", "ffn_down", "ffn_gate", "ffn_up")
_RULE_KINDS = (*_COUNTED_KINDS, "attn_output", "attn_k", "attn_q", "token_embd")


class _Counters:
    """llama.cpp's running per-kind indices, advanced only when a rule was consulted."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def next(self, kind: str) -> int:
        i = self.seen.get(kind, 0)
        self.seen[kind] = i + 1
        return i


@dataclass(frozen=True)
class _Model:
    """The model facts llama.cpp's rules consult (quantize_state_impl and hparams)."""

    tied: bool  # no output.weight: token_embd doubles as the output projection
    n_attn_v: int
    n_layer: int
    n_gqa: int
    is_70b: bool  # llama.cpp's LLM_TYPE_70B for the llama arch: 80 layers with GQA
    has_imatrix: bool = False


def _choose(preset: str, t: TensorInfo, model: _Model, counters: _Counters) -> PresetChoice:
    why_not = _not_quantized_because(t)
    if why_not is not None:
        return PresetChoice("f32", f"not quantized: {why_not}", None)
    default = _DEFAULT_TYPE[preset]
    if not _is_quantized(default):
        return PresetChoice(default, f"{preset}: every quantizable weight is {default}", None)
    kind = _kind(t.name)
    if kind == "output" or (kind == "token_embd" and model.tied):
        wanted, why = _output_rule(preset, default, t.ne[0], kind == "token_embd")
    elif kind in _RULE_KINDS:
        n = model.n_attn_v if kind == "attn_v" else model.n_layer
        i = counters.next(kind) if kind in _COUNTED_KINDS else 0
        ruled = _mixture_rule(preset, kind, _Ctx(i, n, model.n_gqa, model.has_imatrix))
        if ruled is not None:
            wanted, why = ruled
        elif kind in _COUNTED_KINDS[:2] + ("attn_output",):       # (how edgeq has always worded these)
            wanted, why = default, f"{preset}: {kind} default {default}"
        else:
            wanted, why = default, f"{preset}: default {default}"
        if kind == "attn_v" and model.is_70b and wanted in ("q3_k", "q4_k") and preset not in _LOW_BIT.split():
            wanted, why = "q5_k", f"{why}; 70B-class model (80 layers, GQA) bumps attn_v -> q5_k"
    else:
        wanted, why = default, f"{preset}: default {default}"
    got, fell = shape_fallback(wanted, t.ne[0])
    if fell is None:
        return PresetChoice(got, why, None)
    return PresetChoice(got, f"{why}; {fell}", wanted)


def _model_facts(tensors: list[TensorInfo], n_head: int, n_head_kv: int, n_layer: int | None,
                 has_imatrix: bool = False) -> _Model:
    names = {t.name for t in tensors}
    if n_layer is None:
        n_layer = max((_layer_of(n) for n in names), default=-1) + 1
    return _Model(
        tied="output.weight" not in names,
        n_attn_v=sum(_kind(n) == "attn_v" for n in names),
        n_layer=n_layer,
        n_gqa=n_head // n_head_kv if n_head_kv else 0,
        is_70b=n_layer == 80 and n_head != n_head_kv,
        has_imatrix=has_imatrix,
    )


def preset_types(
    preset: str,
    tensors: list[TensorInfo],
    n_head: int,
    n_head_kv: int,
    *,
    n_layer: int | None = None,
    has_imatrix: bool = False,
) -> dict[str, PresetChoice]:
    """Per tensor name, the type llama.cpp's quantizer writes for `preset` on this llama model.

    `n_layer` is the model's block_count; by default the highest `blk.N` + 1.
    `has_imatrix`: quantizing with an importance matrix, which changes a few
    choices (q4_0/q5_0 give the first eighth of ffn_down q4_1/q5_1).
    """
    _check_preset(preset)
    _reject_experts(tensors)
    model = _model_facts(tensors, n_head, n_head_kv, n_layer, has_imatrix)
    counters = _Counters()
    return {t.name: _choose(preset, t, model, counters) for t in llama_cpp_order(tensors)}
