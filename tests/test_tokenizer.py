"""Token-id parity between edgeq's tokenizer and llama.cpp's own, on real GGUF vocabularies.

llama.cpp (through llama-cpp-python, vocab only) is the reference: every
assertion compares against what it returns for the same file and text.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import struct

import llama_cpp
import pytest
from tokenizers import Tokenizer

from edgeq.core.errors import EdgeqError
from edgeq.importers.gguf_metadata import open_gguf, read_metadata
from edgeq.runtime.tokenizer import (
    build_tokenizer,
    decode,
    encode,
    render_chat,
    spec_from_gguf_metadata,
    spec_from_json,
    spec_to_json,
    stop_ids,
)

K = "tokenizer.ggml."

CHAT = [{"role": "user", "content": "What is 12*34? Answer briefly."}]

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "contractions": "I'm sure it's fine; they're here, we've won, you'll see, he'd go. IT'S LOUD, THEY'RE 'Quoted'.",
    "code": (
        "def fib(n: int) -> int:\n"
        "    if n < 2:\n"
        "        return n\n"
        "\treturn fib(n - 1) + fib(n - 2)  # tab-indented\n"
        "\n\n"
        "class A:\n"
        "  x = {'a': [1, 2, 3]}\n"
        "    \n"
        "print(fib(10)) \t\n"
    ),
    "numbers": "1 12 123 1234 12345 1234567890 3.14159 -42 1e-10 0x1F ½ ² ٣٤٥ 2024-11-29 $1,000.00",
    "accents": "Café, naïve, façade, résumé, Ångström, Straße, Łódź, ĳ",
    "cjk": "日本語のテキストです。中文文本，你好！한국어 텍스트",
    "emoji": "Nice 👍🏽 job 🎉🎉! Family: 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 ♥️",
    "cyrillic": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "combining": "e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353a\u0354l\u0355go",
    "rtl": "שלום עולם! مرحبا بالعالم ١٢٣",
    "spaces": "a  b   c    d\t\te \u00a0f\u2003g\u3000h",
    "trailing": "trailing spaces and newline   \n\n  ",
    "leading": "   leading spaces",
    "crlf": "line one\r\nline two\r\n\r\n  \n x",
    "punctuation": "Wait... what?!? (yes) [no] {maybe} <tag/> --flag==value; a->b && c||d ~`^|",
    "empty": "",
    "single_space": " ",
    "newlines_only": "\n\n\n",
    "special_markers": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><reponame>x<filename>",
    "marker_lookalikes": "<|im_start <|im_end|x <|im_start|><|im_start|>|> <| im_end |>",
}


def _model_path():
    try:
        from edgeq.models.recipes.default import default_model_path
    except ImportError:  # models/ maps onto edgeq.models only once the package is installed
        from models.default import default_model_path
    try:
        return default_model_path()
    except EdgeqError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def gguf_path():
    return _model_path()


@pytest.fixture(scope="module")
def meta(gguf_path):
    return read_metadata(open_gguf(gguf_path))


@pytest.fixture(scope="module")
def spec(meta, gguf_path):
    return spec_from_gguf_metadata(meta, gguf_path)


@pytest.fixture(scope="module")
def tok(spec):
    return build_tokenizer(spec)


@pytest.fixture(scope="module")
def llm(gguf_path):
    model = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    yield model
    model.close()


def _vocab(model):
    return llama_cpp.llama_model_get_vocab(model._model.model)


def _llama_detokenize(model, ids: list[int]) -> str:
    """llama_detokenize with a buffer large enough for any piece (Llama.detokenize truncates long ones)."""
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 16 * len(ids) + 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(_vocab(model), arr, len(ids), buf, size, False, True)
    assert n >= 0
    return buf.raw[:n].decode("utf-8")


def _assert_parity(tok, spec, model, text: str) -> None:
    for add_special in (True, False):
        for parse_special in (True, False):
            ours = encode(tok, spec, text, add_special=add_special, parse_special=parse_special)
            ref = model.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
            assert ours == ref, f"add_special={add_special} parse_special={parse_special}: {text[:60]!r}"


def _pydoc_lines(n: int) -> list[str]:
    from pydoc_data.topics import topics

    lines = "\n".join(topics[k] for k in sorted(topics)).splitlines()
    return lines[:n]


# --- SmolLM2 (gpt2 BPE, pre "smollm") ----------------------------------------------------------


def test_spec_reads_smollm2(spec):
    assert (spec.model, spec.pre) == ("gpt2", "smollm")
    assert spec.eos_id == 2 and spec.tokens[2] == "<|im_end|>"
    assert spec.add_bos is False and spec.add_eos is False
    assert spec.chat_template and "<|im_start|>" in spec.chat_template
    assert len(spec.tokens) == len(spec.token_types) == 49152


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_ids_match_llama_cpp(name, tok, spec, llm):
    _assert_parity(tok, spec, llm, TEXTS[name])


def test_chat_prompt_ids_match_llama_cpp(tok, spec, llm):
    prompt = render_chat(spec, CHAT)
    _assert_parity(tok, spec, llm, prompt)
    with_special = encode(tok, spec, prompt, parse_special=True)
    as_text = encode(tok, spec, prompt, parse_special=False)
    assert with_special.count(1) == 3 and with_special.count(2) == 2  # <|im_start|> x3, <|im_end|> x2
    assert 1 not in as_text and 2 not in as_text


def test_pydoc_topics_match_llama_cpp(tok, spec, llm):
    lines = _pydoc_lines(400)
    block = "\n".join(lines)
    assert encode(tok, spec, block, add_special=False) == llm.tokenize(block.encode(), add_bos=False, special=True)
    for line in lines:
        assert encode(tok, spec, line) == llm.tokenize(line.encode(), add_bos=True, special=True), line


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_decode_round_trips_and_matches_llama_cpp(name, tok, spec, llm):
    text = TEXTS[name]
    for parse_special in (True, False):
        ids = encode(tok, spec, text, parse_special=parse_special)
        assert decode(tok, ids) == text
        assert decode(tok, ids) == _llama_detokenize(llm, ids)


def test_decode_of_pydoc_matches_llama_cpp(tok, spec, llm):
    block = "\n".join(_pydoc_lines(400))
    ids = encode(tok, spec, block)
    assert decode(tok, ids) == block == _llama_detokenize(llm, ids)


def test_stop_ids_are_llama_cpp_end_of_generation_ids(spec, llm):
    vocab = _vocab(llm)
    reference = {i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert 2 in stop_ids(spec)
    assert stop_ids(spec) == reference


def test_saved_tokenizer_json_gives_same_ids(tok, spec, llm):
    reloaded = Tokenizer.from_str(tok.to_str())
    for text in (TEXTS["code"], TEXTS["emoji"], TEXTS["special_markers"], render_chat(spec, CHAT)):
        ref = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert reloaded.encode(text).ids == ref
        assert encode(reloaded, spec, text) == ref


# --- chat template ------------------------------------------------------------------------------


def test_render_chat_smollm2(spec):
    out = render_chat(spec, CHAT)
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 12*34? Answer briefly.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert out.endswith("<|im_start|>assistant\n")
    assert not render_chat(spec, CHAT, add_generation_prompt=False).endswith("assistant\n")


def test_render_chat_matches_transformers(spec):
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    # Block tags on their own lines: output depends on trim_blocks/lstrip_blocks.
    layout = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "U: {{ m.content | tojson }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    messages = CHAT + [{"role": "assistant", "content": "408"}, {"role": "user", "content": "Ünïcode \"q\""}]
    for template in (spec.chat_template, layout):
        s = dataclasses.replace(spec, chat_template=template)
        for gen in (True, False):
            ref = chat_utils.render_jinja_template(
                [messages], chat_template=template, add_generation_prompt=gen,
                bos_token=spec.tokens[spec.bos_id], eos_token=spec.tokens[spec.eos_id],
            )[0][0]
            assert render_chat(s, messages, add_generation_prompt=gen) == ref


def test_render_chat_without_template_is_an_error(spec):
    with pytest.raises(EdgeqError, match="no chat template"):
        render_chat(dataclasses.replace(spec, chat_template=None), CHAT)


def test_render_chat_template_errors_are_edgeq_errors(spec):
    s = dataclasses.replace(spec, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(EdgeqError, match="roles must alternate"):
        render_chat(s, CHAT)
    s = dataclasses.replace(spec, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(EdgeqError):
        render_chat(s, CHAT)


# --- JSON and validation ------------------------------------------------------------------------


def test_spec_json_round_trip(spec, tok):
    d = spec_to_json(spec)
    text = json.dumps(d)
    assert json.dumps(spec_to_json(spec)) == text  # deterministic
    back = spec_from_json(json.loads(text))
    assert back == spec
    sample = TEXTS["numbers"] + TEXTS["special_markers"]
    assert encode(build_tokenizer(back), back, sample) == encode(tok, spec, sample)


def test_spec_from_json_rejects_bad_input(spec):
    d = spec_to_json(spec)
    with pytest.raises(EdgeqError, match="lacks merges"):
        spec_from_json({k: v for k, v in d.items() if k != "merges"}, "bundle/tokenizer.json")
    with pytest.raises(EdgeqError, match="token_types"):
        spec_from_json({**d, "token_types": ["1"] * len(d["tokens"])})
    with pytest.raises(EdgeqError, match="eos_id"):
        spec_from_json({**d, "eos_id": len(d["tokens"])})
    with pytest.raises(EdgeqError, match="duplicate token"):
        spec_from_json({**d, "tokens": ["!"] + d["tokens"][1:]})


def test_unsupported_pre_type_is_a_clear_error(meta, gguf_path):
    with pytest.raises(EdgeqError, match="unsupported tokenizer pre type 'no-such-pre'") as err:
        spec_from_gguf_metadata({**meta, K + "pre": "no-such-pre"}, gguf_path)
    assert err.value.path == str(gguf_path)
    with pytest.raises(EdgeqError, match="'gpt-2'"):
        spec_from_gguf_metadata({**meta, K + "pre": "gpt2"}, gguf_path)


def test_invalid_metadata_is_a_clear_error(meta, gguf_path):
    with pytest.raises(EdgeqError, match="unsupported tokenizer model 'bert'"):
        spec_from_gguf_metadata({**meta, K + "model": "bert"}, gguf_path)
    # a SentencePiece vocabulary without the <0xXX> tokens: llama.cpp aborts on any character outside it
    with pytest.raises(EdgeqError, match=r"lacks byte-fallback token <0x00> \(162 of 256 missing\)"):
        spec_from_gguf_metadata({**meta, K + "model": "llama"}, gguf_path)
    with pytest.raises(EdgeqError, match=K + "tokens"):
        spec_from_gguf_metadata({k: v for k, v in meta.items() if k != K + "tokens"}, gguf_path)
    with pytest.raises(EdgeqError, match=K + "merges"):
        spec_from_gguf_metadata({k: v for k, v in meta.items() if k != K + "merges"}, gguf_path)
    with pytest.raises(EdgeqError, match="eos_token_id"):
        spec_from_gguf_metadata({**meta, K + "eos_token_id": 10**6}, gguf_path)
    with pytest.raises(EdgeqError, match="token_type has 3 entries"):
        spec_from_gguf_metadata({**meta, K + "token_type": [1, 1, 1]}, gguf_path)


# --- other pre types: small GGUFs built from SmolLM2's vocabulary, checked against llama.cpp ------

PRE_TYPES = [
    "default", "gpt-2", "starcoder", "llama-bpe", "dbrx", "chatglm-bpe", "qwen2", "qwen35", "deepseek-llm",
    "deepseek-coder", "deepseek-v3", "spark2_5", "falcon", "gpt-4o", "granite-embed-multi-97m", "tekken", "youtu",
    "bloom", "viking", "jais-2", "bailingmoe", "seed-coder", "ufakzeka", "laguna", "exaone-moe", "minicpm5",
]

PRE_TEXT = "\n".join([
    TEXTS["contractions"], TEXTS["code"], TEXTS["numbers"], TEXTS["cjk"], TEXTS["emoji"], TEXTS["combining"],
    TEXTS["rtl"], TEXTS["spaces"], TEXTS["crlf"], TEXTS["punctuation"],
    "camelCaseWord HTTPServer XMLHttpRequest ÉCOLE école ΑΘΗΝΑ αθηνα ＡＢＣ！ひらがな カタカナ",
    "x\u00a0\u00a0y  \n  \n\tz 100000 12,345,678 ١٢٣٤ 𝟙𝟚𝟛 Ⅻ",
    "ideographic\u3000\u3000space \u2003\u2003 em \u3000、。 end \u3000",
    TEXTS["special_markers"], TEXTS["trailing"],
])

N_SMALL = 6000


def _small_vocab(meta):
    """The first tokens of the vocabulary with the merges that stay inside it: a valid, fast BPE."""
    tokens = meta[K + "tokens"][:N_SMALL]
    known = set(tokens)
    merges = []
    for m in meta[K + "merges"]:
        a, b = m.split(" ", 1)
        if a in known and b in known and a + b in known:
            merges.append(m)
    return tokens, meta[K + "token_type"][:N_SMALL], merges


def _vocab_gguf(path, tokens, types, merges, pre, add_bos) -> dict:
    """Write a tensor-less GGUF that llama.cpp loads with vocab_only; return its metadata as read_metadata would.

    Written by hand (the format is a flat key/value list) because gguf-py's
    writer and reader take about a second per file, and this runs per pre type.
    """
    from gguf import GGUFValueType as V

    kvs = [
        ("general.architecture", V.STRING, "llama"),
        ("llama.context_length", V.UINT32, 512),
        ("llama.embedding_length", V.UINT32, 64),
        ("llama.block_count", V.UINT32, 1),
        ("llama.feed_forward_length", V.UINT32, 128),
        ("llama.attention.head_count", V.UINT32, 1),
        ("llama.attention.head_count_kv", V.UINT32, 1),
        ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, 1e-5),
        (K + "model", V.STRING, "gpt2"),
        (K + "pre", V.STRING, pre),
        (K + "tokens", V.STRING, list(tokens)),
        (K + "token_type", V.INT32, list(types)),
        (K + "merges", V.STRING, list(merges)),
        (K + "bos_token_id", V.UINT32, 1),
        (K + "eos_token_id", V.UINT32, 2),
    ]
    if add_bos is not None:
        kvs.append((K + "add_bos_token", V.BOOL, add_bos))

    def string(text: str) -> bytes:
        raw = text.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw

    def scalar(kind, value) -> bytes:
        if kind == V.STRING:
            return string(value)
        return struct.pack({V.UINT32: "<I", V.INT32: "<i", V.FLOAT32: "<f", V.BOOL: "<?"}[kind], value)

    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(kvs))]
    for key, kind, value in kvs:
        out.append(string(key))
        if isinstance(value, list):
            out.append(struct.pack("<IIQ", V.ARRAY, kind, len(value)))
            out.extend(scalar(kind, v) for v in value)
        else:
            out.append(struct.pack("<I", kind) + scalar(kind, value))
    data = b"".join(out)
    path.write_bytes(data + b"\0" * (-len(data) % 32))
    return {key: value for key, _, value in kvs}


@pytest.fixture(scope="module")
def small_vocab(meta):
    return _small_vocab(meta)


@pytest.mark.parametrize("pre", PRE_TYPES)
def test_other_pre_types_match_llama_cpp(pre, small_vocab, tmp_path):
    tokens, types, merges = small_vocab
    # Leave add_bos to llama.cpp's per-pre default for llama3-style vocabularies.
    add_bos = None if pre in ("llama-bpe", "tekken") else False
    path = tmp_path / f"{pre}.gguf"
    spec = spec_from_gguf_metadata(_vocab_gguf(path, tokens, types, merges, pre, add_bos), path)
    assert spec.add_bos is (add_bos is None)
    tok = build_tokenizer(spec)
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        _assert_parity(tok, spec, model, PRE_TEXT)
        for line in PRE_TEXT.splitlines():
            assert encode(tok, spec, line) == model.tokenize(line.encode(), add_bos=True, special=True), line
    finally:
        model.close()


def test_normal_typed_end_markers_are_promoted_like_llama_cpp(small_vocab, tmp_path):
    """A GGUF that types <|endoftext|> and <reponame> as normal still has them parsed as control tokens."""
    tokens, types, merges = small_vocab
    types = [1 if t in ("<|endoftext|>", "<reponame>", "<filename>") else ty for t, ty in zip(tokens, types)]
    types[5] = 4  # <file_sep> as a user-defined token: matched even when parse_special is off
    path = tmp_path / "normal-typed.gguf"
    spec = spec_from_gguf_metadata(_vocab_gguf(path, tokens, types, merges, "smollm", False), path)
    tok = build_tokenizer(spec)
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        _assert_parity(tok, spec, model, TEXTS["special_markers"] + "<file_sep>a<file_sep>")
        vocab = _vocab(model)
        assert stop_ids(spec) == {i for i in range(len(tokens)) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    finally:
        model.close()
