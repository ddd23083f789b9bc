"""The latency predictor on ONNX encoders: fitting a recorded encoder profile, the orderings its predictions must
respect, the runner timing every kernel of an encoder bundle (fused QAttention included), and the refusals (a
profile of another model kind or backend).

The profile in tests/data was measured on the 2-core development machine (`edgeq profile --backend onnx
--model-kind encoder --quick --clock cpu`, 1 thread); its figures are only right there, so these tests check
what holds anywhere. Accuracy is measured by `edgeq profile --validate`, never in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeq.core.errors import EdgeqError
from edgeq.core.plan import Plan, TensorPlan
from edgeq.models import bert
from edgeq.predictor.design import timing_plan
from edgeq.predictor.model import Predictor
from edgeq.predictor.profile import load_profile
from edgeq.predictor.workload import FUSED_QKV, encoder_workload

PROFILE = Path(__file__).parent / "data" / "latency_profile_onnx_encoder_quick.json"
DECODER_PROFILE = Path(__file__).parent / "data" / "latency_profile_gguf_quick.json"


def edgeq(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "edgeq.cli", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"edgeq {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


@pytest.fixture(scope="module")
def fitted() -> Predictor:
    return Predictor(load_profile(PROFILE))


def minilm_like(fmt: str, n_layers: int = 6, hidden: int = 384, ffn: int = 1536):
    cfg = bert.BertConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=ffn, n_layers=n_layers,
                          n_heads=hidden // 32)
    return encoder_workload(cfg, {n: timing_plan(fmt, "") for n, s in bert.expected_shapes(cfg).items()
                                  if len(s) == 2}, "onnx")


def test_fit_on_the_recorded_encoder_profile(fitted):
    profile = fitted.profile
    assert profile.kind == "encoder" and profile.backend == "onnx"
    formats = set(fitted.fit_report()["formats"])
    # float, static and dynamic int8, weight-only blocks, and the fused q/k/v + attention kernels were all timed
    assert {"f32", "int8", "int8_dyn", "int8_b32", FUSED_QKV + "int8", FUSED_QKV + "int8_dyn"} <= formats
    assert any(f.startswith("int4") for f in formats)
    # in sample: the micro-models' calls against their measured medians (a quick profile: two micro-models, one
    # node-by-node round at load 5, so the whole-call fit has 8 points; the full profile's validation is the check)
    errors = [fitted.call_ms(run.workload, "prefill", int(key)) / np.median(vals) - 1 for run in profile.models
              for key, vals in run.prefill_ms.items()]
    assert len(errors) == 4 * len(profile.models) and np.median(np.abs(errors)) < 0.15, errors
    assert np.max(np.abs(errors)) < 0.4, errors


def test_encoder_predictions_respect_what_latency_must_do(fitted):
    w = minilm_like("f32")
    # longer sequences cost more; four times the tokens at least twice the time (attention grows faster)
    seq = [fitted.predict(w, prompt_tokens=n).prefill_ms for n in (16, 32, 64, 128, 256, 512)]
    assert seq == sorted(seq) and seq[4] / seq[2] > 2.0, seq
    # deeper and wider models cost more, format for format
    for fmt in ("f32", "int8", "int8_dyn"):
        base = fitted.predict(minilm_like(fmt)).prefill_ms
        assert fitted.predict(minilm_like(fmt, n_layers=12)).prefill_ms > 1.5 * base
        assert fitted.predict(minilm_like(fmt, hidden=512, ffn=2048)).prefill_ms > base
    # q, k and v in one int8 format run as one fused kernel: the workload says so, and prices it
    fused = minilm_like("int8_dyn")
    assert sum(m.format == FUSED_QKV + "int8_dyn" for m in fused.matmuls) == 6 and len(fused.matmuls) == 24
    p = fitted.predict(fused)
    assert p.decode_ms_per_token is None and p.to_json()["latency_ms"] == round(p.prefill_ms, 3)
    # peak memory grows with the files
    assert fitted.predict(minilm_like("f32")).peak_memory_bytes > fitted.predict(minilm_like("int4")).peak_memory_bytes


def test_a_profile_of_another_model_kind_or_backend_is_refused(fitted, tmp_path):
    from edgeq.predictor.predict import open_profile

    decoder_profile = Predictor(load_profile(DECODER_PROFILE))
    with pytest.raises(EdgeqError, match="times decoders, not encoders"):
        decoder_profile.predict(minilm_like("f32"))
    # the backend is checked first, then the model kind
    with pytest.raises(EdgeqError, match="for the onnx backend, not gguf"):
        open_profile(PROFILE, "gguf", 1)
    with pytest.raises(EdgeqError, match="times encoders, not decoders: profile with `edgeq profile --backend onnx"):
        open_profile(PROFILE, "onnx", 1, "decoder")
    r = edgeq("profile", "--backend", "gguf", "--model-kind", "encoder", check=False)
    assert r.returncode == 2 and "encoders cover the onnx backend" in r.stderr and len(r.stderr.splitlines()) == 1
    r = edgeq("profile", "--latency-profile", PROFILE, "--backend", "onnx", "--model-kind", "decoder", check=False)
    assert r.returncode == 2 and "times encoders, not decoders" in r.stderr


@pytest.fixture(scope="module")
def tiny_encoder_bundle(tmp_path_factory) -> Path:
    """A small BERT exported with a plan that mixes formats: layer 0 fuses q, k, v (int8_dyn) into QAttention,
    layer 1 has float, static int8, weight-only int4 and int8_b32 linears."""
    from edgeq.api import ExportOptions, export
    from edgeq.models.recipes.synthetic import tiny_bert_config, write_bert_folder

    root = tmp_path_factory.mktemp("enc")
    cfg = tiny_bert_config(n_layers=2, max_positions=128, context_length=128)
    src = write_bert_folder(root / "src", cfg)
    layer1 = {"attention.self.query": "f32", "attention.self.key": "int8", "attention.self.value": "int4",
              "attention.output.dense": "int8_dyn", "intermediate.dense": "int8_b32", "output.dense": "f16"}
    tensors = {}
    for name, shape in bert.expected_shapes(cfg).items():
        fmt = "f32"
        if name.startswith("encoder.layer.0.attention.self."):
            fmt = "int8_dyn" if len(shape) == 2 else "f32"
        elif name.startswith("encoder.layer.1.") and len(shape) == 2:
            fmt = layer1[name.removeprefix("encoder.layer.1.").removesuffix(".weight")]
        tensors[name] = timing_plan(fmt, "test") if len(shape) == 2 else TensorPlan(fmt)
    Plan(tensors=tensors, preset=None).save(root / "plan.json")
    export(ExportOptions(model=str(src), backend="onnx", plan=str(root / "plan.json"), out=str(root / "b"),
                         calibration=False, check=False))
    return root / "b"


def test_the_runner_times_every_kernel_of_an_encoder_bundle(tiny_encoder_bundle):
    """The profile's measurement path on the `local` device: whole calls, and node by node every linear's kernel
    inside onnxruntime, the fused QAttention under its query's name."""
    from edgeq.devices import open_device
    from edgeq.predictor.workload import bundle_workload
    from edgeq.targets.registry import get_target

    w, _, _ = bundle_workload(tiny_encoder_bundle, "onnx")
    plan = json.loads((tiny_encoder_bundle / "manifest.json").read_text())["plan"]["tensors"]
    names = get_target("onnx").kernel_names(tiny_encoder_bundle, {n: n for n in plan})
    assert sorted(set(names.values())) == sorted(m.weight for m in w.matmuls) and len(w.matmuls) == 4 + 6
    assert [m.format for m in w.matmuls][:1] == [FUSED_QKV + "int8_dyn"]
    dev = open_device("local")
    try:
        remote = dev.push(tiny_encoder_bundle)
        args = {"prefill": [16, 48], "prefill_steps": 2}
        whole = dev.run(remote, "latency", args, threads=1)
        ops = dev.run(remote, "latency", {**args, "ops": True, "kernels": sorted(names)}, threads=1)
    finally:
        dev.close()
    assert whole.ok and ops.ok, (whole.error, ops.error)
    assert len(whole.result["prefill"]["48"]["wall_s"]) == 2 and whole.result["decode"] == {}
    call = ops.result["ops"]["prefill"]["48"]
    assert sorted(call["weights_us"]) == sorted(names) and all(v > 0 for v in call["weights_us"].values())
    assert "MultiHeadAttention" in call["ops_us"] and call["call_us"] > 0


def test_predict_prices_an_encoder_bundle(tiny_encoder_bundle):
    r = edgeq("predict", tiny_encoder_bundle, "--latency-profile", PROFILE, "--prompt-tokens", "64", "--json")
    out = json.loads(r.stdout)
    assert out["kind"] == "encoder" and out["prompt_tokens"] == 64 and out["decode_ms_per_token"] is None
    assert out["latency_ms"] > 0 and out["peak_memory_bytes"] > 0 and out["backend"] == "onnx"
    r = edgeq("predict", tiny_encoder_bundle, "--latency-profile", PROFILE, "--prompt-tokens", "1000", check=False)
    assert r.returncode == 2 and "do not fit the encoder's 128 positions" in r.stderr
