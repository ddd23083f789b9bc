"""The CNN latency profile (`edgeq profile --backend onnx --model-kind cnn`): fitting the per-layer table on a
recorded profile, pricing a subnet exported through the pipeline the same way as the search's points, and the
refusals (another device, another onnxruntime, another model kind, a CNN that is not a subnet of the supernet).

The profile in tests/data was measured on the 2-core development machine (`edgeq profile --backend onnx
--model-kind cnn --quick --clock cpu --allow-noisy`, 14 subnets of the digits supernet, 3 rounds of 1000 calls,
load 8); its figures are only right there, so these tests check what holds anywhere. Accuracy is measured by
`edgeq profile --validate`, never in a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_run import edgeq

from edgeq.core.errors import EdgeqError
from edgeq.predictor.model import Predictor
from edgeq.predictor.profile import load_profile
from edgeq.predictor.workload import CnnLayer, CnnWorkload

CNN_PROFILE = Path(__file__).parent / "data" / "latency_profile_onnx_cnn_quick.json"


@pytest.fixture(scope="module")
def fitted() -> Predictor:
    return Predictor(load_profile(CNN_PROFILE))


def workload(fmt: str, scale: float = 1.0, block: bool = True) -> CnnWorkload:
    """A digits subnet's layers at full widths (8x8 images) times `scale`, every layer in `fmt`."""
    macs = {"stem.weight": 9216, "block.conv1.weight": 147456, "block.conv2.weight": 147456,
            "conv.weight": 73728, "fc.weight": 1280}
    layers = [CnnLayer(n, int(m * scale), fmt) for n, m in macs.items() if block or not n.startswith("block.")]
    return CnnWorkload(layers, 6 if fmt == "int8" else 0)


def test_fit_on_the_recorded_cnn_profile(fitted):
    profile = fitted.profile
    assert profile.kind == "cnn" and profile.backend == "onnx" and profile.clock == "cpu"
    report = fitted.fit_report()
    assert report["supernet"] == "digits" and len(report["layers"]) == 5
    # 14 subnets, 27 coefficients: the leave-one-out error is recorded, not judged here (the validation is the check)
    assert report["table"]["samples"] == 14 and "leave_one_out_mean_abs_rel_error" in report["table"]
    # in sample: the fitted subnets against their measured medians
    errors = [fitted.predict(run.workload).prefill_ms / np.median(run.prefill_ms["1"]) - 1 for run in profile.models]
    assert np.median(np.abs(errors)) < 0.1, errors
    p = fitted.predict(workload("f32"))
    assert p.kind == "cnn" and p.decode_ms_per_token is None and 0.001 < p.prefill_ms < 1.0
    j = p.to_json()
    assert j["latency_ms"] == round(p.prefill_ms, 5) and j["prompt_tokens"] == 1
    # peak memory: the runner's base plus the model file
    assert fitted.predict(CnnWorkload(workload("f32").layers, 0, file_bytes=10 << 20)).peak_memory_bytes \
        == p.peak_memory_bytes + (10 << 20)


def test_a_subnet_is_priced_like_the_search_prices_it(fitted):
    """A subnet's graph and plan (what an export predicts) give the same table features as the search's point
    (widths, formats): the profile's table and `edgeq search --supernet digits`' are one model."""
    from edgeq.predictor.cnn_design import random_points, subnets
    from edgeq.predictor.cnn_table import features, workload_features
    from edgeq.predictor.workload import cnn_workload

    models = subnets()
    sn = models.sn
    for widths, formats in random_points(2, 1):
        w = cnn_workload(models.graph(widths), models.plan(widths, formats))
        assert np.array_equal(workload_features(fitted.cnn.layers, w),
                              features(sn.layers, widths, formats, models.n_quantized(widths, formats)))


def test_a_cnn_profile_refuses_what_it_cannot_answer(fitted, tmp_path):
    from edgeq.predictor.predict import open_profile

    other = CnnWorkload([CnnLayer("features.0.weight", 1000, "f32")], 0)
    with pytest.raises(EdgeqError, match="layer features.0.weight is not a layer of supernet digits"):
        fitted.predict(other)
    with pytest.raises(EdgeqError, match="times cnns, not encoders"):
        open_profile(CNN_PROFILE, "onnx", 1, "encoder")
    with pytest.raises(EdgeqError, match="for the onnx backend, not gguf"):
        open_profile(CNN_PROFILE, "gguf", 1, "cnn")
    with pytest.raises(EdgeqError, match="measured with 1 thread"):
        open_profile(CNN_PROFILE, "onnx", 2, "cnn")
    prof = fitted.profile
    facts = {**prof.device, "cpu": "Some Other CPU", "cores": 8}
    with pytest.raises(EdgeqError, match="measured on .* not on board .*'Some Other CPU', 8 cores"):
        prof.check_device(facts, "board")
    with pytest.raises(EdgeqError, match="timed onnxruntime .* but bundle b uses onnxruntime 1.0.0"):
        prof.check_runtime({"onnxruntime": "1.0.0"}, "bundle b")
    # through the command line: a CNN profile of another device is refused in one line
    d = json.loads(CNN_PROFILE.read_text())
    p = tmp_path / "other.json"
    p.write_text(json.dumps(dict(d, device={**d["device"], "cpu": "Some Other CPU", "cores": 8})))
    r = edgeq("profile", "--latency-profile", p, "--backend", "onnx", "--model-kind", "cnn", "--validate", "1",
              "--validate-dir", tmp_path / "v", check=False)
    assert r.returncode == 2 and "measured on 'Some Other CPU' (8 cores), not on local" in r.stderr, r.stderr
    # a profile without its supernet cannot be fitted
    bad = dict(d, settings={k: v for k, v in d["settings"].items() if k != "supernet"})
    p.write_text(json.dumps(bad))
    with pytest.raises(EdgeqError, match="does not name its supernet"):
        Predictor(load_profile(p))
