"""Hugging Face folders in: safetensors (sharded, f32/f16/bf16), Llama / Qwen2 / SmolLM configs, tokenizers."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

import llama_cpp
from gguf import GGUFReader

from edgeq.core.errors import EdgeqError
from edgeq.evaluate.decoder import log_softmax64
from edgeq.core.executor import Executor
from edgeq.importers.hf import import_hf
from edgeq.importers.hf_tokenizer import spec_from_hf_folder
from edgeq.importers.safetensors_io import SafetensorsFile, write_safetensors
from edgeq.models import llama
from edgeq.models.recipes.hf_folder import graph_to_hf_folder, write_tokenizer
from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config
from edgeq.api import ExportOptions, export
from edgeq.runtime.tokenizer import build_tokenizer, encode


def kld(ref, other) -> float:
    lr, lo = log_softmax64(ref), log_softmax64(other)
    return float(np.mean(np.sum(np.exp(lr) * (lr - lo), -1)))


def llama_cpp_logits(path, ids) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)), logits_all=True,
                          n_threads=1, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


# --- safetensors ---------------------------------------------------------------------------

def test_reader_matches_the_safetensors_library(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((7, 5)).astype(np.float32), "b": rng.standard_normal((3, 4, 2)),
              "c": rng.standard_normal((33,)).astype(np.float32), "empty": np.zeros((0, 4), np.float32)}
    for dtype in ("F32", "F16", "BF16"):
        path = tmp_path / f"{dtype}.safetensors"
        write_safetensors(path, [(k, v.shape, dtype) for k, v in arrays.items()], arrays.__getitem__)
        theirs = load_file(str(path))
        ours = SafetensorsFile(path)
        for k in arrays:
            assert str(theirs[k].dtype) == {"F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16"}[dtype]
            assert np.array_equal(ours[k].load(), theirs[k].float().numpy()), (dtype, k)
    # bfloat16 rounding is torch's (round to nearest even)
    x = rng.standard_normal(1000).astype(np.float32) * 100
    write_safetensors(tmp_path / "r.safetensors", [("x", x.shape, "BF16")], lambda _: x)
    assert np.array_equal(SafetensorsFile(tmp_path / "r.safetensors")["x"].load(),
                          torch.from_numpy(x).bfloat16().float().numpy())


@pytest.mark.parametrize("dtype,shard", [("F32", None), ("F16", 300_000), ("BF16", 150_000)])
def test_synthetic_folder_roundtrip(tmp_path, dtype, shard):
    cfg = tiny_config(vocab_size=400)
    graph = random_llama(cfg, seed=3)
    spec = byte_level_spec(cfg.vocab_size)
    folder = graph_to_hf_folder(graph, tmp_path / "m", spec, dtype=dtype, shard_bytes=shard)
    assert (folder / "model.safetensors.index.json").is_file() == (shard is not None)
    back = import_hf(folder)
    assert back.config == cfg
    assert back.metadata["tokenizer_spec"] == spec
    tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2}[dtype]
    for name, t in graph.weights.items():
        assert back.weights[name].alias == llama.gguf_name(name)
        assert back.weights[name].source_format == dtype.lower()
        np.testing.assert_allclose(back.weights[name].numpy(), t.numpy(), rtol=tol, atol=tol * 0.1)


# --- configs against transformers ------------------------------------------------------------

def _hf_model(folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    return model


def _hf_logits(model, ids):
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.logits[0].float().numpy()


def _qwen2_folder(tmp_path, tied: bool):
    cfg = tiny_config(vocab_size=400, attention_bias=True, tied_embeddings=tied, rope_theta=1e6, rms_eps=1e-6)
    graph = random_llama(cfg, seed=5, scale=0.1)
    folder = graph_to_hf_folder(graph, tmp_path / "qwen2", byte_level_spec(cfg.vocab_size))
    c = json.loads((folder / "config.json").read_text())
    qwen = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": c["vocab_size"],
            "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["num_hidden_layers"], "num_attention_heads": c["num_attention_heads"],
            "num_key_value_heads": c["num_key_value_heads"], "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "rope_scaling": None, "tie_word_embeddings": tied, "max_position_embeddings": 256, "hidden_act": "silu",
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2}
    (folder / "config.json").write_text(json.dumps(qwen))
    return cfg, graph, folder


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_folder_matches_transformers_and_llama_cpp(tmp_path, tied):
    """Qwen2: q/k/v biases implied by model_type, 4.x-style rope keys; exported as llama-arch GGUF."""
    cfg, graph, folder = _qwen2_folder(tmp_path, tied)
    g = import_hf(folder)
    assert g.config.attention_bias and g.config.rope_theta == 1e6 and g.config.tied_embeddings == tied
    ids = list(np.random.default_rng(0).integers(3, cfg.vocab_size, 48))
    ours = Executor(g).logits(ids)
    theirs = _hf_logits(_hf_model(folder), ids)
    assert kld(theirs, ours) <= 1e-6 and np.std(ours) > 0.1
    out = tmp_path / "b"
    export(ExportOptions(model=str(folder), quant="f32", out=str(out)))
    assert kld(theirs, llama_cpp_logits(out / "model.gguf", ids)) <= 1e-4


def test_llama3_rope_scaling_reaches_llama_cpp(tmp_path):
    """llama3 rope scaling from config.json becomes llama.cpp's rope_freqs.weight tensor."""
    scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = tiny_config(vocab_size=400, rope_scaling=scaling, rope_theta=500000.0)
    graph = random_llama(cfg, seed=2, scale=0.2)
    folder = graph_to_hf_folder(graph, tmp_path / "l3", byte_level_spec(cfg.vocab_size))
    g = import_hf(folder)
    assert g.config.rope_scaling == scaling
    ids = list(np.random.default_rng(1).integers(3, cfg.vocab_size, 120))
    ours = Executor(g).logits(ids)
    theirs = _hf_logits(_hf_model(folder), ids)
    assert kld(theirs, ours) <= 1e-6
    out = tmp_path / "b"
    export(ExportOptions(model=str(folder), quant="f32", out=str(out)))
    reader = GGUFReader(out / "model.gguf")
    freqs = {t.name: t for t in reader.tensors}["rope_freqs.weight"]
    np.testing.assert_array_equal(np.asarray(freqs.data), llama.llama3_rope_freqs(cfg))
    assert "llama.rope.scaling.type" not in reader.fields
    got = llama_cpp_logits(out / "model.gguf", ids)
    assert kld(theirs, got) <= 1e-4
    # without the factors llama.cpp would be measurably off: the check has teeth
    plain = Executor(random_llama(tiny_config(vocab_size=400, rope_theta=500000.0), seed=2, scale=0.2)).logits(ids)
    assert kld(theirs, plain) > 100 * kld(theirs, got)


