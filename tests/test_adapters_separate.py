"""LoRA adapters kept apart from the base (`--adapter-mode separate`): written beside the quantized base, applied
and switched at run time without reloading it, in the backend's real runtime, against PEFT's merged model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from edgeq import runtime
from edgeq.core.fs import sha256_file
from edgeq.models.recipes.hf_folder import graph_to_hf_folder
from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config
from edgeq.runtime.manifest import BundleError

from test_adapters import assert_clean_failure, edgeq, hf_logits, kld, load_hf, make_adapter, merged_state

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BACKENDS = ("gguf", "onnx", "tvm")
FILES = {"gguf": ("model.gguf", "lora-{}.gguf"), "onnx": ("model.onnx", "lora-{}.onnx_adapter"),
         "tvm": ("params.safetensors", "lora-{}.safetensors")}
IDS = [int(i) for i in np.random.default_rng(0).integers(3, 400, 48)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untied tiny Llama, two random nonzero adapters (one with rsLoRA and a rank pattern, one on the head too),
    PEFT's merged logits for each and for both at weights 0.5 and 1.5, and one f32 bundle holding both apart."""
    t = tmp_path_factory.mktemp("sep")
    cfg = tiny_config(vocab_size=400)
    base = graph_to_hf_folder(random_llama(cfg, seed=1, scale=0.08), t / "base", byte_level_spec(400))
    model = load_hf(base)
    chat, pm = make_adapter(base, t / "chat", seed=4, model=model, name="one", r=8, lora_alpha=16,
                            target_modules=[*ALL, "lm_head"])
    torch.manual_seed(5)
    import peft

    pm.add_adapter("two", peft.LoraConfig(r=4, lora_alpha=4, use_rslora=True, rank_pattern={"down_proj": 2},
                                          target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in pm.named_parameters():
        if "lora_" in n and ".two." in n:
            p.data = torch.randn_like(p) * 0.05
    pm.save_pretrained(t / "sql", selected_adapters=["two"])
    sql = t / "sql" / "two"
    ref = {}
    for names, scales in ((["one"], (1.0,)), (["two"], (1.0,)), (["one", "two"], (0.5, 1.5))):
        for module in pm.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for n, s in zip(names, scales):
                    if n in module.scaling:
                        module.set_scale(n, s)
        pm.base_model.set_adapter(names)
        with torch.no_grad():
            ref[tuple(names)] = pm(torch.tensor([IDS]), attention_mask=torch.ones(1, len(IDS), dtype=torch.long)
                                   ).logits[0].float().numpy()
    plain = hf_logits(load_hf(base), IDS)
    bundles = {}
    for backend in BACKENDS:
        bundles[backend] = t / f"bundle-{backend}"
        r = edgeq("export", "--model", base, "--adapter", f"{chat}=chat", "--adapter", f"{sql}:0.5=sql",
                  "--adapter-mode", "separate", "--backend", backend, "--quant", "f32", "-o", bundles[backend],
                  "--quiet")
        assert r.returncode == 0, r.stderr
    return {"base": base, "chat": chat, "sql": sql, "ref": ref, "plain": plain, "bundles": bundles, "tmp": t}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_manifest_lists_each_adapter(setup, backend):
    bundle = setup["bundles"][backend]
    model_file, lora = FILES[backend]
    m = json.loads((bundle / "manifest.json").read_text())
    loras = {a["name"]: a for a in m["artifacts"] if a["role"] == "lora"}
    assert sorted(loras) == ["chat", "sql"]
    chat, sql = loras["chat"], loras["sql"]
    assert chat["path"] == lora.format("chat") and chat["applies_to"] == model_file and chat["backend"] == backend
    assert chat["rank"] == 8 and chat["scale"] == 1.0 and chat["modules"] == sorted([*ALL, "lm_head"])
    assert sql["rank"] == 4 and sql["scale"] == 0.5 and sql["modules"] == ["down_proj", "q_proj", "v_proj"]
    assert chat["source_sha256"] == sha256_file(setup["chat"] / "adapter_model.safetensors")
    assert chat["sha256"] == sha256_file(bundle / lora.format("chat"))
    assert m["source"]["adapters"] == []         # nothing merged: the base is the source model alone
    base_bytes = next(a["bytes"] for a in m["artifacts"] if a["path"] == model_file)
    assert sql["bytes"] < chat["bytes"] < base_bytes / 10


def test_f32_separate_equals_peft_merged_and_switches(setup, backend):
    ref, plain, bundle = setup["ref"], setup["plain"], setup["bundles"][backend]
    with runtime.load(bundle) as s:
        assert s.adapters == {} and sorted(s.available_adapters) == ["chat", "sql"]
        base = s.logits(IDS)
        assert kld(plain, base) <= 1e-6
        s.set_adapters(["chat"])
        chat = s.logits(IDS)
        assert kld(ref[("one",)], chat) <= 1e-4
        assert kld(ref[("one",)], plain) > 100 * max(kld(ref[("one",)], chat), 1e-8)    # the adapter matters
        s.set_adapters({"sql": 1.0})
        sql = s.logits(IDS)
        assert kld(ref[("two",)], sql) <= 1e-4 and kld(ref[("two",)], plain) > 1e-3
        s.set_adapters(["chat:0.5", "sql:1.5"])          # several at once add their deltas, as PEFT does
        assert s.adapters == {"chat": 0.5, "sql": 1.5}
        assert kld(ref[("one", "two")], s.logits(IDS)) <= 1e-4
        s.set_adapters({})
        assert np.array_equal(s.logits(IDS), base)        # back to the exact base
        s.set_adapters(["chat"])
        assert np.array_equal(s.logits(IDS), chat)
        s.set_adapters(["sql"])                           # the manifest's default scale, 0.5
        assert s.adapters == {"sql": 0.5}
        half = s.logits(IDS)
        text = s.generate("hello", max_tokens=4)          # generation after a switch runs on the switched model
        assert isinstance(text, str)
    with runtime.load(bundle, adapters=["chat"]) as fresh:
        assert np.array_equal(fresh.logits(IDS), chat)    # switching to an adapter equals loading it fresh
    with runtime.load(bundle, adapters={"sql": None}) as fresh:
        assert np.array_equal(fresh.logits(IDS), half)


def test_cli_run_and_eval_use_adapter(setup, backend, tmp_path):
    b = setup["bundles"][backend]
    runs = {w: edgeq("run", b, "abc", "--max-tokens", "6", *w) for w in ((), ("--use-adapter", "chat"))}
    for r in runs.values():
        assert r.returncode == 0, r.stderr
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and then some more text " * 40)
    common = ("--reference", setup["base"], "--text", text, "--ctx", "64", "--chunks", "1", "--json", "--no-record")
    r = edgeq("eval", b, "--use-adapter", "chat", *common)
    assert r.returncode == 2 and "--adapter" in r.stderr      # the float reference needs the adapter's folder
    r = edgeq("eval", b, "--use-adapter", "chat", "--adapter", setup["sql"], *common)
    assert r.returncode == 2 and "SHA-256" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = edgeq("eval", b, "--use-adapter", "chat:1", "--use-adapter", "sql:2", "--adapter", setup["chat"],
              "--adapter", setup["sql"], *common)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kld_mean"] <= 1e-4 and res["adapters"] == {"chat": 1.0, "sql": 2.0}


def test_serve_and_chat_use_adapter(setup):
    """`edgeq serve --use-adapter`: a request that names no adapters gets the server's, one with "adapters" its
    own (the session switched per request, not reloaded), {} the base: the runtime's greedy text for each, over
    a real HTTP client; a bad name is a 400 naming it. `edgeq chat --use-adapter` replies with the adapter on."""
    import openai
    from test_server import http, running_server

    bundle = setup["bundles"]["gguf"]
    prompt = "the cat"
    choices = {"chat": ["chat"], "sql": {"sql": 1.0}, "base": {}, "both": ["chat:0.5", "sql:1.5"]}
    with runtime.load(bundle) as s:
        want = {}
        for key, choice in choices.items():
            s.set_adapters(choice)
            want[key] = s.generate(prompt, max_tokens=8, temperature=0)
        s.set_adapters(["chat"])
        chat_reply = s.generate("hi", max_tokens=6, temperature=0, chat=True)
    assert len(set(want.values())) == len(want)           # the adapters change the text: the check can fail
    with running_server(bundle, "--use-adapter", "chat") as url:
        status, models = http(url, "/v1/models")
        card = models["data"][0]
        assert status == 200 and card["adapters"] == ["chat", "sql"] and card["default_adapters"] == {"chat": 1.0}
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def complete(**body) -> str:
            r = client.completions.create(model=card["id"], prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body=body or None)
            return r.choices[0].text

        assert complete() == want["chat"]
        for key in ("sql", "base", "both"):
            assert complete(adapters=choices[key]) == want[key], key
        assert complete() == want["chat"]                  # back to the server's own choice
        status, body = http(url, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "adapters": ["nope"]})
        assert status == 400 and "'nope'" in body["error"]["message"] and body["error"]["param"] == "adapters"
        status, body = http(url, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "adapters": ["sql:x"]})
        assert status == 400 and body["error"]["param"] == "adapters"
        assert complete() == want["chat"]                  # a refused request changed nothing
    r = edgeq("chat", bundle, "--use-adapter", "chat", "--temperature", "0", "--max-tokens", "6", input="hi\n")
    assert r.returncode == 0 and chat_reply in r.stdout, r.stderr
    r = edgeq("chat", bundle, "--use-adapter", "nope", input="hi\n")
    assert r.returncode == 2 and "'nope'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_q8_0_base_with_adapter_close_to_merged_mode(setup, tmp_path):
    """A quantized base calibrated alone, the adapter applied in float over it: about as close to PEFT's merged
    float model as merging before quantizing (the benchmark measures this on SmolLM2)."""
    outs = {}
    for mode in ("merged", "separate"):
        outs[mode] = tmp_path / mode
        r = edgeq("export", "--model", setup["base"], "--adapter", f"{setup['chat']}=chat", "--adapter-mode", mode,
                  "--quant", "q8_0", "-o", outs[mode], "--quiet")
        assert r.returncode == 0, r.stderr
    want = setup["ref"][("one",)]
    with runtime.load(outs["merged"]) as s:
        merged = kld(want, s.logits(IDS))
    with runtime.load(outs["separate"], adapters=["chat"]) as s:
        separate = kld(want, s.logits(IDS))
    assert separate <= 2 * merged + 1e-5, (separate, merged)
    assert separate < kld(want, setup["plain"]) / 100


