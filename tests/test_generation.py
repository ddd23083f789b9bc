"""Generation in the runtime on every backend: streaming, chat message lists, the sampler, prompts too long.

A small random decoder exported to GGUF + ONNX (one bundle, f32) and to TVM (f32): its random tokens make
byte sequences that split characters and are often not UTF-8 at all, the hard case for streaming text.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeq import runtime
from edgeq.core.errors import RequestError
from edgeq.runtime.generation import IncrementalDecoder, StopStrings
from edgeq.runtime.sampling import NumpySampler, SamplingParams
from edgeq.runtime.tokenizer import build_tokenizer, decode


@pytest.fixture(scope="module")
def tiny_bundles(tiny_decoder_dir, tmp_path_factory) -> dict[str, tuple]:
    """backend -> (bundle, backend) of the tiny decoder, f32 everywhere."""
    from edgeq.api import ExportOptions, export

    root = tmp_path_factory.mktemp("generation")
    both, tvm = root / "gguf-onnx", root / "tvm"
    export(ExportOptions(model=str(tiny_decoder_dir), backend="all", quant="f32", out=str(both), check=False))
    export(ExportOptions(model=str(tiny_decoder_dir), backend="tvm", quant="f32", out=str(tvm), check=False))
    return {"gguf": (both, "gguf"), "onnx": (both, "onnx"), "tvm": (tvm, "tvm")}


PROMPTS = ["the rain", "x", "snow falls on the"]


@pytest.mark.parametrize("backend", ["gguf", "onnx", "tvm"])
def test_stream_pieces_join_to_generate_and_to_the_tokens_text(tiny_bundles, backend):
    path, name = tiny_bundles[backend]
    total = 0
    with runtime.load(path, backend=name) as s:
        for prompt in PROMPTS:
            for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 5, "top_k": 50}):
                c = s.stream(prompt, 48, **sampling)
                pieces = list(c)
                total += c.completion_tokens
                assert "".join(pieces) == c.text == s.detokenize(c.token_ids)
                assert s.generate(prompt, 48, **sampling) == c.text
                ids = s.tokenize(prompt, add_special=True, parse_special=False)
                assert c.token_ids == s.generate_ids(ids, 48, **sampling) and c.prompt_tokens == len(ids)
                assert c.finish_reason == ("length" if len(c.token_ids) == 48 else "stop")
    assert total > 100


def test_greedy_tokens_and_penalties_agree_across_backends(tiny_bundles):
    """llama.cpp's sampler chain (gguf) and edgeq's (onnx, tvm) take the same steps: with penalties, a logit
    bias and greedy choice the three give the same tokens, and those differ from plain greedy."""
    got = {}
    for backend, (path, name) in tiny_bundles.items():
        with runtime.load(path, backend=name) as s:
            ids = s.tokenize("the rain", add_special=True, parse_special=False)
            plain = s.generate_ids(ids, 24)
            banned = max(set(plain), key=plain.count)           # the token plain greedy repeats most
            penalised = s.generate_ids(ids, 24, repeat_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.3,
                                       logit_bias={banned: -100.0})
            got[backend] = (plain, penalised)
    assert got["gguf"] == got["onnx"] == got["tvm"]
    plain, pen = got["gguf"]
    assert len(plain) == 24 and plain.count(banned) > 3 and banned not in pen
    assert len(set(pen)) > len(set(plain))          # the penalties break the plain greedy run's repetition


def test_llama_cpp_and_edgeq_samplers_draw_from_the_same_distribution(tiny_bundles):
    """Same logits, same settings: 1500 draws from llama.cpp's chain and from edgeq's numpy sampler agree within
    sampling noise (total variation), and never leave the set top-k/top-p/min-p allow."""
    path, _ = tiny_bundles["gguf"]
    settings = dict(temperature=0.7, top_k=12, top_p=0.9, min_p=0.02)
    n = 1500
    with runtime.load(path, backend="gguf") as s:
        logits = s.backend.feed(s.tokenize("snow falls on the", add_special=True, parse_special=False))
        llama = np.bincount([s.sampler(**settings, seed=i).sample(logits) for i in range(n)], minlength=logits.size)
    ours = np.bincount([NumpySampler(SamplingParams(**settings, seed=i)).sample(logits) for i in range(n)],
                       minlength=logits.size)
    allowed = set(np.argsort(-logits)[:12])
    assert set(np.flatnonzero(llama)) <= allowed and set(np.flatnonzero(ours)) <= allowed
    assert len(np.flatnonzero(ours)) >= 3                    # a real distribution, not one token
    tv = 0.5 * np.abs(llama / n - ours / n).sum()
    assert tv < 0.06, tv


def test_sampler_steps_on_known_logits():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = lambda **kw: {NumpySampler(SamplingParams(temperature=1.0, seed=i, **kw)).sample(logits)  # noqa: E731
                          for i in range(300)}
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.75) == {0, 1}                  # 0.5 + 0.3 reaches 0.75
    assert draws(top_p=0.5) == {0}
    assert draws(min_p=0.35) == {0, 1}                  # 0.15 < 0.35 * 0.5
    assert draws(logit_bias={3: 100.0}) == {3}
    s = NumpySampler(SamplingParams(repeat_penalty=10.0))
    s.accept(0)
    assert s.sample(logits) == 1                        # greedy after the penalty on the seen token
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0.0).check(4)
    with pytest.raises(RequestError, match="logit_bias"):
        SamplingParams(logit_bias={7: 1.0}).check(4)


def test_incremental_decoder_gives_whole_characters():
    """A byte-level vocabulary spells each non-ASCII character in 2-4 byte tokens: no piece ends inside one."""
    from edgeq.models.recipes.synthetic import byte_level_spec

    spec = byte_level_spec(400)
    tok = build_tokenizer(spec)
    text = "héllo wörld, 日本語のテキスト 🙂 and ascii"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text)                              # characters really are split across tokens
    d = IncrementalDecoder(lambda x: decode(tok, x))
    pieces = [d.add(t) for t in ids] + [d.flush()]
    pieces = [p for p in pieces if p]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) < len(ids)                           # the tokens of one character come out as one piece
    # an unfinished character at the end comes out as the detokenizer renders it
    d = IncrementalDecoder(lambda x: decode(tok, x))
    cut = tok.encode("ab日", add_special_tokens=False).ids[:-1]
    assert "".join(d.add(t) for t in cut) == "ab" and d.flush() == "\ufffd"


def test_stop_strings_across_pieces():
    s = StopStrings(["o, w", "END"])
    out = [s.feed(p) for p in ["Hel", "lo", ", w", "orld"]]
    assert "".join(out) == "Hell" and s.hit
    s = StopStrings(["END"])
    out = [s.feed(p) for p in ["the E", "N", "D-less end EN"]] + [s.flush()]
    assert "".join(out) == "the " and s.hit
    s = StopStrings(["END"])
    out = [s.feed(p) for p in ["an E", "nding EN"]] + [s.flush()]
    assert "".join(out) == "an Ending EN" and not s.hit


def test_stop_strings_and_max_tokens_in_the_session(tiny_bundles):
    path, _ = tiny_bundles["gguf"]
    with runtime.load(path, backend="gguf") as s:
        full = s.stream("snow falls on the", 40)
        text = full.result()
        stop = text[5:8]
        cut = s.stream("snow falls on the", 40, stop=[stop])
        assert cut.result() == text[:text.find(stop)] and cut.finish_reason == "stop"
        short = s.stream("snow falls on the", 3)
        short.result()
        assert short.completion_tokens == 3 and short.finish_reason == "length"


def test_chat_messages_through_the_template(tiny_bundles):
    path, name = tiny_bundles["onnx"]
    with runtime.load(path, backend=name) as s:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "developer", "content": "x"},
                {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "you?"}]}]
        text = s.chat_prompt(msgs)
        assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant"
                        "\nhello<|im_end|>\n<|im_start|>system\nx<|im_end|>\n<|im_start|>user\nand you?<|im_end|>\n"
                        "<|im_start|>assistant\n")
        c = s.stream(msgs, 16)
        assert c.result() == s.chat(msgs, 16) and c.prompt_tokens == len(s.tokenize(text, parse_special=True))
        for bad in ([], [{"content": "no role"}], [{"role": "user", "content": 3}],
                    [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]):
            with pytest.raises(RequestError):
                s.chat(bad)


def test_a_prompt_longer_than_the_context_is_one_error_or_truncated(tiny_bundles):
    path, name = tiny_bundles["onnx"]
    with runtime.load(path, backend=name, n_ctx=64) as s:
        long = "the rain in spain falls " * 40
        with pytest.raises(RequestError, match="context holds 64") as e:
            s.generate(long)
        assert e.value.code == "context_length_exceeded"
        c = s.stream(long, 8, truncate=True)
        c.result()
        ids = s.tokenize(long, add_special=True, parse_special=False)
        assert c.prompt_tokens == 64 - 8 and c.completion_tokens == 8
        assert c.token_ids == s.generate_ids(ids[-56:], 8)                  # the prompt's end was kept
        # a message list loses its oldest turns first, the system message stays
        turns = [{"role": "system", "content": "sys"}]
        for i in range(6):
            turns += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": "answer"}]
        turns.append({"role": "user", "content": "last"})
        kept = s.fit_messages(turns, 16)
        assert kept[0] == turns[0] and kept[-1] == turns[-1] and kept[1]["role"] == "user" and len(kept) < len(turns)
        assert len(s.tokenize(s.chat_prompt(kept), parse_special=True)) <= 64 - 16
        with pytest.raises(RequestError, match="context"):
            s.chat(turns, 16)
        assert s.stream(turns, 16, truncate=True).prompt_tokens <= 48


# --- files stock tools load ----------------------------------------------------------------------------------

TEXTS = ["the rain in spain", "Numbers 12345 and 3.14159, CAPS and ünïcödé 日本語 🙂", "line one\n\n  line  two\t.",
         "<|im_start|>user\nhi<|im_end|>"]


def test_onnx_decoder_bundle_opens_in_onnxruntime_genai_with_the_same_tokens(tiny_bundles):
    og = pytest.importorskip("onnxruntime_genai")
    path, _ = tiny_bundles["onnx"]
    model = og.Model(str(path))
    tok = og.Tokenizer(model)
    with runtime.load(path, backend="onnx") as s:
        for text in TEXTS:
            assert [int(t) for t in tok.encode(text)] == s.tokenize(text, add_special=True, parse_special=True), text
        for prompt in ("the rain", "snow falls on the", "x"):
            ids = s.tokenize(prompt, add_special=True, parse_special=False)
            want = s.generate_ids(ids, 40)
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, max_length=len(ids) + 40)
            gen = og.Generator(model, params)
            gen.append_tokens(np.array(ids, dtype=np.int32))
            got = []
            while not gen.is_done():
                gen.generate_next_token()
                got.append(int(gen.get_next_tokens()[0]))
            assert got[:len(want)] == want and (len(want) == 40 or got[len(want)] in s.stop_ids), prompt


def test_hf_tokenizer_files_load_in_transformers_as_edgeq_tokenizes(smollm_spec, tmp_path):
    """SmolLM2's tokenizer as the ONNX bundle writes it: transformers reads tokenizer.json + tokenizer_config.json
    and gives llama.cpp's ids and the same chat prompt."""
    from transformers import AutoTokenizer

    from edgeq.bundle.tokenizer import write_hf_tokenizer
    from edgeq.runtime.tokenizer import encode, render_chat

    write_hf_tokenizer(smollm_spec, tmp_path, 2048)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    tok = build_tokenizer(smollm_spec)
    for text in TEXTS:
        assert hf(text)["input_ids"] == encode(tok, smollm_spec, text), text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render_chat(smollm_spec, msgs)
    assert hf.eos_token == "<|im_end|>" and hf.model_max_length == 2048