# --- SmolLM2 as an HF folder -------------------------------------------------------------------

def test_smollm2_folder_imports_like_the_gguf(smollm_hf_dir, smollm_graph, smollm_spec):
    g = import_hf(smollm_hf_dir)
    assert g.config == smollm_graph.config
    assert list(g.weights) == list(smollm_graph.weights)
    assert g.metadata["tokenizer_spec"] == smollm_spec   # pre "smollm", every token, type and special id
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.embed_tokens.weight"):
        assert np.array_equal(g.weights[name].numpy(), smollm_graph.weights[name].numpy())


@pytest.mark.parametrize("preset", ["q8_0", "q4_k_m"])
def test_smollm2_folder_and_gguf_export_identical_tensors(preset, smollm_hf_dir, export_bundle, tmp_path):
    out = tmp_path / "hf"
    # uncalibrated like export_bundle's; calibrated exports see the same tokens (test below)
    res = export(ExportOptions(model=str(smollm_hf_dir), quant=preset, out=str(out), calibration=False))
    ours = {t.name: t for t in GGUFReader(out / "model.gguf").tensors}
    theirs = {t.name: t for t in GGUFReader(export_bundle(preset) / "model.gguf").tensors}
    assert list(ours) == list(theirs)
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    m = res["manifest"]
    assert m["source"]["name"] == smollm_hf_dir.name and m["source"]["bytes"] > 500e6
    assert m["tokenizer"]["bos_id"] == 1 and m["tokenizer"]["chat_template"]
    # same tokens, same float reference, same runtime: the bundles check out alike
    gguf_side = export_bundle(preset)
    assert (out / "reference" / "inputs.json").read_text() == (gguf_side / "reference" / "inputs.json").read_text()
    for i in range(2):
        assert np.array_equal(np.load(out / "reference" / f"logits_{i}.npy"),
                              np.load(gguf_side / "reference" / f"logits_{i}.npy"))
    theirs_check = json.loads((gguf_side / "measurements.json").read_text())["reference_check"]
    assert res["measurements"]["reference_check"]["top1"] == theirs_check["top1"]
    assert res["measurements"]["reference_check"]["kld_mean"] == pytest.approx(theirs_check["kld_mean"], rel=1e-3)


