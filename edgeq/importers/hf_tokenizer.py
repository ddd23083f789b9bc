"""A Hugging Face tokenizer folder -> edgeq's TokenizerSpec (what llama.cpp would load from a GGUF).

SentencePiece vocabularies (Llama-2, Mistral, TinyLlama ...: tokenizer.json with byte fallback and U+2581
spaces, or only a tokenizer.model) become llama.cpp's "llama" vocabulary: tokens, scores, types, the space
prefix (see `_sentencepiece_bpe_meta` for where scores come from). For byte-level BPE vocabularies this is
the reverse of `edgeq.runtime.tokenizer.build_tokenizer`, and does what llama.cpp's `convert_hf_to_gguf.py`
does:

* tokens by id from tokenizer.json's BPE vocabulary and added tokens; ids the
  embedding has but the tokenizer lacks become `[PAD<id>]` (unused);
* added tokens are control tokens when marked special or when they look
  special (`<|...|>`), user-defined otherwise; all others are normal;
* the pre-tokenizer is recognised from its structure and mapped to the
  `tokenizer.ggml.pre` name whose regexes llama.cpp runs (SmolLM's digits +
  byte-level split is "smollm", Llama 3's split is "llama-bpe", Qwen2's is
  "qwen2", plain byte-level is "gpt-2"); a setup with no llama.cpp
  equivalent is refused, because guessing changes token ids;
* special tokens and add_bos/add_eos from tokenizer_config.json (then
  config.json, then the post-processor), the chat template from
  tokenizer_config.json or chat_template.jinja.

The result goes through `spec_from_gguf_metadata`, so llama.cpp's defaults
and every check on GGUF tokenizers apply unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgeq.core.errors import EdgeqError
from edgeq.importers.sentencepiece_model import read_sentencepiece_model
from edgeq.runtime import tokenizer as _tok
from edgeq.runtime.tokenizer import (
    TYPE_BYTE,
    TYPE_CONTROL,
    TYPE_NORMAL,
    TYPE_UNKNOWN,
    TYPE_UNUSED,
    TYPE_USER_DEFINED,
    TokenizerSpec,
    spec_from_gguf_metadata,
)

MAX_JSON_BYTES = 256 * 2**20

# Hugging Face spells some regexes differently from llama-vocab.cpp; same language, same splits.
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# The split that tokenizers' ByteLevel(use_regex=True) applies: GPT-2's.
_BYTELEVEL_REGEX = _tok._RE_GPT2

# When several llama.cpp names run the same regexes and flags, the first of these that fits is written.
_PREFERRED = ("smollm", "gpt-2", "llama-bpe", "qwen2", "default", "starcoder", "dbrx", "tekken", "gpt-4o",
              "deepseek-v3", "deepseek-llm", "deepseek-coder", "falcon", "bloom")


def _read_json(path: Path, what: str) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise EdgeqError(path, f"{what} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EdgeqError(path, f"{what} is not valid JSON ({exc})") from None


def spec_from_hf_folder(folder: str | Path, vocab_size: int, config: dict | None = None) -> TokenizerSpec:
    """The tokenizer of an HF model folder; `vocab_size` is the embedding's row count.

    tokenizer.json is read when present (byte-level BPE, or SentencePiece-style BPE with byte fallback); a
    SentencePiece tokenizer.model only when it is the folder's only tokenizer file.

    The files are untrusted: every structure is checked where it is read, and a value of a type the format
    does not allow anywhere else is one line naming the file, not a Python error."""
    try:
        return _spec_from_hf_folder(Path(folder), vocab_size, config)
    except (TypeError, AttributeError, KeyError, IndexError) as exc:
        raise EdgeqError(Path(folder) / "tokenizer.json", f"unexpected structure in the tokenizer files "
                                                          f"({type(exc).__name__}: {exc})") from None


def _spec_from_hf_folder(folder: Path, vocab_size: int, config: dict | None) -> TokenizerSpec:
    tj_path = folder / "tokenizer.json"
    sp_path = folder / "tokenizer.model"
    tc_path = folder / "tokenizer_config.json"
    tc = _read_json(tc_path, "tokenizer_config.json") if tc_path.is_file() else {}
    if not isinstance(tc, dict):
        raise EdgeqError(tc_path, "tokenizer_config.json is not a JSON object")
    config = config or {}
    post = None
    if tj_path.is_file():
        tj = _read_json(tj_path, "tokenizer.json")
        if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
            raise EdgeqError(tj_path, "tokenizer.json has no model object")
        post = tj.get("post_processor")
        if tj["model"].get("type") == "BPE" and tj["model"].get("byte_fallback"):
            meta, added = _sentencepiece_bpe_meta(tj, vocab_size, tj_path)
        else:
            meta, added = _byte_level_meta(tj, vocab_size, tj_path)
    elif sp_path.is_file():
        meta, added = _sentencepiece_model_meta(sp_path, folder, tc, vocab_size)
    else:
        have = [p.name for p in folder.iterdir() if p.name in ("vocab.json", "merges.txt")]
        extra = f" (found {', '.join(sorted(have))}; save the fast tokenizer with tokenizers/transformers)" if have else ""
        raise EdgeqError(folder, f"no tokenizer.json or tokenizer.model{extra}")
    if meta["tokenizer.ggml.model"] == "llama" and isinstance(tc.get("add_prefix_space"), bool):
        meta["tokenizer.ggml.add_space_prefix"] = tc["add_prefix_space"]     # as convert_hf_to_gguf.py reads it
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {t: i for i, t in enumerate(tokens)}
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                     ("pad", "padding_token_id")):
        tid = _special_token_id(tc, config, typ, added, ids, vocab_size, tc_path)
        if tid is not None:
            meta["tokenizer.ggml." + key] = tid
    add_bos, add_eos = _add_flags(tc, post, meta, tokens)
    if add_bos is not None:
        meta["tokenizer.ggml.add_bos_token"] = add_bos
    if add_eos is not None:
        meta["tokenizer.ggml.add_eos_token"] = add_eos
    template = _chat_template(folder, tc)
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return spec_from_gguf_metadata(meta, folder)


def _byte_level_meta(tj: dict, vocab_size: int, tj_path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A GPT-2-style byte-level BPE tokenizer.json as llama.cpp's "gpt2" vocabulary."""
    model = tj["model"]
    if model.get("type") != "BPE":
        raise EdgeqError(tj_path, f"tokenizer model {model.get('type')!r} is not supported (edgeq reads byte-level "
                                  "BPE and SentencePiece-style BPE tokenizers, llama.cpp's 'gpt2' and 'llama' "
                                  "vocabularies)")
    _check_decoder(tj.get("decoder"), tj_path)
    _check_normalizer(tj.get("normalizer"), tj_path)
    regexes = _pre_tokenizer_regexes(tj.get("pre_tokenizer"), tj_path)
    pre = _pre_name(regexes, bool(model.get("ignore_merges", False)), tj_path)
    tokens, types = _vocabulary(tj, model, vocab_size, tj_path)
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": _merges(model.get("merges"), tj_path),
    }
    return meta, {a["content"]: a["id"] for a in tj.get("added_tokens") or []}


