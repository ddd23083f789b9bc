"""One tokenizer description for every backend, with llama.cpp as the reference.

A bundle exported for onnxruntime or TVM must turn a prompt into exactly the
ids llama.cpp would produce from the same GGUF, or the two deployments of one
model disagree from the first token.  So the GGUF tokenizer metadata is
captured in a `TokenizerSpec` (stored as JSON in bundles) and turned into a
Hugging Face `tokenizers.Tokenizer` (saved as tokenizer.json beside the
model) that mirrors what llama.cpp's `llama-vocab.cpp` does:

* the pre-tokenizer regexes llama.cpp picks from `tokenizer.ggml.pre`,
  applied one after another, each splitting the pieces of the previous one;
* byte-level BPE with the GGUF merges, first rank wins, and `ignore_merges`
  for the pre types where llama.cpp sets it;
* the token attributes llama.cpp derives by text (end-of-generation and FIM
  markers become control tokens even when the GGUF says "normal");
* control and unknown tokens are matched in the text only when
  parse_special is on, user-defined ones always.

Two vocabulary models are read: "gpt2" (byte-level BPE, through the
`tokenizers` library as above) and "llama" (SentencePiece: token scores,
byte-fallback tokens, a space prefix; tokenized by `runtime/spm.py`, a
replica of llama.cpp's own SPM algorithm). Others are refused.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from edgeq.core.errors import EdgeqError, RequestError
from edgeq.runtime.spm import SpmTokenizer

# llama.cpp token types (GGUF tokenizer.ggml.token_type).
TYPE_UNDEFINED = 0
TYPE_NORMAL = 1
TYPE_UNKNOWN = 2
TYPE_CONTROL = 3
TYPE_USER_DEFINED = 4
TYPE_UNUSED = 5
TYPE_BYTE = 6

# llama.cpp token attributes (llama.h), the flags its tokenizer actually reads.
_ATTR_UNDEFINED = 0
_ATTR_UNKNOWN = 1 << 0
_ATTR_UNUSED = 1 << 1
_ATTR_NORMAL = 1 << 2
_ATTR_CONTROL = 1 << 3
_ATTR_USER_DEFINED = 1 << 4
_ATTR_BYTE = 1 << 5

_TYPE_TO_ATTR = {
    TYPE_NORMAL: _ATTR_NORMAL,
    TYPE_UNKNOWN: _ATTR_UNKNOWN,
    TYPE_CONTROL: _ATTR_CONTROL,
    TYPE_USER_DEFINED: _ATTR_USER_DEFINED,
    TYPE_UNUSED: _ATTR_UNUSED,
    TYPE_BYTE: _ATTR_BYTE,
}

SUPPORTED_MODELS = ("gpt2", "llama")


@dataclass(frozen=True)
class TokenizerSpec:
    """What a bundle carries so any backend (llama.cpp, onnxruntime, TVM) can tokenize identically."""

    model: str
    pre: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    # SentencePiece ("llama") vocabularies only: float32 scores per token (what llama.cpp merges by) and whether
    # each piece of text gets a leading space (tokenizer.ggml.add_space_prefix). Left out of a "gpt2" spec's JSON.
    scores: tuple[float, ...] | None = None
    add_space_prefix: bool = False


# ---------------------------------------------------------------------------
# Pre-tokenizer regexes, copied from llm_tokenizer_bpe in llama-vocab.cpp.
#
# llama.cpp runs a few of them with hand-written splitters (unicode.cpp:
# gpt2, llama3, qwen2, qwen35, the newline splitter) and the rest with
# std::regex over a text where every non-ASCII code point is collapsed to
# its Unicode category.  Both behave like the Oniguruma regexes below
# (checked against llama.cpp on random text for every table entry), after
# three translations, each noted where it applies: \p{Lu}..\p{Lo} collapse
# to "letter"; "$" ends the current piece; literal ranges never match
# non-ASCII whitespace.
# ---------------------------------------------------------------------------

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_RE_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_RE_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_RE_QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_JAIS2 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)"
    r"|\s{1,2}(?!\S)|\s{1}"
)
_RE_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_GRANITE_EMB_MULTI = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
_RE_SEED_CODER = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_RE_EXAONE_MOE = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
_RE_MINICPM5 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_RE_YOUTU = (
    # llama.cpp's \p{Lu}..\p{Lo} all mean "any letter" (see above).
    r"[^\r\n\p{L}\p{N}]?[\p{L}\p{L}\p{L}\p{L}\p{M}]*[\p{L}\p{L}\p{L}\p{M}]+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{L}\p{L}\p{L}\p{M}]+[\p{L}\p{L}\p{L}\p{M}]*" + _CONTRACTIONS + "?"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Non-ASCII literals are written as escapes: editors and tools that normalise
# Unicode (NFC) would otherwise silently change these ranges.
_RE_HAN_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
# These two are written exactly as llama-vocab.cpp spells them (C and Python escapes agree here).
_RE_DEEPSEEK3 = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
)
_RE_SPARK2_5 = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+"
)
# llama.cpp runs regexes without \p{..} through std::wregex on a text where
# every non-ASCII whitespace code point has been replaced by U+000B, so a
# literal range never matches U+3000, U+2003, ...: "&&\S" and the shortened
# U+3000 range below say the same in Oniguruma.
_RE_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff&&\\S]+"
_RE_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
    "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_RE_DEEPSEEK_LLM_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002]+"
_RE_YOUTU_CJK = (
    "[\uac00-\ud7a3\u3131-\u318e]+"
    "|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f\ufe30-\ufe4f]+"
    "|[\u3105-\u312f]+|" + _RE_HAN_KANA
)
_RE_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"


@dataclass(frozen=True)
class _PreConfig:
    """How llama.cpp tokenizes for one `tokenizer.ggml.pre` value."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False  # llama.cpp's default when the GGUF has no add_bos_token key
    default_special: int | None = 11  # llama.cpp's BOS/EOS default for gpt2 vocabs (GPT-NeoX legacy)