def test_smollm2_folder_calibrates_on_the_same_tokens(smollm_hf_dir, smollm_graph, tmp_path):
    from edgeq.passes.calibrate import calibration_tokens, source_digest

    hf = import_hf(smollm_hf_dir)
    assert calibration_tokens(hf) == calibration_tokens(smollm_graph)
    # the calibration cache tells the folder, the file and any merged adapter apart
    digests = {source_digest(hf), source_digest(smollm_graph)}
    merged = replace(hf, metadata={**hf.metadata, "adapters": [{"sha256": "0" * 64, "config_sha256": "1" * 64,
                                                                 "weight": 1.0}]})
    digests.add(source_digest(merged))
    assert len(digests) == 3


# --- tokenizers in the layouts the Hub uses ----------------------------------------------------

_LLAMA3_HF = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_HF = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
             "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
SAMPLE = ("Hello world! It's 2024-06-01, we've 3.14159 reasons\n\n  to   tokenize: naïve café, 日本語, "
          "emoji 🙂 and\ttabs.\r\nI'LL SHOUT, they'd whisper. x=12345678; def f(a, b):\n    return a+b  \n")


def _hub_style_tokenizer(spec, layout: str):
    """A tokenizers.Tokenizer laid out the way Hub checkpoints are (not the way edgeq builds one)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=(layout == "llama3"), fuse_unk=False,
                     byte_fallback=False)
    tok = Tokenizer(bpe)
    if layout == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif layout == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        pattern = _LLAMA3_HF if layout == "llama3" else _QWEN2_HF
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        if layout == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(spec.tokens[i], special=True, normalized=False)
                            for i, t in enumerate(spec.token_types) if t == 3])
    if layout == "llama3":
        bos = spec.tokens[spec.bos_id]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, spec.bos_id)])])
    return tok


@pytest.mark.parametrize("layout,pre", [("smollm", "smollm"), ("gpt2", "gpt-2"), ("llama3", "llama-bpe"),
                                        ("qwen2", "qwen2")])
def test_hub_tokenizer_layouts_map_to_llama_cpp_pre_types(layout, pre, smollm_spec, tmp_path):
    hub = _hub_style_tokenizer(smollm_spec, layout)
    hub.save(str(tmp_path / "tokenizer.json"))
    tc = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "__type": "AddedToken"},
          "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "chat_template": smollm_spec.chat_template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    spec = spec_from_hf_folder(tmp_path, len(smollm_spec.tokens) + 3)
    assert spec.pre == pre
    assert spec.tokens[:-3] == smollm_spec.tokens and spec.tokens[-3:] == tuple(f"[PAD{len(smollm_spec.tokens) + i}]"
                                                                                 for i in range(3))
    assert spec.token_types[-1] == 5 and spec.merges == smollm_spec.merges
    assert (spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id) == (1, 2, 0, 2)
    assert spec.add_bos == (layout == "llama3") and spec.chat_template == smollm_spec.chat_template
    # the ids llama.cpp will produce (edgeq's llama.cpp-faithful tokenizer for that pre type) are the Hub's
    ours = build_tokenizer(spec)
    for text in (SAMPLE, SAMPLE.upper(), "1234567890 " * 3, "<|im_start|>user\nhi<|im_end|>"):
        assert encode(ours, spec, text, add_special=True, parse_special=True) == hub.encode(text).ids, text


def test_unknown_tokenizer_layouts_are_refused(smollm_spec, tmp_path):
    from tokenizers import pre_tokenizers

    hub = _hub_style_tokenizer(smollm_spec, "gpt2")
    hub.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel()])
    hub.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(EdgeqError, match="tokenizer.json.*Whitespace.*no llama.cpp equivalent"):
        spec_from_hf_folder(tmp_path, len(smollm_spec.tokens))
    d = json.loads((tmp_path / "tokenizer.json").read_text())
    d["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(EdgeqError, match="no ByteLevel"):
        spec_from_hf_folder(tmp_path, len(smollm_spec.tokens))
    d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [d["pre_tokenizer"], {"type": "ByteLevel",
                          "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(EdgeqError, match="matches none that llama.cpp knows"):
        spec_from_hf_folder(tmp_path, len(smollm_spec.tokens))
    d["model"]["byte_fallback"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(EdgeqError, match="SentencePiece"):
        spec_from_hf_folder(tmp_path, len(smollm_spec.tokens))
    _hub_style_tokenizer(smollm_spec, "gpt2").save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(EdgeqError, match="embedding has only 100 rows"):
        spec_from_hf_folder(tmp_path, 100)


# --- broken folders: one line naming the file ---------------------------------------------------

@pytest.fixture
def small_folder(tmp_path):
    cfg = tiny_config(vocab_size=400)
    return graph_to_hf_folder(random_llama(cfg, seed=1), tmp_path / "m", byte_level_spec(400), shard_bytes=600_000)


def _shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[1]


def _lying(path, how):
    data = bytearray(path.read_bytes())
    hlen = int.from_bytes(data[:8], "little")
    if how == "length":
        data[:8] = (len(data) + 10).to_bytes(8, "little")
    elif how == "json":
        data[8:8 + hlen] = b"{" * hlen
    elif how == "offsets":
        h = json.loads(data[8:8 + hlen])
        name = next(k for k in h if k != "__metadata__")
        h[name]["data_offsets"][1] += 1 << 40
        h[name]["data_offsets"][0] += 1 << 40
        blob = json.dumps(h).encode()
        blob += b" " * (hlen - len(blob)) if len(blob) <= hlen else b""
        data = data[:8] + blob + data[8 + hlen:]
        data[:8] = len(blob).to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,msg", [("length", "runs past the end"), ("json", "not valid JSON"),
                                     ("offsets", "outside")])
def test_lying_shard_header(small_folder, how, msg):
    shard = _shard(small_folder)
    _lying(shard, how)
    with pytest.raises(EdgeqError, match=msg) as e:
        import_hf(small_folder)
    assert shard.name in str(e.value)


def test_folder_problems_name_the_file(small_folder):
    index = small_folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(d))
    with pytest.raises(EdgeqError, match="not a .safetensors file name in the folder"):
        import_hf(small_folder)
    _shard(small_folder).unlink()
    del d["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    index.write_text(json.dumps(d))
    with pytest.raises(EdgeqError, match="shard listed in model.safetensors.index.json is missing"):
        import_hf(small_folder)
    (small_folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EdgeqError, match="config.json: model_type 'bert' is not supported"):
        import_hf(small_folder)


def test_unexpected_and_missing_tensors(tmp_path):
    cfg = tiny_config(vocab_size=400)
    graph = random_llama(cfg, seed=1)
    names = list(graph.weights)
    folder = tmp_path / "m"
    from edgeq.models.recipes.hf_folder import write_hf_folder

    write_hf_folder(folder, cfg, lambda n: graph.weights[n].numpy(), byte_level_spec(400), names=names[:-2])
    with pytest.raises(EdgeqError, match="checkpoint has no tensor"):
        import_hf(folder)
    shapes = {**llama.expected_shapes(cfg), "model.layers.0.mlp.extra.weight": (4, 4)}
    arrays = {n: graph.weights[n].numpy() for n in names}
    arrays["model.layers.0.mlp.extra.weight"] = np.zeros((4, 4), np.float32)
    write_safetensors(folder / "model.safetensors", [(n, shapes[n], "F32") for n in arrays], arrays.__getitem__)
    with pytest.raises(EdgeqError, match="model.safetensors: unexpected tensor model.layers.0.mlp.extra.weight"):
        import_hf(folder)


def test_tokenizer_json_from_a_gguf_spec_is_saved_by_tokenizers(smollm_spec, tmp_path):
    """edgeq's tokenizer (built from the GGUF) saves as a tokenizer.json that tokenizers and transformers load."""
    transformers = pytest.importorskip("transformers")
    write_tokenizer(tmp_path, smollm_spec)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = build_tokenizer(smollm_spec)
    assert hf(SAMPLE)["input_ids"] == encode(ours, smollm_spec, SAMPLE)
    assert hf.bos_token == "<|im_start|>" and hf.eos_token == "<|im_end|>"


def test_inspect_a_folder(small_folder):
    from edgeq.bundle.inspect import inspect_path

    info = inspect_path(small_folder)
    assert info["kind"] == "hf" and info["model_type"] == "llama" and info["shards"] > 1
    assert info["tensor_dtypes"] == {"f32": len(llama.expected_shapes(tiny_config(vocab_size=400)))}
    assert info["tokenizer"].startswith("gpt2 (pre smollm)")
