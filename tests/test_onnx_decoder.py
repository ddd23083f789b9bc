"""Llama-family decoders on ONNX: the lowered graph run in onnxruntime against the reference executor.

Small synthetic models for the semantics (KV cache, GQA, tied/untied, biases,
RoPE scaling, every block format, padding, bytes); SmolLM2 for the issue's
acceptance checks (f32 fidelity and greedy tokens, int4 against GGUF q4_0 in
one `--backend all` bundle).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from decoder_checks import check_smollm_f32_fidelity, check_smollm_f32_greedy, greedy_cached, greedy_reference

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.core.formats import get_format
from edgeq.models import llama
from edgeq.models.recipes.synthetic import random_llama, tiny_config
from edgeq.core.plan import Plan, TensorPlan
from edgeq.targets.onnx.lower import lower_onnx

LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CONFIGS = {
    "gqa_tied": dict(tied_embeddings=True),
    "untied_bias": dict(tied_embeddings=False, attention_bias=True),
    "mha_llama3": dict(n_kv_heads=4, rope_scaling=LLAMA3, rope_theta=500000.0),
    "linear_rope": dict(n_kv_heads=1, rope_scaling={"type": "linear", "factor": 2.0}),
}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _plan(graph, fmt: str, embed: str | None = None) -> Plan:
    t = {n: TensorPlan(format=fmt if len(w.shape) == 2 else "f32") for n, w in graph.weights.items()}
    if embed is not None:
        t["model.embed_tokens.weight"] = TensorPlan(format=embed)
    return Plan(tensors=t)


class Runner:
    """Feeds a decoder graph the way a runtime does: attention mask over past + new, positions, the cache."""

    def __init__(self, sess: ort.InferenceSession, cfg: llama.LlamaConfig):
        self.s, self.cfg = sess, cfg

    def empty(self, batch: int = 1):
        z = np.zeros((batch, self.cfg.n_kv_heads, 0, self.cfg.head_dim), np.float32)
        return [z] * (2 * self.cfg.n_layers)

    def __call__(self, ids: np.ndarray, past, mask: np.ndarray | None = None, pos: np.ndarray | None = None):
        ids = np.atleast_2d(np.asarray(ids, np.int64))
        start = past[0].shape[2]
        feeds = {"input_ids": ids,
                 "attention_mask": mask if mask is not None else np.ones((ids.shape[0], start + ids.shape[1]), np.int64),
                 "position_ids": pos if pos is not None else np.broadcast_to(np.arange(start, start + ids.shape[1]),
                                                                             ids.shape).astype(np.int64)}
        for i in range(self.cfg.n_layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = self.s.run(None, feeds)
        return out[0], out[1:]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def synthetic(request):
    cfg = tiny_config(**CONFIGS[request.param])
    return random_llama(cfg, seed=3)


def test_kv_cache_prefill_then_decode_equals_full_recompute_and_the_executor(synthetic):
    cfg = synthetic.config
    model = lower_onnx(synthetic, _plan(synthetic, "f32"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert model.graph.input[3].name == "past_key_values.0.key" and model.graph.output[0].name == "logits"
    assert model.graph.output[2 * cfg.n_layers].name == f"present.{cfg.n_layers - 1}.value"
    run = Runner(_session(model), cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 40)
    ref = Executor(synthetic).logits(ids)
    full, present = run(ids, run.empty())
    assert present[0].shape == (1, cfg.n_kv_heads, 40, cfg.head_dim)
    # prefill 25, then one token at a time, then a chunk of 5 on top of the cache
    logits, past = run(ids[:25], run.empty())
    steps = [logits[0]]
    for j in range(25, 35):
        lg, past = run(ids[j:j + 1], past)
        steps.append(lg[0])
    lg, past = run(ids[35:], past)
    steps.append(lg[0])
    inc = np.concatenate(steps)
    scale = np.abs(ref).max()
    assert np.abs(full[0] - ref).max() <= 2e-5 * scale
    assert np.abs(inc - ref).max() <= 2e-5 * scale
    assert past[1].shape == (1, cfg.n_kv_heads, 40, cfg.head_dim)


ODD = dict(hidden_size=192, head_dim=48, intermediate_size=384)   # 3 blocks of 64 per row: padded zero points


@pytest.mark.parametrize("fmt,embed,dims", [("int4", None, {}), ("int4_asym", None, {}), ("int4_b64", "int4_b64", {}),
                                            ("int4_asym_b128", "int4_asym_b128", {}), ("int8_b32", None, {}),
                                            ("f16", None, {}), ("int4", "int8", {}),
                                            ("int4_asym_b64", "int4_asym_b64", ODD)])
def test_block_formats_compute_exactly_their_reference_dequantization(fmt, embed, dims):
    """MatMulNBits / GatherBlockQuantized in onnxruntime == the executor on the format's round-tripped weights."""
    for tied in (True, False):
        cfg = tiny_config(tied_embeddings=tied, **dims)
        graph = random_llama(cfg, seed=5)
        plan = _plan(graph, fmt, embed if not tied else None)
        run = Runner(_session(lower_onnx(graph, plan, accuracy_level=0)), cfg)
        arrays = {n: (get_format(plan.tensors[n].format).roundtrip(t.numpy()) if len(t.shape) == 2 else t.numpy())
                  for n, t in graph.weights.items()}
        ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 24)
        ref = Executor(llama.graph_from_arrays(cfg, arrays)).logits(ids)
        got, _ = run(ids, run.empty())
        assert np.abs(got[0] - ref).max() <= 2e-5 * np.abs(ref).max(), (fmt, tied)
        # and the quantization really happened: the float model differs
        assert np.abs(Executor(graph).logits(ids) - ref).max() > 1e-3 or fmt == "f16"
        if fmt in ("int4", "int8_b32"):   # the default (accuracy_level 4) quantizes activations: close, not equal
            fast = Runner(_session(lower_onnx(graph, plan)), cfg)(ids, run.empty())[0][0]
            err = np.abs(fast - ref).max() / np.abs(ref).max()
            assert 1e-6 < err < 0.05, (fmt, err)