def test_onnx_adapter_file_runs_in_stock_onnxruntime(setup):
    """The .onnx_adapter is onnxruntime's own adapter format: RunOptions.add_active_adapter feeds its tensors to
    the graph's LoRA inputs (overridable initializers, rank 0 by default), giving what edgeq's runtime gives."""
    import onnxruntime as ort

    bundle = setup["bundles"]["onnx"]
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    n = len(IDS)
    feeds = {"input_ids": np.array([IDS], np.int64), "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    opts = ort.RunOptions()
    lora = ort.LoraAdapter()
    lora.Load(str(bundle / "lora-sql.onnx_adapter"))
    opts.add_active_adapter(lora)
    stock = sess.run(["logits"], feeds, opts)[0][0]
    with runtime.load(bundle, adapters={"sql": 1.0}) as s:
        ours = s.logits(IDS)
    np.testing.assert_allclose(stock, ours, rtol=1e-5, atol=1e-5)
    assert kld(setup["ref"][("two",)], stock) <= 1e-4


# --- bad input: one line --------------------------------------------------------------------------------

def _other_base(tmp_path: Path) -> Path:
    """A model of the same family whose MLP is narrower: the adapters' shapes cannot fit the test base."""
    return graph_to_hf_folder(random_llama(tiny_config(vocab_size=400, intermediate_size=384), seed=2, scale=0.08),
                              tmp_path / "other-base", byte_level_spec(400))


def test_adapter_for_another_base_is_refused(setup, tmp_path):
    bad, _ = make_adapter(_other_base(tmp_path), tmp_path / "bad", r=4, lora_alpha=8, target_modules=ALL)
    out = tmp_path / "b"
    r = edgeq("export", "--model", setup["base"], "--adapter", bad, "--adapter-mode", "separate", "--quant", "f32",
              "-o", out)
    assert_clean_failure(r, "adapter_model.safetensors", out, "do not fit the base weight")


def test_unknown_adapter_name_is_one_line(setup):
    r = edgeq("run", setup["bundles"]["gguf"], "abc", "--use-adapter", "nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no adapter named 'nope'" in r.stderr and "chat, sql" in r.stderr
    r = edgeq("run", setup["bundles"]["gguf"], "abc", "--use-adapter", "chat:x")
    assert r.returncode == 2 and "not a number" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with runtime.load(setup["bundles"]["onnx"]) as s, pytest.raises(BundleError, match="no adapter named"):
        s.set_adapters({"chat": 1.0, "other": 1.0})


def test_tampered_adapter_file(setup, backend, tmp_path):
    b = shutil.copytree(setup["bundles"][backend], tmp_path / "b")
    sql = FILES[backend][1].format("sql")
    path = b / sql
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    r = edgeq("run", b, "abc", "--use-adapter", "chat")
    assert r.returncode == 2 and sql in r.stderr and "checksum" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # loaded unverified (a bundle this process just checked), the file is still checked when it is first read
    with runtime.load(b, verify=False) as s:
        s.set_adapters(["chat"])
        with pytest.raises(BundleError, match=f"{sql}.*checksum"):
            s.set_adapters(["sql"])
        assert s.adapters == {"chat": 1.0}


@pytest.mark.parametrize("fed", ["onnx", "tvm"])
def test_combined_adapters_are_held_once(setup, fed, tmp_path):
    """Two adapters at once are one combination of their factors, and their own arrays are dropped (each
    adapter's bytes resident once). Leaving it, a member at scale 1 gets its arrays back from the combination
    without reading its file (so a file changed since does not matter); one at another scale (sql's default 0.5)
    is read and checked anew, so its changed file is refused and the session keeps what it had. Every way back
    gives a fresh load's logits to the bit."""
    b = shutil.copytree(setup["bundles"][fed], tmp_path / "b")
    fresh = {}
    for choice in (["chat"], ["chat", "sql"]):
        with runtime.load(b, adapters=choice) as s:
            fresh[tuple(choice)] = s.logits(IDS)
    paths = {n: b / FILES[fed][1].format(n) for n in ("chat", "sql")}
    good = {n: p.read_bytes() for n, p in paths.items()}
    with runtime.load(b, adapters=["chat", "sql"]) as s:
        assert np.array_equal(s.logits(IDS), fresh[("chat", "sql")])
        assert s.backend._lora.held_alone == []        # the combination holds both adapters' bytes, once
        for n, p in paths.items():
            p.write_bytes(good[n][:-5] + bytes([good[n][-5] ^ 1]) + good[n][-4:])
        s.set_adapters(["chat"])
        assert s.backend._lora.held_alone == ["chat"]
        assert np.array_equal(s.logits(IDS), fresh[("chat",)])
        with pytest.raises(BundleError, match="checksum"):
            s.set_adapters(["chat", "sql"])
        assert s.adapters == {"chat": 1.0} and np.array_equal(s.logits(IDS), fresh[("chat",)])
        paths["sql"].write_bytes(good["sql"])
        s.set_adapters(["chat", "sql"])
        assert np.array_equal(s.logits(IDS), fresh[("chat", "sql")])
        s.set_adapters({})
        s.set_adapters(["chat"])
        assert np.array_equal(s.logits(IDS), fresh[("chat",)])


def test_adapter_file_for_another_base_in_the_runtime(setup, backend, tmp_path):
    """A bundle whose adapter file (and manifest hash) was replaced by one made for another model: the runtime's
    refusal (llama.cpp's, or the ONNX inputs' shapes) is one line naming the file."""
    b = shutil.copytree(setup["bundles"][backend], tmp_path / "b")
    sql = FILES[backend][1].format("sql")
    other = tmp_path / "other"
    bad, _ = make_adapter(_other_base(tmp_path), tmp_path / "bad", r=4, lora_alpha=8, target_modules=ALL)
    r = edgeq("export", "--model", tmp_path / "other-base", "--adapter", f"{bad}=sql", "--adapter-mode", "separate",
              "--backend", backend, "--quant", "f32", "-o", other, "--quiet")
    assert r.returncode == 0, r.stderr
    shutil.copyfile(other / sql, b / sql)
    m = json.loads((b / "manifest.json").read_text())
    for a in m["artifacts"]:
        if a["path"] == sql:
            a["sha256"], a["bytes"] = sha256_file(b / a["path"]), (b / a["path"]).stat().st_size
    (b / "manifest.json").write_text(json.dumps(m))
    r = edgeq("run", b, "abc", "--use-adapter", "sql")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert sql in r.stderr and "another base model" in r.stderr


def test_option_errors(setup, tmp_path):
    out = tmp_path / "b"
    r = edgeq("export", "--model", setup["base"], "--adapter-mode", "separate", "--quant", "f32", "-o", out)
    assert_clean_failure(r, "--adapter-mode separate", out, "needs at least one --adapter")
    r = edgeq("export", "--model", setup["base"], "--adapter", f"{setup['chat']}=chat", "--adapter",
              f"{setup['sql']}=chat", "--adapter-mode", "separate", "--quant", "f32", "-o", out)
    assert_clean_failure(r, "sql", out, "a second adapter named 'chat'")
    r = edgeq("export", "--model", setup["base"], "--adapter", f"{setup['chat']}=..bad", "--adapter-mode",
              "separate", "--quant", "f32", "-o", out)
    assert r.returncode == 2 and not out.exists()


# --- edgeq add-adapter --------------------------------------------------------------------------------

def test_add_adapter_equals_exporting_with_it(setup, backend, tmp_path):
    out = tmp_path / "b"
    r = edgeq("export", "--model", setup["base"], "--adapter", f"{setup['chat']}=chat", "--adapter-mode", "separate",
              "--backend", backend, "--quant", "f32", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "manifest.json"}
    r = edgeq("add-adapter", out, f"{setup['sql']}:0.5=sql")
    assert r.returncode == 0, r.stderr
    sql = FILES[backend][1].format("sql")
    both = setup["bundles"][backend]
    assert (out / sql).read_bytes() == (both / sql).read_bytes()       # as export writes it
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name not in ("manifest.json", sql)}
    assert after == before
    m, want = (json.loads((d / "manifest.json").read_text()) for d in (out, both))
    entry = lambda mm: next(a for a in mm["artifacts"] if a.get("name") == "sql")      # noqa: E731
    assert entry(m) == entry(want)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    with runtime.load(out, adapters=["sql"]) as s, runtime.load(both, adapters=["sql"]) as t:
        assert np.array_equal(s.logits(IDS), t.logits(IDS))
    r = edgeq("add-adapter", out, f"{setup['sql']}=sql")
    assert r.returncode == 2 and "already holds an adapter named 'sql'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_add_adapter_refusals(setup, tmp_path):
    """An ONNX graph exported with `sql` only has LoRA inputs on q, v and down: `chat` needs a new export (GGUF
    takes it); a damaged bundle is refused before anything is written."""
    out = tmp_path / "b"
    r = edgeq("export", "--model", setup["base"], "--adapter", f"{setup['sql']}=sql", "--adapter-mode", "separate",
              "--backend", "onnx", "--quant", "f32", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    manifest = (out / "manifest.json").read_bytes()
    r = edgeq("add-adapter", out, f"{setup['chat']}=chat")        # PEFT saved lm_head's full weights beside it
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--model" in r.stderr
    r = edgeq("add-adapter", out, f"{setup['chat']}=chat", "--model", setup["base"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "export again" in r.stderr
    assert (out / "manifest.json").read_bytes() == manifest and not (out / "lora-chat.onnx_adapter").exists()
    g = tmp_path / "g"
    r = edgeq("export", "--model", setup["base"], "--quant", "q8_0", "-o", g, "--quiet")     # a plain bundle
    assert r.returncode == 0, r.stderr
    r = edgeq("add-adapter", g, f"{setup['chat']}=chat", "--model", setup["base"])
    assert r.returncode == 0, r.stderr
    with runtime.load(g, adapters=["chat"]) as s:
        assert kld(setup["ref"][("one",)], s.logits(IDS)) < kld(setup["ref"][("one",)], setup["plain"]) / 100
    (g / "model.gguf").write_bytes((g / "model.gguf").read_bytes()[:-1] + b"\x01")
    r = edgeq("add-adapter", g, f"{setup['sql']}=sql")
    assert r.returncode == 2 and "model.gguf" in r.stderr and not (g / "lora-sql.gguf").exists()


# --- SHiRA sparse adapters --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shira(setup):
    """A PEFT SHiRA adapter (random mask, random nonzero values) on q_proj, down_proj and the untied head, with
    PEFT's merged logits."""
    import peft

    torch.manual_seed(9)
    pm = peft.get_peft_model(load_hf(setup["base"]), peft.ShiraConfig(r=4, target_modules=["q_proj", "down_proj",
                                                                                            "lm_head"]))
    for n, p in pm.named_parameters():
        if "shira_weight" in n:
            p.data = torch.randn_like(p) * 0.05
    folder = setup["tmp"] / "shira"
    pm.save_pretrained(folder)
    merged, model = merged_state(pm)
    return {"folder": folder, "weights": merged, "ref": hf_logits(model, IDS)}


def test_shira_merged_equals_peft(setup, shira):
    from edgeq.core.plan import Plan
    from edgeq.importers.hf import import_hf
    from edgeq.passes import Context
    from edgeq.passes.merge_adapters import MergeAdapters

    ours, _ = MergeAdapters([str(shira["folder"])]).run(import_hf(setup["base"]), Plan(), Context(backend="gguf"))
    changed = 0
    for name, t in ours.weights.items():
        np.testing.assert_allclose(t.numpy(), shira["weights"][name], rtol=1e-6, atol=1e-7, err_msg=name)
        changed += int(np.count_nonzero(t.numpy() != import_hf(setup["base"]).weights[name].numpy()))
    assert changed > 1000


def test_shira_in_place_on_tvm_and_back(setup, shira, tmp_path):
    """Applied in place over an f32 base on TVM it equals PEFT's merged model; switching back restores the exact
    base weights (and logits); with a LoRA adapter at once both deltas add."""
    out = tmp_path / "b"
    r = edgeq("export", "--model", setup["base"], "--adapter", f"{shira['folder']}=sh", "--adapter",
              f"{setup['chat']}=chat", "--adapter-mode", "separate", "--backend", "tvm", "--quant", "f32", "-o", out,
              "--quiet")
    assert r.returncode == 0, r.stderr
    entry = next(a for a in json.loads((out / "manifest.json").read_text())["artifacts"] if a.get("name") == "sh")
    assert entry["method"] == "shira" and entry["path"] == "shira-sh.safetensors" and entry["nnz"] > 0
    with runtime.load(out) as s:
        base = s.logits(IDS)
        params = [np.array(np.from_dlpack(p)) for p in s.backend.session.params]
        s.set_adapters(["sh"])
        got = s.logits(IDS)
        assert kld(shira["ref"], got) <= 1e-4 and kld(shira["ref"], setup["plain"]) > 1e-3
        s.set_adapters({"sh": 1.0, "chat": 1.0})
        both = s.logits(IDS)
        assert kld(shira["ref"], both) > 1e-3                      # the LoRA adds its own delta on top
        s.set_adapters({})
        assert np.array_equal(s.logits(IDS), base)
        assert all(np.array_equal(np.from_dlpack(p), q) for p, q in zip(s.backend.session.params, params))
        s.set_adapters(["sh"])
        assert np.array_equal(s.logits(IDS), got)


def test_shira_refusals(setup, shira, tmp_path):
    out = tmp_path / "g"
    r = edgeq("export", "--model", setup["base"], "--adapter", f"{shira['folder']}=sh", "--adapter-mode", "separate",
              "--quant", "f32", "-o", out)
    assert_clean_failure(r, "sh", out, "tvm backend only")
    t = tmp_path / "t"                     # int4 weights: an in-place sparse change would need requantizing
    r = edgeq("export", "--model", setup["base"], "--adapter", f"{shira['folder']}=sh", "--adapter-mode", "separate",
              "--backend", "tvm", "--quant", "int4", "-o", t, "--quiet")
    assert r.returncode == 0, r.stderr
    r = edgeq("run", t, "abc", "--use-adapter", "sh")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "f32 or f16" in r.stderr
