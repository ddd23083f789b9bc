"""SentencePiece (llama.cpp "llama") vocabularies end to end: HF folders as users have them -> GGUF -> every runtime.

The vocabulary is trained here with `sentencepiece` on pydoc text (Llama-2's trainer settings: BPE, byte
fallback, split digits, whitespace pieces) and laid out three ways: a `tokenizer.model` only, the tokenizer.json
transformers < 5 wrote (Prepend/Replace normalizer), and the one transformers 5 writes (Metaspace,
prepend_scheme=first). llama.cpp, loading the exported GGUF with vocab_only, is the reference for every id.
"""

from __future__ import annotations

import ctypes
import json
import shutil

import llama_cpp
import pytest
from test_tokenizer import TEXTS

from edgeq.core.errors import EdgeqError
from edgeq.core.plan import Plan, TensorPlan
from edgeq.evaluate.texts import evaluation_text
from edgeq.importers.gguf import import_gguf
from edgeq.importers.hf import import_hf
from edgeq.importers.hf_tokenizer import spec_from_hf_folder
from edgeq.runtime.tokenizer import build_tokenizer, decode, encode, spec_from_json, spec_to_json
from edgeq.targets.gguf.writer import write_gguf

spm = pytest.importorskip("sentencepiece")

V = 1000
USER, CONTROL = ("<tool>",), ("<|im_start|>", "<|im_end|>")
SPM_TEXTS = {**TEXTS,
             "user_and_control": "call <tool> now<tool>x <|im_start|>user\nhi<|im_end|> <s>a</s>b <unk>",
             "indent_runs": "class A:\n        def f(self):\n                return   1\n\n\n    \t  x",
             "spaces_only": "     ",
             "byte_fallback": "\x00\x01 \x7f \u0378 \U0001F9EC \uFFFD \u200b"}
LAYOUTS = ("model", "legacy_json", "metaspace_json")


@pytest.fixture(scope="module")
def spm_root(tmp_path_factory):
    """The trained vocabulary and a tiny tied Llama of its size in the three folder layouts."""
    from transformers import AutoTokenizer

    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.sentencepiece_vocab import (
        legacy_tokenizer_json,
        llama_tokenizer_config,
        train_sentencepiece,
    )
    from edgeq.models.recipes.synthetic import random_llama, tiny_config

    root = tmp_path_factory.mktemp("spm")
    model = train_sentencepiece(root / "sp.model", V, user_symbols=USER, control_symbols=CONTROL)
    graph = random_llama(tiny_config(vocab_size=V, tied_embeddings=True, context_length=512), seed=3, scale=0.08)
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    a = graph_to_hf_folder(graph, root / "model")
    shutil.copy(model, a / "tokenizer.model")
    llama_tokenizer_config(a, chat_template=template)
    b = graph_to_hf_folder(graph, root / "legacy_json")
    legacy_tokenizer_json(model, b / "tokenizer.json")
    llama_tokenizer_config(b, chat_template=template)
    c = graph_to_hf_folder(graph, root / "metaspace_json")
    src = root / "sp-src"
    src.mkdir()
    shutil.copy(model, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(c))      # transformers 5's own conversion
    return root


def _gguf(spm_root, layout):
    """The folder imported by edgeq and written as an f32 GGUF, with edgeq's spec and llama.cpp on it."""
    graph = import_hf(spm_root / layout)
    spec = graph.metadata["tokenizer_spec"]
    path = spm_root / f"{layout}.gguf"
    write_gguf(graph, Plan(tensors={n: TensorPlan("f32") for n in graph.weights}), path, spec_to_json(spec))
    return graph, spec, path


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request, spm_root):
    graph, spec, path = _gguf(spm_root, request.param)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    yield request.param, spec, build_tokenizer(spec), llm, path
    llm.close()


def test_vocabulary_is_read_as_llama_cpp_spm(layout, spm_root):
    name, spec, _, _, _ = layout
    assert spec.model == "llama" and spec.add_space_prefix and not spec.add_eos
    # transformers 5 saved a post-processor that adds no BOS (its source config said nothing): edgeq follows it
    assert spec.add_bos == (name != "metaspace_json")
    assert (spec.bos_id, spec.eos_id, spec.unk_id) == (1, 2, 0)
    assert spec.tokens[3:6] == CONTROL + USER
    assert spec.token_types[0] in (2, 3) and spec.token_types[1] == 3 and spec.token_types[6:262] == (6,) * 256
    sp = spm.SentencePieceProcessor(model_file=str(spm_root / "sp.model"))
    if name == "model":       # the model's own scores, as llama.cpp's converter copies them
        assert spec.scores[300:310] == tuple(sp.get_score(i) for i in range(300, 310))


@pytest.mark.parametrize("text", sorted(SPM_TEXTS))
def test_ids_match_llama_cpp(layout, text):
    _, spec, tok, llm, _ = layout
    for add_special in (True, False):
        for parse_special in (True, False):
            ours = encode(tok, spec, SPM_TEXTS[text], add_special, parse_special)
            ref = llm.tokenize(SPM_TEXTS[text].encode(), add_bos=add_special, special=parse_special)
            assert ours == ref, (add_special, parse_special)


def test_held_out_text_matches_llama_cpp(layout):
    _, spec, tok, llm, _ = layout
    text = evaluation_text()
    ids = encode(tok, spec, text)
    assert len(ids) > 50_000
    assert ids == llm.tokenize(text.encode(), add_bos=True, special=True)


def _llama_detokenize(llm, ids):
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 16 * len(ids) + 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(llama_cpp.llama_model_get_vocab(llm._model.model), arr, len(ids), buf, size,
                                   False, True)
    return buf.raw[:n].decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", ["prose", "code", "cjk", "emoji", "user_and_control", "indent_runs", "leading"])