# --- SentencePiece vocabularies (llama.cpp's "llama" model) ---------------------------------------------------

_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
PAD_SCORE, ADDED_SCORE = -10000.0, -1000.0     # what convert_hf_to_gguf.py gives padding and added tokens


def _sentencepiece_bpe_meta(tj: dict, vocab_size: int, path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A SentencePiece-style tokenizer.json (BPE with byte fallback over U+2581-escaped text) as llama.cpp's SPM
    vocabulary. tokenizer.json keeps merge ranks, not scores: each token's score is minus the rank of the first
    merge that makes it, so llama.cpp's highest-score-first merging follows the ranks the file's BPE uses."""
    model = tj["model"]
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"):
        if model.get(key):
            raise EdgeqError(path, f"SentencePiece-style BPE with {key}={model[key]!r} has no llama.cpp equivalent")
    space_prefix = _space_prefix(tj.get("normalizer"), tj.get("pre_tokenizer"), path)
    tokens, types = _vocabulary(tj, model, vocab_size, path)
    unk = model.get("unk_token")
    rank: dict[str, int] = {}
    merges = model.get("merges") or []
    if not isinstance(merges, list):
        raise EdgeqError(path, "tokenizer.json BPE merges is not a list")
    for r, m in enumerate(merges):
        if isinstance(m, str) and m.find(" ", 1) > 0:
            a, b = m[:m.find(" ", 1)], m[m.find(" ", 1) + 1:]
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            a, b = m
        else:
            raise EdgeqError(path, f"invalid BPE merge {m!r}")
        rank.setdefault(a + b, r)
    scores = []
    for i, (text, typ) in enumerate(zip(tokens, types)):
        if typ == TYPE_NORMAL and _BYTE_TOKEN.fullmatch(text):
            types[i] = TYPE_BYTE
        elif text == unk and typ != TYPE_UNUSED:
            types[i] = TYPE_UNKNOWN
        elif typ == TYPE_USER_DEFINED:
            tokens[i] = text.replace(_SPACE, " ")     # matched in raw text, before spaces are escaped
        if types[i] == TYPE_UNUSED:
            scores.append(PAD_SCORE)
        elif types[i] == TYPE_NORMAL:
            # tokens no merge makes (single characters) never score a merge: below every merged one
            scores.append(-float(rank.get(text, len(merges) + i)))
        else:
            scores.append(0.0 if types[i] != TYPE_USER_DEFINED else ADDED_SCORE)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.add_space_prefix": space_prefix}
    return meta, {a["content"]: a["id"] for a in tj.get("added_tokens") or []}


def _space_prefix(norm: Any, pt: Any, path: Path) -> bool:
    """Whether the tokenizer puts U+2581 before the text, from the two layouts transformers writes: a
    normalizer [Prepend(U+2581)], Replace(' ', U+2581) (legacy Llama), or a Metaspace pre-tokenizer. Whatever
    else rewrites the text is refused: llama.cpp only escapes spaces (and adds the prefix)."""
    steps = (norm.get("normalizers") or [] if isinstance(norm, dict) and norm.get("type") == "Sequence"
             else [] if norm is None else [norm])
    kinds = [st.get("type") if isinstance(st, dict) else st for st in steps]
    if pt is None and kinds in (["Prepend", "Replace"], ["Replace"]):
        prepend, replace = (steps[0], steps[1]) if len(steps) == 2 else (None, steps[0])
        if (replace.get("pattern") == {"String": " "} and replace.get("content") == _SPACE
                and (prepend is None or prepend.get("prepend") == _SPACE)):
            return prepend is not None
    if not steps and isinstance(pt, dict) and pt.get("type") == "Metaspace" and pt.get("replacement") == _SPACE:
        if pt.get("split"):
            raise EdgeqError(path, "Metaspace pre-tokenizer with split=true cuts the text at every space; "
                                   "llama.cpp does not (so whitespace tokens such as U+2581U+2581 would differ)")
        scheme = pt.get("prepend_scheme", "always" if pt.get("add_prefix_space", True) else "never")
        if scheme in ("always", "first", "never"):
            return scheme != "never"
    shown = json.dumps({"normalizer": norm, "pre_tokenizer": pt})[:160]
    raise EdgeqError(path, f"SentencePiece-style tokenizer with {shown} has no llama.cpp equivalent (llama.cpp "
                           "only replaces spaces with U+2581 and adds a leading one)")


def _sentencepiece_model_meta(sp_path: Path, folder: Path, tc: dict, vocab_size: int
                              ) -> tuple[dict[str, Any], dict[str, int]]:
    """A SentencePiece tokenizer.model (and the folder's added tokens) as convert_hf_to_gguf.py converts it."""
    sp = read_sentencepiece_model(sp_path)
    if len(sp.pieces) > vocab_size:
        raise EdgeqError(sp_path, f"the tokenizer has {len(sp.pieces)} pieces, but the model's embedding has only "
                                  f"{vocab_size} rows (config.json vocab_size)")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [PAD_SCORE] * vocab_size
    types = [TYPE_UNUSED] * vocab_size
    tokens[:len(sp.pieces)], scores[:len(sp.pieces)], types[:len(sp.pieces)] = sp.pieces, sp.scores, sp.types
    added: dict[str, int] = {}
    extra = folder / "added_tokens.json"
    entries: list[tuple[int, str, bool]] = []
    if extra.is_file():
        d = _read_json(extra, "added_tokens.json")
        if not isinstance(d, dict):
            raise EdgeqError(extra, "added_tokens.json is not a JSON object")
        entries += [(tid, text, False) for text, tid in d.items()]
    decoder = tc.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise EdgeqError(folder / "tokenizer_config.json", "added_tokens_decoder is not a JSON object")
    for key, d in decoder.items():
        if not isinstance(d, dict) or not isinstance(d.get("content"), str) or not str(key).isdigit():
            raise EdgeqError(folder / "tokenizer_config.json", f"invalid added token {key!r}: {d!r}")
        entries.append((int(key), d["content"], bool(d.get("special")) or _looks_special(d["content"])))
    for tid, text, control in entries:
        if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < vocab_size:
            raise EdgeqError(folder, f"added token {text!r} has id {tid!r}, outside the embedding's {vocab_size} rows")
        tokens[tid] = text if control else text.replace(_SPACE, " ")
        types[tid] = TYPE_CONTROL if control else TYPE_USER_DEFINED
        scores[tid] = ADDED_SCORE
        added[text] = tid
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.add_space_prefix": sp.add_dummy_prefix}
    return meta, added


# --- structure checks ---------------------------------------------------------

def _check_decoder(dec: Any, path: Path) -> None:
    kinds = []
    if isinstance(dec, dict):
        kinds = [d.get("type") for d in dec.get("decoders", [])] if dec.get("type") == "Sequence" else [dec.get("type")]
    if "ByteLevel" not in kinds:
        raise EdgeqError(path, f"tokenizer decoder {kinds or None} is not byte-level; edgeq reads byte-level BPE "
                               "tokenizers")


def _check_normalizer(norm: Any, path: Path) -> None:
    # llama.cpp applies no normalizer to gpt2 vocabularies; NFC (Qwen2) changes only non-NFC input,
    # which llama.cpp, and so the exported model, leaves as it is.
    if norm is None:
        return
    if isinstance(norm, dict) and norm.get("type") == "NFC":
        return
    if isinstance(norm, dict) and norm.get("type") == "Sequence" and not norm.get("normalizers"):
        return
    kind = norm.get("type") if isinstance(norm, dict) else norm
    raise EdgeqError(path, f"tokenizer normalizer {kind!r} has no llama.cpp equivalent")


def _pre_tokenizer_regexes(pt: Any, path: Path) -> tuple[str, ...]:
    """The chain of splitting regexes a pre-tokenizer applies, spelled as llama-vocab.cpp spells them."""
    steps = pt.get("pretokenizers", []) if isinstance(pt, dict) and pt.get("type") == "Sequence" else [pt]
    regexes: list[str] = []
    saw_bytelevel = False
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            raise EdgeqError(path, f"unsupported pre-tokenizer {step!r} in tokenizer.json")
        kind = step.get("type")
        if saw_bytelevel:
            raise EdgeqError(path, f"pre-tokenizer step {kind} after ByteLevel has no llama.cpp equivalent")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise EdgeqError(path, "ByteLevel pre-tokenizer with add_prefix_space has no llama.cpp equivalent")
            if step.get("use_regex", True):
                regexes.append(_BYTELEVEL_REGEX)
            saw_bytelevel = True
        elif kind == "Digits":
            regexes.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            if "Regex" not in pattern or step.get("invert") or str(step.get("behavior", "")).lower() != "isolated":
                raise EdgeqError(path, f"pre-tokenizer Split {json.dumps(step)[:120]} has no llama.cpp equivalent")
            regexes.append(pattern["Regex"].replace(_HF_CONTRACTIONS, _tok._CONTRACTIONS))
        else:
            raise EdgeqError(path, f"pre-tokenizer {kind!r} has no llama.cpp equivalent")
    if not saw_bytelevel:
        raise EdgeqError(path, "pre-tokenizer has no ByteLevel step; edgeq reads byte-level BPE tokenizers")
    return tuple(regexes)


def _pre_name(regexes: tuple[str, ...], ignore_merges: bool, path: Path) -> str:
    fits = [name for name, cfg in _tok._PRE_TYPES.items()
            if cfg.regexes == regexes and cfg.ignore_merges == ignore_merges]
    if not fits:
        shown = " then ".join(r if len(r) < 40 else r[:37] + "..." for r in regexes)
        raise EdgeqError(path, f"pre-tokenizer ({shown}; ignore_merges={ignore_merges}) matches none that "
                               "llama.cpp knows (tokenizer.ggml.pre)")
    for name in _PREFERRED:
        if name in fits:
            return name
    return sorted(fits)[0]


# --- vocabulary -----------------------------------------------------------------

def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _vocabulary(tj: dict, model: dict, vocab_size: int, path: Path) -> tuple[list[str], list[int]]:
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise EdgeqError(path, "tokenizer.json BPE model has no vocab object")
    by_id: dict[int, str] = {}
    for text, tid in vocab.items():
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            raise EdgeqError(path, f"token {text!r} has an invalid id {tid!r}")
        if tid in by_id:
            raise EdgeqError(path, f"tokens {by_id[tid]!r} and {text!r} share id {tid}")
        by_id[tid] = text
    types: dict[int, int] = {}
    if not isinstance(tj.get("added_tokens") or [], list):
        raise EdgeqError(path, "tokenizer.json added_tokens is not a list")
    for a in tj.get("added_tokens") or []:
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or not isinstance(a.get("id"), int):
            raise EdgeqError(path, f"invalid added token {a!r}")
        tid, text = a["id"], a["content"]
        if tid < 0:
            raise EdgeqError(path, f"added token {text!r} has an invalid id {tid}")
        by_id[tid] = text
        types[tid] = TYPE_CONTROL if a.get("special") or _looks_special(text) else TYPE_USER_DEFINED
    top = max(by_id, default=-1)
    if top >= vocab_size:
        raise EdgeqError(path, f"the tokenizer has token id {top}, but the model's embedding has only {vocab_size} "
                               "rows (config.json vocab_size)")
    tokens, ttypes = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            ttypes.append(types.get(i, TYPE_NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            ttypes.append(TYPE_UNUSED)
    return tokens, ttypes


def _merges(merges: Any, path: Path) -> list[str]:
    if merges is None:
        return []
    if not isinstance(merges, list):
        raise EdgeqError(path, "tokenizer.json BPE merges is not a list")
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append(f"{m[0]} {m[1]}")
        else:
            raise EdgeqError(path, f"invalid BPE merge {m!r}")
    return out


def _token_content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _special_token_id(tc: dict, config: dict, typ: str, added: dict, ids: dict, n: int, path: Path) -> int | None:
    """gguf-py's SpecialVocab: the tokenizer_config.json text (an added token, else any token), then config.json's id."""
    text = _token_content(tc.get(f"{typ}_token"))
    if text is not None:
        tid = added.get(text, ids.get(text))
        if tid is not None:
            return int(tid)
    cid = config.get(f"{typ}_token_id")
    if isinstance(cid, list):      # some configs list several EOS ids: llama.cpp takes one
        cid = cid[0] if cid else None
    if isinstance(cid, int) and not isinstance(cid, bool) and 0 <= cid < n:
        return cid
    return None


def _add_flags(tc: dict, post: Any, meta: dict, tokens: list[str]) -> tuple[bool | None, bool | None]:
    """tokenizer_config.json's add_bos_token/add_eos_token, else what a TemplateProcessing post-processor adds."""
    add_bos = tc.get("add_bos_token") if isinstance(tc.get("add_bos_token"), bool) else None
    add_eos = tc.get("add_eos_token") if isinstance(tc.get("add_eos_token"), bool) else None
    template = None
    procs = post.get("processors", []) if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    for p in procs:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            template = p.get("single")
    if template is not None and (add_bos is None or add_eos is None):
        pieces = [t.get("SpecialToken", {}).get("id") if isinstance(t, dict) else None for t in template]
        seq_at = next((i for i, t in enumerate(template) if isinstance(t, dict) and "Sequence" in t), None)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if seq_at is not None:
            before, after = pieces[:seq_at], pieces[seq_at + 1:]
            if add_bos is None:
                add_bos = bos is not None and tokens[bos] in before
            if add_eos is None:
                add_eos = eos is not None and tokens[eos] in after
    return add_bos, add_eos


def _chat_template(folder: Path, tc: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        if jinja.stat().st_size > MAX_JSON_BYTES:
            raise EdgeqError(jinja, f"larger than {MAX_JSON_BYTES} bytes")
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise EdgeqError(jinja, f"not UTF-8 text ({exc})") from None
    t = tc.get("chat_template")
    if t is None and (folder / "chat_template.json").is_file():
        t = _read_json(folder / "chat_template.json", "chat_template.json")
        t = t.get("chat_template") if isinstance(t, dict) else None
    if isinstance(t, list):      # several named templates: llama.cpp's converter keeps the default one
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) else None
