"""PEFT LoRA adapters merged into the float weights: equal to PEFT's merge_and_unload, and in llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import llama_cpp

from edgeq.evaluate.decoder import log_softmax64
from edgeq.core.fs import sha256_file
from edgeq.importers.hf import import_hf
from edgeq.models.recipes.hf_folder import graph_to_hf_folder
from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config
from edgeq.passes import Context
from edgeq.passes.merge_adapters import MergeAdapters, parse_adapter_arg
from edgeq.core.plan import Plan

EDGEQ = [sys.executable, "-m", "edgeq.cli"]


def edgeq(*args, timeout=900, input=None):
    return subprocess.run([*EDGEQ, *map(str, args)], capture_output=True, text=True, timeout=timeout, input=input)


def kld(ref, other) -> float:
    lr, lo = log_softmax64(ref), log_softmax64(other)
    return float(np.mean(np.sum(np.exp(lr) * (lr - lo), -1)))


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def make_adapter(base_folder, out: Path, seed: int = 0, std: float = 0.05, name: str = "default", model=None,
                 **lora):
    """A PEFT adapter with random nonzero A and B (PEFT would start B at zero), saved with save_pretrained."""
    torch.manual_seed(seed)
    model = model if model is not None else load_hf(base_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**lora), adapter_name=name)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn_like(p) * std
    pm.save_pretrained(out, selected_adapters=[name])
    # save_pretrained puts a non-default adapter in a sub-folder named after it
    folder = out if name == "default" else out / name
    return folder, pm


def merged_state(pm, adapter_names=None) -> dict[str, np.ndarray]:
    merged = pm.merge_and_unload(adapter_names=adapter_names)
    return {k: v.detach().float().numpy().copy() for k, v in merged.state_dict().items()}, merged


def hf_logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.logits[0].float().numpy()


def llama_cpp_logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False,
                          type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def merge(folder, adapters):
    g, _ = MergeAdapters(adapters).run(import_hf(folder), Plan(), Context(backend="gguf"))
    return g


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base(request, tmp_path_factory):
    cfg = tiny_config(vocab_size=400, tied_embeddings=request.param)
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    return graph_to_hf_folder(random_llama(cfg, seed=1, scale=0.08), folder, byte_level_spec(400))


CONFIGS = {
    "attn-mlp": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]),
    "rslora-layers": dict(r=8, lora_alpha=16, use_rslora=True, layers_to_transform=[1],
                          target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
    "embed-head": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    "all-linear-patterns": dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 2},
                                alpha_pattern={"q_proj": 3}),
    "regex-fan-in-fan-out": dict(r=4, lora_alpha=8, target_modules=r".*\.(q|k)_proj", fan_in_fan_out=True),
    "pattern-exclude": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], layers_to_transform=0,
                            layers_pattern="layers", exclude_modules=["model.layers.0.self_attn.q_proj"]),
}


@pytest.mark.parametrize("which", list(CONFIGS))
def test_merge_equals_peft_merge_and_unload(base, which, tmp_path):
    folder, pm = make_adapter(base, tmp_path / "ad", seed=3, **CONFIGS[which])
    theirs, _ = merged_state(pm)
    before = import_hf(base)
    ours = merge(base, [str(folder)])
    changed = 0
    for name, t in ours.weights.items():
        a = t.numpy()
        np.testing.assert_allclose(a, theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
        changed += not np.array_equal(a, before.weights[name].numpy())
    assert changed >= 1
    rec = ours.metadata["adapters"][0]
    assert rec["sha256"] == sha256_file(folder / "adapter_model.safetensors") and rec["weight"] == 1.0


def test_weighted_adapters_equal_peft_with_scaled_adapters(base, tmp_path):
    model = load_hf(base)
    a1, pm = make_adapter(base, tmp_path / "a1", seed=1, model=model, name="one", r=8, lora_alpha=16,
                          target_modules=["q_proj", "down_proj"])
    torch.manual_seed(2)
    pm.add_adapter("two", peft.LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]))
    for n, p in pm.named_parameters():
        if "lora_" in n and ".two." in n:
            p.data = torch.randn_like(p) * 0.05
    pm.save_pretrained(tmp_path / "a2", selected_adapters=["two"])
    a2 = tmp_path / "a2" / "two"
    for module in pm.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.set_scale("one", 0.5)
            module.set_scale("two", 1.5)
    theirs, _ = merged_state(pm, adapter_names=["one", "two"])
    ours = merge(base, [f"{a1}:0.5", f"{a2}:1.5"])
    for name, t in ours.weights.items():
        np.testing.assert_allclose(t.numpy(), theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert [a["weight"] for a in ours.metadata["adapters"]] == [0.5, 1.5]


def test_adapter_argument():
    assert parse_adapter_arg("ad") == ("ad", 1.0)
    assert parse_adapter_arg("ad:0.25") == ("ad", 0.25)
    assert parse_adapter_arg("/x/y:z/ad:-1") == ("/x/y:z/ad", -1.0)
    assert parse_adapter_arg("/x/y:z") == ("/x/y:z", 1.0)


def test_exported_f32_reproduces_peft_logits_in_llama_cpp(base, tmp_path):
    folder, pm = make_adapter(base, tmp_path / "ad", seed=4, r=8, lora_alpha=16,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj", "lm_head"])
    _, merged = merged_state(pm)
    ids = list(np.random.default_rng(0).integers(3, 400, 48))
    theirs = hf_logits(merged, ids)
    plain = hf_logits(load_hf(base), ids)
    out = tmp_path / "b"
    r = edgeq("export", "--model", base, "--adapter", f"{folder}:1", "--quant", "f32", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    got = llama_cpp_logits(out / "model.gguf", ids)
    assert kld(theirs, got) <= 1e-4
    assert kld(theirs, plain) > 100 * max(kld(theirs, got), 1e-8)   # the adapter matters: the check has teeth
    m = json.loads((out / "manifest.json").read_text())
    (ad,) = m["source"]["adapters"]
    assert ad["name"] == folder.name and ad["weight"] == 1.0
    assert ad["sha256"] == sha256_file(folder / "adapter_model.safetensors") and ad["r"] == 8
    assert any(p["pass"] == "merge_adapters" for p in m["passes"])
    # eval needs the same adapter for its float reference
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and then some more text " * 40)
    r = edgeq("eval", out, "--reference", base, "--text", text, "--ctx", "64", "--chunks", "1", "--json",
              "--no-record")
    assert r.returncode == 2 and "--adapter" in r.stderr
    r = edgeq("eval", out, "--reference", base, "--adapter", folder, "--text", text, "--ctx", "64", "--chunks", "1",
              "--json", "--no-record")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kld_mean"] <= 1e-4


# --- SmolLM2 ---------------------------------------------------------------------------------------

def test_smollm2_adapter_merges_like_peft_and_runs_in_llama_cpp(smollm_hf_dir, tmp_path):
    folder, pm = make_adapter(smollm_hf_dir, tmp_path / "smol-lora", seed=7, std=0.02, r=8, lora_alpha=16,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
    theirs, merged = merged_state(pm)
    ours = merge(smollm_hf_dir, [str(folder)])
    for name, t in ours.weights.items():
        np.testing.assert_allclose(t.numpy(), theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
    ids = list(range(500, 540))
    want = hf_logits(merged, ids)
    out = tmp_path / "b"
    r = edgeq("export", "--model", smollm_hf_dir, "--adapter", folder, "--quant", "f32", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert kld(want, llama_cpp_logits(out / "model.gguf", ids)) <= 1e-4


# --- bad adapters: one line naming the file, non-zero exit, nothing written ---------------------

def assert_clean_failure(r, name: str, out: Path, reason: str):
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1, r.stderr
    assert err[0].startswith("edgeq: error:") and name in err[0] and reason in err[0], err[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    cfg = tiny_config(vocab_size=400)
    return graph_to_hf_folder(random_llama(cfg, seed=1, scale=0.08), tmp_path_factory.mktemp("u") / "base",
                              byte_level_spec(400))


@pytest.fixture(scope="module")
def good_adapter(untied, tmp_path_factory):
    folder, _ = make_adapter(untied, tmp_path_factory.mktemp("good") / "ad", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])
    return folder


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _export(base, adapter, out):
    return edgeq("export", "--model", base, "--adapter", adapter, "--quant", "q8_0", "-o", out)


def test_adapter_for_another_base_model(untied, tmp_path):
    other = graph_to_hf_folder(random_llama(tiny_config(vocab_size=400, hidden_size=128, head_dim=32), seed=2),
                               tmp_path / "other", byte_level_spec(400))
    ad, _ = make_adapter(other, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, ad, out), "adapter_model.safetensors", out, "do not fit the base weight")


def test_adapter_for_a_deeper_model(untied, tmp_path):
    deeper = graph_to_hf_folder(random_llama(tiny_config(vocab_size=400, n_layers=3), seed=2), tmp_path / "deep",
                                byte_level_spec(400))
    ad, _ = make_adapter(deeper, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, ad, out), "adapter_model.safetensors", out,
                         "model.layers.2.self_attn.q_proj, which the base model does not have")


def test_dora_is_refused(untied, tmp_path):
    ad, _ = make_adapter(untied, tmp_path / "ad", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, ad, out), "adapter_config.json", out, "DoRA")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["use_dora"] = False          # a config that hides it: the weights file still gives it away
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    assert_clean_failure(_export(untied, ad, out), "adapter_model.safetensors", out, "DoRA")


def test_modules_to_save_is_refused(untied, tmp_path):
    ad, _ = make_adapter(untied, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"],
                         modules_to_save=["lm_head"])
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, ad, out), "adapter_config.json", out, "modules_to_save")


def test_resized_vocabulary_is_refused(untied, tmp_path):
    model = load_hf(untied)
    model.resize_token_embeddings(408)
    ad, _ = make_adapter(untied, tmp_path / "ad", model=model, r=4, lora_alpha=8,
                         target_modules=["q_proj", "embed_tokens", "lm_head"])
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, ad, out), "adapter_model.safetensors", out, "resized vocabularies")


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json"])
def test_missing_files(untied, good_adapter, tmp_path, missing):
    ad = _copy(good_adapter, tmp_path / "ad")
    (ad / missing).unlink()
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, ad, out), missing, out, "missing")


def test_missing_adapter_folder(untied, tmp_path):
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, tmp_path / "nope", out), "nope", out, "no such adapter folder")


def test_missing_module_weights(untied, good_adapter, tmp_path):
    ad = _copy(good_adapter, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "k_proj"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, ad, out), "adapter_model.safetensors", out,
                         "no lora_A and lora_B for model.layers.0.self_attn.k_proj")


def test_rank_that_lies(untied, good_adapter, tmp_path):
    ad = _copy(good_adapter, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["r"] = 16
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, ad, out), "adapter_model.safetensors", out, "r=16")


@pytest.mark.parametrize("how,reason", [("length", "runs past the end"), ("json", "not valid JSON"),
                                        ("offsets", "outside"), ("short", "not a safetensors file"),
                                        ("huge", "runs past the end")])
def test_lying_safetensors_header(untied, good_adapter, tmp_path, how, reason):
    ad = _copy(good_adapter, tmp_path / "ad")
    path = ad / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    hlen = int.from_bytes(data[:8], "little")
    if how == "length":
        data[:8] = (len(data) + 1).to_bytes(8, "little")
    elif how == "huge":
        data[:8] = (2**64 - 1).to_bytes(8, "little")
    elif how == "short":
        data = data[:5]
    elif how == "json":
        data[8:8 + hlen] = b"[" * hlen
    elif how == "offsets":
        h = json.loads(bytes(data[8:8 + hlen]))
        name = next(k for k in h if k != "__metadata__")
        h[name]["data_offsets"] = [0, 10**12]
        blob = json.dumps(h).encode()
        data = bytearray(len(blob).to_bytes(8, "little") + blob + bytes(data[8 + hlen:]))
    path.write_bytes(bytes(data))
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, ad, out), "adapter_model.safetensors", out, reason)


def test_bad_weight_and_plan_takes_adapters(untied, good_adapter, tmp_path):
    out = tmp_path / "b"
    assert_clean_failure(_export(untied, f"{good_adapter}:nan", out), good_adapter.name, out, "finite")
    plan = tmp_path / "plan.json"
    r = edgeq("plan", "--model", untied, "--adapter", good_adapter, "--quant", "q4_0", "-o", plan, "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(plan.read_text())["preset"] == "q4_0"
    r = edgeq("plan", "--model", untied, "--adapter", tmp_path / "nope", "-o", tmp_path / "p2.json")
    assert r.returncode == 2 and "no such adapter folder" in r.stderr and not (tmp_path / "p2.json").exists()


def test_adapters_need_a_decoder(good_adapter, tmp_path):
    from edgeq.models.recipes.minilm import minilm_path

    try:
        encoder = minilm_path()
    except Exception as exc:           # the encoder package is a test dependency of the ONNX work
        pytest.skip(f"all-MiniLM-L6-v2 not installed: {exc}")
    r = edgeq("plan", "--model", encoder, "--adapter", good_adapter, "-o", tmp_path / "p.json")
    assert r.returncode == 2 and "llama-family decoders" in r.stderr and r.stderr.count("\n") == 1