_GPT2 = _PreConfig((_RE_GPT2,))
_STARCODER = _PreConfig((r"\p{N}", _RE_GPT2))
_LLAMA3 = _PreConfig((_RE_LLAMA3,), ignore_merges=True, add_bos=True)
_DBRX = _PreConfig((_RE_LLAMA3,))
_QWEN2 = _PreConfig((_RE_QWEN2,))
_DEEPSEEK3 = _PreConfig((r"\p{N}{1,3}", _RE_HAN_KANA, _RE_DEEPSEEK3))

# Names exactly as llama-vocab.cpp accepts them.  Left out on purpose: pre
# types that need per-token lstrip/rstrip or SEP handling a spec does not
# carry (jina-v2-*, modern-bert, roberta-bpe, jina-v1-en), and those with
# custom splitters or non-byte-level text (kimi-k2, afmoe, tiny_aya,
# cohere2moe, superbpe, chameleon, gemma4, sarvam-moe, whitespace, ...).
_PRE_TYPES: dict[str, _PreConfig] = {
    "default": _PreConfig(
        (r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    ),
    **{name: _GPT2 for name in (
        "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "a.x-4.0", "mellum", "mpt", "olmo",
        "jais", "trillion", "granite-docling", "exaone4",
    )},
    **{name: _STARCODER for name in (
        "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2",
    )},
    **{name: _LLAMA3 for name in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
    )},
    "dbrx": _DBRX,
    "smaug-bpe": _DBRX,
    "chatglm-bpe": _PreConfig((_RE_LLAMA3,), default_special=None),
    "glm4": _PreConfig((_RE_LLAMA3,), ignore_merges=True, default_special=None),
    "glm5": _PreConfig((_RE_LLAMA3,), ignore_merges=True, default_special=None),
    "jais-2": _PreConfig((_RE_JAIS2,)),
    **{name: _QWEN2 for name in (
        "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open",
    )},
    "qwen35": _PreConfig((_RE_QWEN35,)),
    "deepseek-llm": _PreConfig(
        # llama.cpp's "\s+$" runs on one piece at a time: $ is the piece's end.
        ("[\r\n]", _RE_DEEPSEEK_LLM_LETTERS, _RE_DEEPSEEK_LLM_PUNCT, r"\s+\z", _RE_CJK_HANGUL, r"\p{N}+"),
    ),
    "deepseek-coder": _PreConfig(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _RE_CJK_HANGUL, r"\p{N}")),
    **{name: _DEEPSEEK3 for name in ("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4")},
    "spark2_5": _PreConfig((r"\p{N}{1,3}", _RE_HAN_KANA, _RE_SPARK2_5, r"\p{N}")),
    "youtu": _PreConfig(
        (_RE_YOUTU_CJK, _RE_YOUTU), ignore_merges=True
    ),
    "falcon": _PreConfig((r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]")),
    **{name: _PreConfig((_RE_BLOOM,)) for name in ("poro-chat", "bloom", "gpt3-finnish")},
    "viking": _PreConfig((_RE_BLOOM, r"\p{N}")),
    "tekken": _PreConfig((_RE_TEKKEN,), ignore_merges=True, add_bos=True),
    **{name: _PreConfig((_RE_GPT4O,)) for name in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")},
    "granite-embed-multi-97m": _PreConfig((_RE_GRANITE_EMB_MULTI,), ignore_merges=True),
    **{name: _PreConfig((_RE_BAILINGMOE,)) for name in ("bailingmoe", "bailingmoe2", "llada-moe")},
    "seed-coder": _PreConfig((_RE_SEED_CODER,)),
    "ufakzeka": _PreConfig((_RE_UFAKZEKA,)),
    "grok-2": _QWEN2,
    "laguna": _PreConfig((r"[^\n]+|[\n]+", _RE_QWEN2)),
    "exaone-moe": _PreConfig((_RE_EXAONE_MOE,)),
    "minicpm5": _PreConfig((r"\p{N}{1,3}", _RE_MINICPM5), ignore_merges=True),
}

SUPPORTED_PRE_TYPES = tuple(sorted(_PRE_TYPES))


def _pre_config(pre: str, path=None) -> _PreConfig:
    """Unknown pre types are refused: guessing a regex silently changes token ids."""
    try:
        return _PRE_TYPES[pre]
    except KeyError:
        hint = " (llama.cpp spells it 'gpt-2')" if pre == "gpt2" else ""
        raise EdgeqError(path, f"unsupported tokenizer pre type '{pre}'{hint}") from None


# ---------------------------------------------------------------------------
# GGUF metadata -> spec
# ---------------------------------------------------------------------------

_KEY = "tokenizer.ggml."


def spec_from_gguf_metadata(meta: Mapping[str, Any], path=None) -> TokenizerSpec:
    """Read the tokenizer the way llama.cpp's llama_vocab::load does, defaults included."""
    model = _require_str(meta, _KEY + "model", path)
    if model not in SUPPORTED_MODELS:
        raise EdgeqError(path, f"unsupported tokenizer model '{model}' (supported: {', '.join(SUPPORTED_MODELS)})")
    _refuse_per_model_attributes(meta, path)
    tokens = _require_str_list(meta, _KEY + "tokens", path)
    n = len(tokens)
    if model == "llama":
        # llama.cpp's SPM defaults: BOS 1, EOS 2, UNK 0, add BOS, a space prefix; no pre type, no merges
        config = _PreConfig((), add_bos=True)
        pre, merges, scores = "default", (), _scores(meta, n, path)
        defaults = {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}
    else:
        # A GGUF without a pre type is tokenized with "default" by llama.cpp (it only warns).
        pre = meta.get(_KEY + "pre") or "default"
        if not isinstance(pre, str):
            raise EdgeqError(path, f"{_KEY}pre is not a string")
        config = _pre_config(pre, path)
        merges, scores = _require_str_list(meta, _KEY + "merges", path), None
        defaults = {"bos_token_id": config.default_special, "eos_token_id": config.default_special}
    spec = TokenizerSpec(
        model=model,
        pre=pre,
        tokens=tokens,
        token_types=_token_types(meta, n, path),
        merges=merges,
        bos_id=_special_id(meta, "bos_token_id", n, defaults.get("bos_token_id"), path),
        eos_id=_special_id(meta, "eos_token_id", n, defaults.get("eos_token_id"), path),
        eot_id=_special_id(meta, "eot_token_id", n, None, path),
        pad_id=_special_id(meta, "padding_token_id", n, None, path),
        unk_id=_special_id(meta, "unknown_token_id", n, defaults.get("unknown_token_id"), path),
        add_bos=_flag(meta, "add_bos_token", config.add_bos, path),
        add_eos=_flag(meta, "add_eos_token", False, path),
        chat_template=_optional_str(meta, "tokenizer.chat_template", path),
        scores=scores,
        add_space_prefix=_flag(meta, "add_space_prefix", True, path) if model == "llama" else False,
    )
    _check_spec(spec, path)
    return spec


def _scores(meta: Mapping[str, Any], n_tokens: int, path) -> tuple[float, ...]:
    """float32 scores (llama.cpp also takes int32 ones); absent scores are all 0, which llama.cpp allows."""
    value = meta.get(_KEY + "scores")
    if value is None:
        return (0.0,) * n_tokens
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in value):
        raise EdgeqError(path, f"invalid {_KEY}scores (expected a list of numbers)")
    if len(value) < n_tokens:
        raise EdgeqError(path, f"{_KEY}scores has {len(value)} entries for {n_tokens} tokens")
    return tuple(float32(v) for v in value[:n_tokens])