def test_decode_matches_llama_cpp(layout, text):
    _, spec, tok, llm, _ = layout
    ids = encode(tok, spec, SPM_TEXTS[text], add_special=False)
    # llama_detokenize drops the space prefix's leading space (remove_space); the runtime keeps every piece, as
    # llama-cpp-python's own detokenize does
    ours = decode(tok, ids)
    assert ours[:1] == " " and ours[1:] == _llama_detokenize(llm, ids)
    assert ours == llm.detokenize(ids, special=True).decode("utf-8", errors="replace")


def test_sentencepiece_and_tokenizers_agree_where_their_rules_are_llama_cpp_s(layout, spm_root):
    """SentencePiece itself and the legacy tokenizer.json give llama.cpp's ids on ordinary text; transformers 5's
    Metaspace(prepend_scheme=first) does not double a leading space, the one place it differs."""
    from tokenizers import Tokenizer

    name, spec, tok, _, _ = layout
    sp = spm.SentencePieceProcessor(model_file=str(spm_root / "sp.model"))
    hf = Tokenizer.from_file(str(spm_root / (name if name != "model" else "legacy_json") / "tokenizer.json"))
    differ = set()
    for key, text in SPM_TEXTS.items():
        if any(t in text for t in CONTROL + ("<s>", "</s>", "<unk>")):
            continue        # sentencepiece never parses control tokens; tokenizers always does
        ours = encode(tok, spec, text, add_special=False, parse_special=False)
        assert ours == sp.encode(text), key
        if ours != hf.encode(text, add_special_tokens=False).ids:
            differ.add(key)
    assert differ == ({"leading", "single_space", "spaces_only"} if name == "metaspace_json" else set())


def test_gguf_round_trip_keeps_the_vocabulary(layout):
    _, spec, _, _, path = layout
    again = import_gguf(path)
    from edgeq.importers.loader import graph_tokenizer_spec

    assert graph_tokenizer_spec(again) == spec
    assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec


def test_export_and_run_on_every_backend(spm_root, tmp_path):
    """The pipeline end to end: HF folder with tokenizer.model -> gguf + onnx bundle -> runtime ids = llama.cpp's."""
    from edgeq import api, runtime

    out = tmp_path / "b"
    api.export(model=str(spm_root / "model"), backend="all", quant="gguf=q8_0,onnx=int8", out=str(out),
               calibration=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["add_bos"] is True
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), vocab_only=True, verbose=False)
    for backend in ("gguf", "onnx"):
        with runtime.load(out, backend=backend) as s:
            for text in (SPM_TEXTS["code"], SPM_TEXTS["user_and_control"], s.chat_prompt("What is   2+2?")):
                assert s.tokenize(text) == llm.tokenize(text.encode(), add_bos=True, special=True)
            ids = s.generate_ids(s.tokenize("The module"), max_tokens=4)
            assert len(ids) == 4 and s.detokenize(ids) == llm.detokenize(ids).decode("utf-8", errors="replace")
    llm.close()


# --- what llama.cpp's SPM cannot reproduce is refused, one line each -----------------------------------

def _train(tmp_path, **opts):
    from edgeq.models.recipes.sentencepiece_vocab import train_sentencepiece

    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    train_sentencepiece(folder / "tokenizer.model", 400, **opts)
    return folder


@pytest.mark.parametrize("opts, message", [
    ({"remove_extra_whitespaces": True}, "collapses whitespace runs"),
    ({"normalization": "nmt_nfkc"}, "normalizer 'nmt_nfkc' rewrites text"),
    ({"model_type": "unigram"}, "SentencePiece unigram model"),
    ({"byte_fallback": False}, "lacks byte-fallback token"),
])
def test_unreproducible_sentencepiece_models_are_refused(tmp_path, opts, message):
    folder = _train(tmp_path, **opts)
    with pytest.raises(EdgeqError, match=message) as err:
        spec_from_hf_folder(folder, 400)
    assert "\n" not in str(err.value)


def test_metaspace_that_splits_at_spaces_is_refused(spm_root, tmp_path):
    d = json.loads((spm_root / "metaspace_json" / "tokenizer.json").read_text())
    d["pre_tokenizer"]["split"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(EdgeqError, match="split=true cuts the text at every space"):
        spec_from_hf_folder(tmp_path, V)
    d["pre_tokenizer"] = None
    d["normalizer"] = {"type": "NFKC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(EdgeqError, match="has no llama.cpp equivalent"):
        spec_from_hf_folder(tmp_path, V)


def test_gguf_flags_are_llama_cpp_s(spm_root, tmp_path):
    """add_space_prefix / add_bos / add_eos off and on, written to a GGUF and read back: llama.cpp agrees."""
    import dataclasses

    graph, spec, _ = _gguf(spm_root, "model")
    for flags in ({"add_space_prefix": False, "add_bos": False}, {"add_eos": True}):
        variant = dataclasses.replace(spec, **flags)
        path = tmp_path / f"{'-'.join(flags)}.gguf"
        write_gguf(graph, Plan(tensors={n: TensorPlan("f32") for n in graph.weights}), path, spec_to_json(variant))
        from edgeq.importers.loader import graph_tokenizer_spec

        assert graph_tokenizer_spec(import_gguf(path)) == variant
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        tok = build_tokenizer(variant)
        for text in ("  two spaces", "<|im_start|>user\n hi<|im_end|>", SPM_TEXTS["code"]):
            assert encode(tok, variant, text) == llm.tokenize(text.encode(), add_bos=True, special=True), flags
        llm.close()