@pytest.mark.parametrize("fmt", ["int4", "int4_asym", "int4_b64", "int4_asym_b64", "int4_asym_b128", "int8_b32",
                                 "int8", "f16", "f32"])
def test_registry_bytes_are_the_initializer_bytes(fmt):
    """Budgets and the manifest use Format.nbytes: it must equal what the ONNX file stores (scales, zero points)."""
    cfg = tiny_config(tied_embeddings=False, hidden_size=192, head_dim=48, intermediate_size=384)
    graph = random_llama(cfg, seed=2)
    name = "model.layers.0.mlp.down_proj.weight"                        # 384 columns: 3 blocks of 128, odd
    plan = _plan(graph, "f32")
    plan.tensors[name] = TensorPlan(format=fmt, act_range=[-1.0, 1.0] if fmt == "int8" else None)
    fobj = get_format(fmt)
    model = lower_onnx(graph, plan)
    stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer
                 if t.name in (name, name + "_scale", name + "_zero_point"))
    assert stored == fobj.nbytes(graph.weights[name].shape)


def test_padded_batch_gives_each_sequence_its_own_logits():
    cfg = tiny_config(tied_embeddings=True)
    graph = random_llama(cfg, seed=4)
    run = Runner(_session(lower_onnx(graph, _plan(graph, "f32"))), cfg)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, cfg.vocab_size, 12), rng.integers(0, cfg.vocab_size, 7)
    ids = np.zeros((2, 12), np.int64)
    ids[0], ids[1, 5:] = a, b                                            # left padding for the short one
    mask = np.ones((2, 12), np.int64)
    mask[1, :5] = 0
    pos = np.stack([np.arange(12), np.clip(np.arange(12) - 5, 0, None)]).astype(np.int64)
    got, past = run(ids, run.empty(2), mask, pos)
    ex = Executor(graph)
    tol = 2e-5 * np.abs(ex.logits(a)).max()
    assert np.abs(got[0] - ex.logits(a)).max() <= tol
    assert np.abs(got[1, 5:] - ex.logits(b)).max() <= tol
    # one decode step for both, continuing the padded cache
    nxt = rng.integers(0, cfg.vocab_size, 2)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    lg, _ = run(nxt[:, None], past, mask2, np.array([[12], [7]]))
    assert np.abs(lg[0, 0] - ex.logits(np.append(a, nxt[0]))[-1]).max() <= tol
    assert np.abs(lg[1, 0] - ex.logits(np.append(b, nxt[1]))[-1]).max() <= tol