def test_streamed_text_of_a_real_vocabulary_splits_no_character(android):
    """SmolLM2 writes Japanese in tokens that end inside characters: the pieces still hold whole ones."""
    out, _ = android
    msgs = [{"role": "user", "content": "日本語で自己紹介してください。"}]
    with runtime.load(out) as s:
        c = s.stream(msgs, 40)
        pieces = list(c)
        assert "".join(pieces) == s.detokenize(c.token_ids) == s.chat(msgs, 40)
        assert any(ord(ch) > 0x3000 for ch in c.text)                        # it did write Japanese
        assert all("\ufffd" not in p for p in pieces[:-1])
        assert len(pieces) < c.completion_tokens                             # some tokens held a part of a character


def test_a_q8_0_kv_cache_loads_and_generates(tiny_decoder_dir, tmp_path):
    """llama.cpp quantizes the V cache only with flash attention: the runtime turns it on for such bundles."""
    import json

    from edgeq.api import ExportOptions, export

    out = tmp_path / "kv8"
    export(ExportOptions(model=str(tiny_decoder_dir), quant="f32", kv_dtype="q8_0", n_ctx=256, out=str(out)))
    check = json.loads((out / "measurements.json").read_text())["reference_check"]
    assert check["kld_mean"] < 1e-3 and check["top1"] > 0.95, check
    with runtime.load(out) as s:
        assert len(s.generate_ids(s.tokenize("the rain"), 8)) == 8
