"""all-MiniLM-L6-v2 through the BERT family and the ONNX target, run for real in onnxruntime.

The float reference executor is checked against transformers' BertModel; the
exported bundles are checked against the reference executor in onnxruntime.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.evaluate.encoder import cosines
from edgeq.importers.hf_bert import encoder_tokenizer
from edgeq.evaluate.texts import calibration_sentences, evaluation_sentences

EDGEQ = [sys.executable, "-m", "edgeq.cli"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """int8 through the CLI with the profile's defaults (encoder -> onnx int8); f32 and int8-dyn through the API."""
    from edgeq.api import ExportOptions, export

    root = tmp_path_factory.mktemp("onnx-enc")
    r = subprocess.run([*EDGEQ, "export", "--model", "all-MiniLM-L6-v2", "-o", str(root / "int8"), "--quiet"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    out = {"int8": root / "int8"}
    for q in ("f32", "int8-dyn", "f16"):
        export(ExportOptions(model="all-MiniLM-L6-v2", backend="onnx", quant=q, out=str(root / q)))
        out[q] = root / q
    return out


def test_bert_reference_matches_transformers(minilm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(minilm.metadata["source_path"], add_pooling_layer=False).eval()
    tok = encoder_tokenizer(minilm)
    ex = Executor(minilm)
    for s in ["The quick brown fox jumps over the lazy dog.", calibration_sentences(3)[2], "ok"]:
        ids = tok.encode(s).ids
        with torch.no_grad():
            h = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).last_hidden_state
        theirs = h[0].mean(0).numpy()
        theirs = theirs / np.linalg.norm(theirs)
        ours = ex.embed(ids)
        assert abs(float(np.linalg.norm(ours)) - 1.0) < 1e-5
        assert cosines(theirs[None], ours[None])[0] >= 0.99999


def test_f32_bundle_equals_the_reference(bundles, minilm_reference):
    from edgeq.evaluate.bundle import evaluate_bundle

    res = evaluate_bundle(bundles["f32"], sentences=48, record=False, reference_logits=minilm_reference)
    assert res["n_sentences"] == 48 and res["cosine_min"] >= 0.99999


def test_int8_bundle_fidelity_size_and_manifest(bundles, minilm_reference):
    from edgeq.evaluate.bundle import evaluate_bundle

    b = bundles["int8"]
    res = evaluate_bundle(b, sentences=256, record=True, reference_logits=minilm_reference)
    assert res["n_sentences"] >= 200
    assert res["cosine_mean"] >= 0.99 and res["cosine_min"] >= 0.95
    assert (b / "model.onnx").stat().st_size <= 0.3 * (bundles["f32"] / "model.onnx").stat().st_size
    m = json.loads((b / "manifest.json").read_text())
    assert m["plan"]["preset"] == "int8" and m["model"]["kind"] == "encoder"
    art = m["artifacts"][0]
    assert art["backend"] == "onnx" and art["formats"]["int8"] == 37     # 36 linear weights + the word embedding
    plan = m["plan"]["tensors"]
    assert plan["embeddings.word_embeddings.weight"]["format"] == "int8"
    assert plan["encoder.layer.0.attention.output.LayerNorm.weight"]["format"] == "f32"
    lo, hi = plan["encoder.layer.3.intermediate.dense.weight"]["act_range"]
    assert lo < 0 < hi
    assert [p["pass"] for p in m["passes"]] == ["assign_preset", "legalize", "calibrate_ranges",
                                                "choose_activation_ranges"]
    assert m["passes"][-1]["per_call"] == 0           # MiniLM's static ranges cost under 6 dB on every layer
    assert "dB of output SQNR" in plan["encoder.layer.3.intermediate.dense.weight"]["reason"]
    assert json.loads((b / "measurements.json").read_text())["eval"][-1]["cosine_mean"] == res["cosine_mean"]


def _optimized_ops(model_path: Path, tmp_path: Path) -> dict[str, int]:
    import onnxruntime as ort

    from edgeq.runtime.onnx_backend import session_options

    so = session_options(1)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def test_int8_runs_on_integer_kernels(bundles, tmp_path):
    """Every linear runs as an integer kernel in onnxruntime (q/k/v inside QAttention); norms stay float; nothing
    else is quantized."""
    ops = _optimized_ops(bundles["int8"] / "model.onnx", tmp_path)
    assert ops.get("MatMulIntegerToFloat", 0) == 18 and ops.get("QAttention", 0) == 6
    assert ops.get("MatMul", 0) == 0 and ops.get("DequantizeLinear", 0) == 0
    assert ops["LayerNormalization"] == 13
    assert ops["QuantizeLinear"] == 6 * 4      # q/k/v share one quantized input per layer
    dyn = _optimized_ops(bundles["int8-dyn"] / "model.onnx", tmp_path)
    assert dyn.get("DynamicQuantizeMatMul", 0) + dyn.get("MatMulIntegerToFloat", 0) == 18 and dyn["QAttention"] == 6
    assert dyn.get("MatMul", 0) == 0


def test_f16_halves_the_file_and_keeps_the_embeddings(bundles, minilm_reference):
    from edgeq.evaluate.bundle import evaluate_bundle

    res = evaluate_bundle(bundles["f16"], sentences=16, record=False, reference_logits=minilm_reference)
    assert res["cosine_min"] >= 0.9999
    size = (bundles["f16"] / "model.onnx").stat().st_size
    assert size <= 0.51 * (bundles["f32"] / "model.onnx").stat().st_size


def test_int8_dyn_fidelity(bundles, minilm_reference):
    from edgeq.evaluate.bundle import evaluate_bundle

    res = evaluate_bundle(bundles["int8-dyn"], sentences=64, record=False, reference_logits=minilm_reference)
    assert res["cosine_mean"] >= 0.99


def test_runtime_embed_pads_batches_correctly(bundles):
    from edgeq import runtime

    texts = ["a", "A much longer sentence that needs a good deal of padding for the others.", "Paris is in France."]
    with runtime.load(bundles["int8"], threads=1) as s:
        batch = s.embed(texts)
        one = np.stack([s.embed(t) for t in texts])
    assert batch.shape == (3, 384)
    assert np.allclose(batch, one, atol=2e-5)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_cli_eval_json_for_encoders(bundles, tmp_path):
    text = tmp_path / "sents.txt"
    text.write_text("\n".join(evaluation_sentences(20)) + "\n")
    r = subprocess.run([*EDGEQ, "eval", str(bundles["f32"]), "--text", str(text), "--json", "--no-record", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["backend"] == "onnx" and res["n_sentences"] == 20 and res["cosine_min"] >= 0.99999


def decide_onnx(graph, preset: str, user=None, calibration=None):
    """The ONNX export's decision for `preset` (and the user's plan), static INT8 ranges on `calibration`."""
    from edgeq.api import ExportOptions
    from edgeq.compile.decide import DecideInputs, decide
    from edgeq.passes import Context
    from edgeq.targets.profiles import get_profile
    from edgeq.targets.registry import get_target

    inputs = DecideInputs(get_target("onnx"), preset, get_profile("cpu"), user, calibration=calibration)
    return decide(graph, inputs, ExportOptions(), Context(backend="onnx")).plan


def test_same_inputs_same_bytes(minilm):
    """Decide (calibration included) and lower twice: byte-identical ONNX."""
    from edgeq.targets.onnx.lower import lower_onnx

    tok = encoder_tokenizer(minilm)
    cal = [np.array(tok.encode(s).ids) for s in calibration_sentences(6)]
    blobs = []
    for _ in range(2):
        plan = decide_onnx(minilm, "int8", calibration=cal)
        blobs.append(lower_onnx(minilm, plan).SerializeToString(deterministic=True))
    assert blobs[0] == blobs[1]
    onnx.checker.check_model(onnx.load_from_string(blobs[0]))


def test_int8_format_matches_dequantize_linear():
    """The registry's reference dequantizer is what onnxruntime's DequantizeLinear computes, bit for bit."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.core.formats import get_format
    from edgeq.core.formats.int8 import int8_quantize_rows

    fmt = get_format("int8")
    w = (np.random.default_rng(0).standard_normal((48, 96)) * np.linspace(0.01, 3, 96)).astype(np.float32)
    data = fmt.quantize(w)
    assert data.nbytes == fmt.nbytes(w.shape) == 48 * 96 + 48 * 4
    q, s = int8_quantize_rows(w)
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [48, 96])],
                          [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s"),
                           numpy_helper.from_array(np.zeros(48, np.int8), "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    ort_y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(fmt.dequantize(data, w.shape), ort_y)
    assert np.max(np.abs(ort_y - w)) <= np.max(np.abs(w)) / 127 / 2 * 1.0001


def test_bad_inputs_are_one_clear_error(minilm, tmp_path):
    from edgeq.api import ExportOptions, export
    from edgeq.core.plan import plan_from_json

    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text(json.dumps({"preset": "int8", "tensors": {"encoder.layer.9.nope.weight": "f32"}}))
    out = tmp_path / "never"
    with pytest.raises(EdgeqError, match="encoder.layer.9.nope.weight"):
        export(ExportOptions(model="all-MiniLM-L6-v2", backend="onnx", plan=str(bad_plan), out=str(out)))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    with pytest.raises(EdgeqError, match="shape"):
        decide_onnx(minilm, "int8", calibration=[np.zeros((2, 8), np.int64)])
    with pytest.raises(EdgeqError, match="outside"):
        decide_onnx(minilm, "int8", calibration=[np.array([101, 99999])])
    with pytest.raises(EdgeqError, match="presets"):
        decide_onnx(minilm, "q4_k_m")
    # a plan rule may move a tensor to another ONNX format; a GGUF-only format is refused by name
    user = plan_from_json({"rules": [{"match": "*intermediate.dense*", "format": "q4_0"}]})
    with pytest.raises(EdgeqError, match="q4_0"):
        decide_onnx(minilm, "int8", user)
    r = subprocess.run([*EDGEQ, "export", "--model", "all-MiniLM-L6-v2", "--backend", "gguf", "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "onnx" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_unsupported_model_is_refused_by_the_onnx_target():
    from edgeq.models.recipes.synthetic import random_llama, tiny_config
    from edgeq.core.plan import Plan, TensorPlan
    from edgeq.targets.onnx.lower import lower_onnx

    g = random_llama(tiny_config(n_layers=1))
    g.arch = "falcon"                          # llama decoders lower since the decoder half of issue 4
    with pytest.raises(EdgeqError, match="does not lower"):
        lower_onnx(g, Plan(tensors={n: TensorPlan("f32") for n in g.weights}))


def test_external_data_past_the_inline_limit(minilm, tmp_path):
    """Big models keep their weights in one external data file; onnxruntime loads it; bytes are deterministic."""
    import onnxruntime as ort

    from edgeq.targets.onnx.lower import lower_onnx, save_model

    plan = decide_onnx(minilm, "f32")
    files = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        files.append(save_model(lower_onnx(minilm, plan), tmp_path / str(i) / "model.onnx", inline_limit=1 << 20))
    assert [f.name for f in files[0]] == ["model.onnx", "model.onnx.data"]
    assert files[0][0].stat().st_size < 1 << 20 < files[0][1].stat().st_size
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*files))
    s = ort.InferenceSession(str(files[0][0]), providers=["CPUExecutionProvider"])
    ids = encoder_tokenizer(minilm).encode("External data works.").ids
    got = s.run(["embedding"], {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)})[0]
    assert cosines(Executor(minilm).embed(ids)[None], got)[0] >= 0.99999


def test_encoder_runtime_runs_without_torch(bundles):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from edgeq import runtime\n"
        f"s = runtime.load({str(bundles['int8'])!r})\n"
        "print(s.embed(['Hello world', 'Bonjour']).shape)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "assert 'transformers' not in sys.modules and 'onnx' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(2, 384)" in out.stdout