# --- bundles through the pipeline, on a synthetic model ------------------------------------------------------

def _export(model: Path, out: Path, **kw) -> dict:
    from edgeq.api import ExportOptions, export

    return export(ExportOptions(model=str(model), out=str(out), **kw))


@pytest.fixture(scope="module")
def both(tiny_decoder_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("both") / "b"
    _export(tiny_decoder_dir, out, backend="all", quant="gguf=q8_0,onnx=f32")
    return out


def test_backend_all_writes_one_artifact_per_backend(both):
    m = json.loads((both / "manifest.json").read_text())
    models = [a for a in m["artifacts"] if a["role"] == "model"]
    assert [a["backend"] for a in models] == ["gguf", "onnx"]          # the profile's preferred backend first
    assert m["plans"]["onnx"]["preset"] == "f32" and m["plans"]["gguf"]["preset"] == "q8_0"
    assert models[1]["formats"] == {"f32": len(m["plans"]["onnx"]["tensors"])}
    meas = json.loads((both / "measurements.json").read_text())
    assert meas["reference_checks"]["onnx"]["kld_mean"] < 1e-8
    assert meas["reference_checks"]["gguf"]["kld_mean"] < 0.05


def test_onnx_generate_greedy_equals_the_executor_and_sampling_is_seeded(both, tiny_decoder_dir):
    from edgeq import runtime
    from edgeq.importers.loader import import_model

    ex = Executor(import_model(tiny_decoder_dir))
    with runtime.load(both, backend="onnx", threads=1) as s:
        assert s.backend_name == "onnx"
        prompt = s.tokenize("the rain in spain", add_special=True, parse_special=False)
        want = greedy_reference(ex, prompt, 32)
        assert greedy_cached(s.backend, prompt, 32) == want
        got = s.generate_ids(prompt, max_tokens=32)                   # stops at the first stop token
        assert got == want[:len(got)] and (len(got) == 32 or want[len(got)] in s.stop_ids)
        a = s.generate("the", max_tokens=12, temperature=0.9, seed=7)
        assert a == s.generate("the", max_tokens=12, temperature=0.9, seed=7)
        assert isinstance(s.generate("hello", chat=True, max_tokens=4), str)
        full = s.logits(prompt)
        assert full.shape == (len(prompt), 400)
        assert np.abs(full - ex.logits(prompt)).max() <= 1e-4 * np.abs(full).max()
    with runtime.load(both, backend="gguf", threads=1) as g:             # same ids from both tokenizers
        assert g.tokenize("the rain in spain", add_special=True, parse_special=False) == prompt


def test_eval_on_onnx_decoder_gives_the_decoder_figures(both, tiny_decoder_dir, tmp_path):
    from edgeq.evaluate.bundle import evaluate_bundle

    text = tmp_path / "t.txt"
    text.write_text("the rain in spain stays mainly in the plain. " * 60, encoding="utf-8")
    res = evaluate_bundle(both, text_file=str(text), ctx=128, chunks=2, reference=str(tiny_decoder_dir), backend="onnx",
                          record=False)
    assert res["backend"] == "onnx" and res["n_tokens_scored"] == 2 * 63
    assert res["kld_mean"] < 1e-8 and res["top1"] == 1.0
    assert set(res) >= {"ppl", "ppl_reference", "kld_p99", "kld_max", "ctx", "text"}


def test_same_inputs_byte_identical_onnx(tiny_decoder_dir, tmp_path):
    """Static QDQ where a plan asks for it (ranges calibrated into the plan), int4 with the importance matrix."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "preset": "int8", "rules": [
        {"match": "*.attn_k", "format": "int8"}, {"match": "*.attn_output", "format": "int8"},
        {"match": "*.ffn_up", "format": "int4"}]}))
    shas = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        _export(tiny_decoder_dir, out, backend="onnx", plan=str(plan), check=False)
        shas.append(hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest())
    assert shas[0] == shas[1]
    m = json.loads((out / "manifest.json").read_text())
    fmts = {n.split(".")[-2]: d["format"] for n, d in m["plan"]["tensors"].items()}
    assert fmts["k_proj"] == fmts["o_proj"] == "int8" and fmts["down_proj"] == fmts["embed_tokens"] == "int8_b32"
    assert fmts["up_proj"] == "int4" and m["plan"]["calibration"]["windows"] >= 1
    assert all(d["act_range"] for d in m["plan"]["tensors"].values() if d["format"] == "int8")


@pytest.mark.parametrize("plan,msg", [
    ({"version": 1, "preset": "int4", "tensors": {"model.layers.9.mlp.up_proj.weight": {"format": "int4"}}},
     "which the model does not have"),
    ({"version": 1, "preset": "int4", "rules": [{"match": "*.ffn_down", "format": "q4_k"}]},
     "not carried by backend onnx"),
    ({"version": 1, "preset": "int4", "rules": [{"match": "*.ffn_up", "format": "int3"}]},
     "unknown format 'int3'"),
])
def test_bad_plans_fail_in_one_line_and_write_nothing(tiny_decoder_dir, tmp_path, plan, msg):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "edgeq.cli", "export", "--model", str(tiny_decoder_dir), "--backend", "onnx",
                        "--plan", str(p), "-o", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and lines[0].startswith("edgeq: error:")
    assert not out.exists() and not any(tmp_path.glob("out*"))


def test_quant_must_name_a_preset_per_backend_with_all(tiny_decoder_dir, tmp_path):
    with pytest.raises(EdgeqError, match="gguf=q4_0,onnx=int4"):
        _export(tiny_decoder_dir, tmp_path / "x", backend="all", quant="q4_0")
    assert not (tmp_path / "x").exists()


def test_decoder_runtime_runs_without_torch(both):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from edgeq import runtime\n"
        f"s = runtime.load({str(both)!r}, backend='onnx')\n"
        "print(len(s.generate_ids(s.tokenize('the'), max_tokens=5)))\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "assert 'onnx' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


# --- SmolLM2-135M: the acceptance checks ------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_onnx_f32(tmp_path_factory) -> Path:
    from edgeq.api import ExportOptions, export

    out = tmp_path_factory.mktemp("smol-onnx") / "f32"          # ~540 MB, once for the module
    # no export-time check: the tests below run the same bundle on far more tokens
    export(ExportOptions(backend="onnx", quant="f32", out=str(out), check=False))
    return out


@pytest.fixture(scope="module")
def smollm_q4_pair(tmp_path_factory) -> Path:
    """One bundle, one calibration: GGUF q4_0 and ONNX int4 (both take the same importance matrix)."""
    from edgeq.api import ExportOptions, export

    out = tmp_path_factory.mktemp("smol-q4") / "b"
    export(ExportOptions(backend="all", quant="gguf=q4_0,onnx=int4", out=str(out), check=False))
    return out


def test_smollm_f32_onnx_matches_the_reference(smollm_onnx_f32, reference_logits):
    check_smollm_f32_fidelity(smollm_onnx_f32, "onnx", reference_logits)


def test_smollm_f32_onnx_greedy_32_tokens_with_the_cache(smollm_onnx_f32, smollm_greedy):
    check_smollm_f32_greedy(smollm_onnx_f32, "onnx", smollm_greedy)


def test_smollm_int4_within_1_2x_of_gguf_q4_0(smollm_q4_pair, reference_logits):
    from edgeq.evaluate.bundle import evaluate_bundle

    res = {b: evaluate_bundle(smollm_q4_pair, chunks=4, backend=b, record=False, reference_logits=reference_logits)
           for b in ("onnx", "gguf")}
    assert res["onnx"]["n_tokens_scored"] == res["gguf"]["n_tokens_scored"] >= 1000     # the f32 test scores 2,040
    assert res["onnx"]["kld_mean"] <= 1.2 * res["gguf"]["kld_mean"]
    m = json.loads((smollm_q4_pair / "manifest.json").read_text())
    onnx_plan = m["plans"]["onnx"]["tensors"]
    assert onnx_plan["model.layers.0.mlp.down_proj.weight"]["format"] == "int4"
    assert onnx_plan["model.embed_tokens.weight"]["format"] == "int8_b32"       # tied: Q8_0's grid, like q4_0
    art = next(a for a in m["artifacts"] if a["backend"] == "onnx" and a["role"] == "model")
    predicted = sum(get_format(d["format"]).nbytes(tuple(smollm_shape))
                    for d, smollm_shape in ((onnx_plan[n], s) for n, s in _shapes(m).items()))
    # the file is the registry's bytes plus the RoPE tables (2 x 8192 x 32 f32) and the graph itself
    assert 0 < art["bytes"] - predicted < 4_000_000


def _shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    return {n: tuple(s) for n, s in llama.expected_shapes(llama.LlamaConfig.from_json(
        manifest["model"]["config"])).items()}


def test_plan_picks_block_sizes_and_the_manifest_records_them(tiny_decoder_dir, tmp_path):
    """`edgeq plan` writes the ONNX plan; a rule moves ffn_down to blocks of 128; export carries exactly that."""
    from edgeq.cli import main

    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_decoder_dir), "--backend", "onnx", "--quant", "int4", "-o", str(plan),
                 "--quiet"]) == 0
    d = json.loads(plan.read_text())
    assert d["tensors"]["model.layers.0.mlp.down_proj.weight"]["format"] == "int4"
    assert d["calibration"]["windows"] >= 1                       # int4 takes the importance matrix
    d["rules"] = [{"match": "*.ffn_down", "format": "int4_asym_b128"}]
    del d["tensors"]["model.layers.0.mlp.down_proj.weight"], d["tensors"]["model.layers.1.mlp.down_proj.weight"]
    plan.write_text(json.dumps(d))
    out = tmp_path / "b"
    assert main(["export", "--model", str(tiny_decoder_dir), "--backend", "onnx", "--plan", str(plan), "-o", str(out),
                 "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    t = m["plan"]["tensors"]
    assert t["model.layers.1.mlp.down_proj.weight"]["format"] == "int4_asym_b128"
    assert t["model.layers.1.mlp.up_proj.weight"]["format"] == "int4"
    art = m["artifacts"][0]
    assert art["formats"]["int4_asym_b128"] == 2 and art["backend"] == "onnx"
    model = onnx.load(str(out / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith(
        "model.layers.1.mlp.down_proj")]
    assert {a.name: a.i for a in nodes[0].attribute}["block_size"] == 128 and len(nodes[0].input) == 4


def test_external_data_past_the_inline_limit_keeps_the_decoder_exact(tmp_path):
    from edgeq.targets.onnx.lower import save_model

    cfg = tiny_config(tied_embeddings=False)
    graph = random_llama(cfg, seed=6)
    plan = _plan(graph, "int4", "int4")
    files = save_model(lower_onnx(graph, plan), tmp_path / "model.onnx", inline_limit=100_000)
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"] and files[1].stat().st_size > 200_000
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    run = Runner(ort.InferenceSession(str(files[0]), so, providers=["CPUExecutionProvider"]), cfg)
    inline = Runner(_session(lower_onnx(graph, plan)), cfg)
    ids = np.arange(1, 17)
    assert np.array_equal(run(ids, run.empty())[0], inline(ids, inline.empty())[0])