def float32(x: float) -> float:
    """The value as llama.cpp holds it (a C float), so edgeq's merge order is llama.cpp's, ties included."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def _refuse_per_model_attributes(meta: Mapping[str, Any], path) -> None:
    """llama.cpp sets lstrip/rstrip on some tokens by model name; a spec cannot say so."""
    name = str(meta.get("general.name", "")).lower()
    arch = str(meta.get("general.architecture", ""))
    if any(s in name for s in ("phi-3", "phi3", "modern-bert")) or arch in ("nomic-bert-moe", "jina-bert-v3"):
        raise EdgeqError(path, f"unsupported tokenizer: llama.cpp strips spaces around special tokens for '{name or arch}'")


def _require_str(meta: Mapping[str, Any], key: str, path) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not value:
        raise EdgeqError(path, f"missing or invalid {key} (expected a string)")
    return value


def _optional_str(meta: Mapping[str, Any], key: str, path) -> str | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise EdgeqError(path, f"invalid {key} (expected a string)")
    return value


def _require_str_list(meta: Mapping[str, Any], key: str, path) -> tuple[str, ...]:
    value = meta.get(key)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise EdgeqError(path, f"missing or invalid {key} (expected a list of strings)")
    return tuple(value)


def _token_types(meta: Mapping[str, Any], n_tokens: int, path) -> tuple[int, ...]:
    """Absent types mean "all normal" to llama.cpp; extra entries past the vocab are ignored."""
    value = meta.get(_KEY + "token_type")
    if value is None:
        return (TYPE_NORMAL,) * n_tokens
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise EdgeqError(path, f"invalid {_KEY}token_type (expected a list of integers)")
    if len(value) < n_tokens:
        raise EdgeqError(path, f"{_KEY}token_type has {len(value)} entries for {n_tokens} tokens")
    return tuple(int(v) for v in value[:n_tokens])


def _special_id(meta: Mapping[str, Any], name: str, n_tokens: int, default: int | None, path) -> int | None:
    """llama.cpp falls back to a default id when the key is absent, and drops defaults past the vocab."""
    key = _KEY + name
    value = meta.get(key)
    if value is None:
        return default if default is not None and default < n_tokens else None
    if not _is_int(value) or not 0 <= value < n_tokens:
        raise EdgeqError(path, f"invalid {key}: {value!r} is not a token id below {n_tokens}")
    return int(value)


def _flag(meta: Mapping[str, Any], name: str, default: bool, path) -> bool:
    value = meta.get(_KEY + name)
    if value is None:
        return default
    if not isinstance(value, (bool, int)):
        raise EdgeqError(path, f"invalid {_KEY}{name} (expected a boolean)")
    return bool(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_spec(spec: TokenizerSpec, path=None) -> None:
    """Refuse what llama.cpp would refuse or crash on, so no bundle carries a broken tokenizer."""
    if spec.model not in SUPPORTED_MODELS:
        raise EdgeqError(path, f"unsupported tokenizer model '{spec.model}'")
    n = len(spec.tokens)
    if n == 0:
        raise EdgeqError(path, "tokenizer has no tokens")
    if len(spec.token_types) != n:
        raise EdgeqError(path, f"tokenizer has {len(spec.token_types)} token types for {n} tokens")
    if spec.model == "llama":
        if spec.scores is None or len(spec.scores) != n:
            raise EdgeqError(path, f"SentencePiece tokenizer has {len(spec.scores or ())} scores for {n} tokens")
        _check_byte_fallback(spec, path)
    else:
        _pre_config(spec.pre, path)
        if spec.scores is not None or spec.add_space_prefix:
            raise EdgeqError(path, "a byte-level BPE tokenizer has no scores or space prefix")
    seen: set[str] = set()
    for text in _token_texts(spec):
        if text in seen:  # llama.cpp aborts on these (one text must map to one id)
            raise EdgeqError(path, f"duplicate token {text!r} in the vocabulary")
        seen.add(text)
    for name in ("bos_id", "eos_id", "eot_id", "pad_id", "unk_id"):
        value = getattr(spec, name)
        if value is not None and (not _is_int(value) or not 0 <= value < n):
            raise EdgeqError(path, f"tokenizer {name} {value!r} is not a token id below {n}")
    if spec.add_bos and spec.bos_id is None:
        raise EdgeqError(path, "tokenizer adds a BOS token but has no BOS id")
    if spec.add_eos and spec.eos_id is None:
        raise EdgeqError(path, "tokenizer adds an EOS token but has no EOS id")


def _check_byte_fallback(spec: TokenizerSpec, path) -> None:
    """llama.cpp turns a character that is no token into its UTF-8 bytes' <0xXX> tokens (or, for ASCII, the
    one-character token) and aborts when one is missing: such a vocabulary cannot tokenize arbitrary text."""
    ids = set(_token_texts(spec))
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in ids and not (b < 0x80 and chr(b) in ids)]
    if missing:
        raise EdgeqError(path, f"SentencePiece vocabulary lacks byte-fallback token <0x{missing[0]:02X}> "
                               f"({len(missing)} of 256 missing): llama.cpp cannot tokenize text outside its "
                               "vocabulary without them")


def _token_texts(spec: TokenizerSpec) -> tuple[str, ...]:
    """llama.cpp renames empty tokens so that every text maps back to one id."""
    return tuple(t if t else f"[EMPTY_{i}]" for i, t in enumerate(spec.tokens))


# ---------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------


_SPM_ONLY = ("scores", "add_space_prefix")


def spec_to_json(spec: TokenizerSpec) -> dict:
    """Plain lists and scalars, in field order, so the same spec always writes the same bytes (a byte-level
    BPE spec without the SentencePiece-only fields, as bundles wrote it before they existed)."""
    out: dict[str, Any] = {}
    for f in fields(spec):
        if spec.model != "llama" and f.name in _SPM_ONLY:
            continue
        value = getattr(spec, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def spec_from_json(d: Mapping[str, Any], path=None) -> TokenizerSpec:
    """Bundles are untrusted input: every field is type-checked before use."""
    if not isinstance(d, Mapping):
        raise EdgeqError(path, "tokenizer spec is not a JSON object")
    names = [f.name for f in fields(TokenizerSpec)]
    missing = [name for name in names if name not in d and name not in _SPM_ONLY]
    if missing:
        raise EdgeqError(path, f"tokenizer spec lacks {', '.join(missing)}")
    for name in ("model", "pre"):
        if not isinstance(d[name], str):
            raise EdgeqError(path, f"tokenizer spec field {name} is not a string")
    for name in ("tokens", "merges"):
        if not isinstance(d[name], list) or not all(isinstance(v, str) for v in d[name]):
            raise EdgeqError(path, f"tokenizer spec field {name} is not a list of strings")
    if not isinstance(d["token_types"], list) or not all(_is_int(v) for v in d["token_types"]):
        raise EdgeqError(path, "tokenizer spec field token_types is not a list of integers")
    for name in ("add_bos", "add_eos", "add_space_prefix"):
        if not isinstance(d.get(name, False), bool):
            raise EdgeqError(path, f"tokenizer spec field {name} is not a boolean")
    if d["chat_template"] is not None and not isinstance(d["chat_template"], str):
        raise EdgeqError(path, "tokenizer spec field chat_template is not a string")
    scores = d.get("scores")
    if scores is not None and (not isinstance(scores, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores)):
        raise EdgeqError(path, "tokenizer spec field scores is not a list of numbers")
    values = {name: tuple(d[name]) if isinstance(d.get(name), list) else d.get(name) for name in names}
    values["scores"] = None if scores is None else tuple(float32(v) for v in scores)
    values["add_space_prefix"] = bool(d.get("add_space_prefix", False))
    spec = TokenizerSpec(**values)
    _check_spec(spec, path)
    return spec


# ---------------------------------------------------------------------------
# Token attributes as llama.cpp derives them
# ---------------------------------------------------------------------------

# Texts llama.cpp treats as end of generation (llama_vocab::impl::load).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
# FIM markers found by text; llama.cpp makes them control tokens, and the last three end generation.
_FIM_PRE = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
            "<|code_prefix|>", "<|prefix|>")
_FIM_SUF = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
            "<|code_suffix|>", "<|suffix|>")
_FIM_MID = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
            "<|code_middle|>", "<|middle|>")
_FIM_PAD = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP = ("<|file_sep|>",)
# gpt-oss: llama.cpp always renders these, so they are user-defined whatever the GGUF says.
_FORCED_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


@dataclass(frozen=True)
class _Attributes:
    attrs: tuple[int, ...]
    eog: frozenset[int]


def _llama_cpp_attributes(spec: TokenizerSpec) -> _Attributes:
    """Replay llama.cpp's by-text fix-ups of token attributes and its end-of-generation set.

    Model converters often leave markers like <|endoftext|> typed "normal";
    llama.cpp promotes them to control (so they are only parsed with
    parse_special) and stops on them.  Matching its ids requires the same
    promotion.  Where llama.cpp keeps only one of several candidates for a
    FIM slot (in hash order), all candidates are taken here.
    """
    texts = _token_texts(spec)
    ids = {t: i for i, t in enumerate(texts)}
    attrs = [_TYPE_TO_ATTR.get(t, _ATTR_UNDEFINED) for t in spec.token_types]
    eog: set[int] = set()

    def found(candidates: Iterable[str]) -> list[int]:
        return [ids[t] for t in candidates if t in ids]

    for group in (_FIM_PRE, _FIM_SUF, _FIM_MID, _FIM_PAD, _FIM_REP, _FIM_SEP):
        for i in found(group):
            attrs[i] |= _ATTR_CONTROL
    eog.update(found(_FIM_PAD + _FIM_REP + _FIM_SEP))
    for i in found(sorted(_EOG_TEXTS)):
        attrs[i] |= _ATTR_CONTROL
        eog.add(i)
    for i in found(_FORCED_USER_DEFINED):
        attrs[i] = _ATTR_USER_DEFINED
    eog.update(i for i in (spec.eos_id, spec.eot_id) if i is not None)
    _drop_harmony_end(texts, attrs, eog)
    _drop_normal_eos_marker(texts, attrs, eog)
    return _Attributes(tuple(attrs), frozenset(eog))


def _drop_harmony_end(texts: tuple[str, ...], attrs: list[int], eog: set[int]) -> None:
    """gpt-oss and solar-open use <|end|> between messages, not at the end of generation."""
    eog_texts = {texts[i]: i for i in eog}
    has_call = "<|call|>" in eog_texts or "<|calls|>" in eog_texts
    has_end = "<|end|>" in eog_texts
    if has_end and has_call and ("<|return|>" in eog_texts or "<|flush|>" in eog_texts):
        end = eog_texts["<|end|>"]
        eog.discard(end)
        attrs[end] = _ATTR_USER_DEFINED


def _drop_normal_eos_marker(texts: tuple[str, ...], attrs: list[int], eog: set[int]) -> None:
    """gemma4 and plamo have an ordinary </s>; llama.cpp demotes it when their own markers exist."""
    eog_texts = {texts[i]: i for i in eog}
    if "</s>" in eog_texts and ("<|tool_response>" in eog_texts or "<|plamo:eos|>" in eog_texts):
        s = eog_texts["</s>"]
        eog.discard(s)
        attrs[s] = _ATTR_NORMAL


def stop_ids(spec: TokenizerSpec) -> frozenset[int]:
    """The ids llama.cpp ends generation on (llama_vocab_is_eog), so every backend stops alike."""
    return _llama_cpp_attributes(spec).eog


# ---------------------------------------------------------------------------
# Hugging Face tokenizer
# ---------------------------------------------------------------------------


def build_tokenizer(spec: TokenizerSpec):
    """What gives llama.cpp's ids for this spec: for byte-level BPE a `tokenizers.Tokenizer` (which can be saved
    as tokenizer.json), for SentencePiece vocabularies llama.cpp's SPM algorithm (`runtime/spm.py`)."""
    _check_spec(spec)
    if spec.model == "llama":
        return _spm_tokenizer(spec)
    from tokenizers import Tokenizer, decoders, models

    config = _pre_config(spec.pre)
    texts = _token_texts(spec)
    vocab = {t: i for i, t in enumerate(texts)}
    bpe = models.BPE(
        vocab=vocab,
        merges=_merge_pairs(spec.merges, vocab),
        ignore_merges=config.ignore_merges,
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(config)
    tok.decoder = decoders.ByteLevel()
    _add_special_tokens(tok, spec, texts)
    post = _post_processor(spec, texts)
    if post is not None:
        tok.post_processor = post
    return tok


def _spm_tokenizer(spec: TokenizerSpec) -> SpmTokenizer:
    attrs = _llama_cpp_attributes(spec).attrs
    special = _ATTR_CONTROL | _ATTR_UNKNOWN

    def kind(attr: int) -> str:      # llama.cpp's token_to_piece, in its order of tests
        if attr & (special | _ATTR_USER_DEFINED):
            return "text"
        if attr & _ATTR_NORMAL:
            return "normal"
        return "byte" if attr & _ATTR_BYTE else "none"

    return SpmTokenizer(
        _token_texts(spec), spec.scores,
        partition_ids=[i for i, a in enumerate(attrs) if a & (special | _ATTR_USER_DEFINED)],
        always_ids=[i for i, a in enumerate(attrs) if a & _ATTR_USER_DEFINED and not a & special],
        piece_kind=[kind(a) for a in attrs], bos_id=spec.bos_id, eos_id=spec.eos_id, add_bos=spec.add_bos,
        add_eos=spec.add_eos, add_space_prefix=spec.add_space_prefix)


def _merge_pairs(merges: Iterable[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """GGUF merges as pairs, split and deduplicated the way llama.cpp reads them.

    llama.cpp splits at the first space after the first character and keeps
    the first rank of a repeated pair; `tokenizers` would keep the last.
    Pairs whose parts or result are not tokens cannot be expressed in a
    `tokenizers` BPE model and are dropped (converted vocabularies have none).
    """
    seen: set[tuple[str, str]] = set()
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)
        if cut < 0:
            continue
        pair = (merge[:cut], merge[cut + 1:])
        if pair in seen or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            continue
        seen.add(pair)
        pairs.append(pair)
    return pairs


def _pre_tokenizer(config: _PreConfig):
    """Each llama.cpp regex splits the pieces left by the previous one, keeping all text."""
    from tokenizers import Regex, pre_tokenizers

    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in config.regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _add_special_tokens(tok, spec: TokenizerSpec, texts: tuple[str, ...]) -> None:
    """Control and unknown tokens are `special` (skipped when parse_special is off); user-defined are not."""
    from tokenizers import AddedToken

    attrs = _llama_cpp_attributes(spec).attrs
    special, user = [], []
    for i, attr in enumerate(attrs):
        if attr & (_ATTR_CONTROL | _ATTR_UNKNOWN):
            special.append(AddedToken(texts[i], special=True, normalized=False, lstrip=False, rstrip=False))
        elif attr & _ATTR_USER_DEFINED:
            user.append(AddedToken(texts[i], special=False, normalized=False, lstrip=False, rstrip=False))
    tok.add_special_tokens(special)
    tok.add_tokens(user)


def _post_processor(spec: TokenizerSpec, texts: tuple[str, ...]):
    """BOS/EOS as llama.cpp adds them with add_special, so tokenizer.json users get them too."""
    from tokenizers import processors

    if not spec.add_bos and not spec.add_eos:
        return None
    head = [texts[spec.bos_id]] if spec.add_bos else []
    tail = [texts[spec.eos_id]] if spec.add_eos else []
    single = head + ["$A"] + tail
    pair = head + ["$A"] + tail + head + ["$B"] + tail
    used = {texts[i]: i for i in (spec.bos_id if spec.add_bos else None, spec.eos_id if spec.add_eos else None)
            if i is not None}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(used.items()))


def encode(tok, spec: TokenizerSpec, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
    """llama_tokenize(text, add_special, parse_special), through the Hugging Face tokenizer.

    Not thread-safe for one `tok`: parse_special toggles the tokenizer's
    encode_special_tokens flag for the duration of the call.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    if isinstance(tok, SpmTokenizer):
        return tok.tokenize(text, add_special, parse_special)
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = not parse_special
    try:
        return list(tok.encode(text, add_special_tokens=add_special).ids)
    finally:
        tok.encode_special_tokens = previous


def decode(tok, ids: Iterable[int]) -> str:
    """Text of the ids, control tokens included, as llama.cpp detokenizes with special=True."""
    if isinstance(tok, SpmTokenizer):
        return tok.detokenize(ids)
    return tok.decode(list(ids), skip_special_tokens=False)


# ---------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------


MAX_MESSAGES = 4096


def chat_messages(messages: str | Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """An OpenAI-style message list, checked and reduced to what chat templates read: `role` and text `content`.

    A string is one user message. Content may be a string, a list of text parts (`{"type": "text", "text": ...}`)
    or null (an assistant turn that only called tools). OpenAI's `developer` role is the templates' `system`.
    Whether a role is allowed where it stands is the template's own rule (some have no system role)."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"{len(messages)} messages; at most {MAX_MESSAGES}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not m["role"]:
            raise RequestError(f"messages[{i}] has no role", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise RequestError(f"messages[{i}].content is not text", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def render_chat(spec: TokenizerSpec, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render the model's own chat template the way transformers and llama.cpp do.

    Both compile templates with trim_blocks and lstrip_blocks on, a sandbox,
    loop controls, a non-escaping tojson and raise_exception; so does this.
    """
    if spec.chat_template is None:
        raise RequestError("the model has no chat template (tokenizer.chat_template): send a plain prompt",
                           param="messages")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    texts = _token_texts(spec)
    try:
        return env.from_string(spec.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=texts[spec.bos_id] if spec.bos_id is not None else "",
            eos_token=texts[spec.eos_id] if spec.eos_id is not None else "",
        )
    except jinja2.TemplateError as exc:
        raise RequestError(f"chat template failed: {exc}", param="messages") from None


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


__all__ = [
    "TokenizerSpec",
    "SUPPORTED_MODELS",
    "SUPPORTED_PRE_TYPES",
    "spec_from_gguf_metadata",
    "spec_to_json",
    "spec_from_json",
    "build_tokenizer",
    "encode",
    "decode",
    "stop_ids",
    "render_chat",
    "chat_messages",
]
