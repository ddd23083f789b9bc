"""CNNs: torch.export import checked against torch, ONNX bundles run in onnxruntime against the reference executor.

The real model is the digits CNN (models/digits.py), trained once per session
on scikit-learn's bundled digits; a small random "zoo" net covers every op of
the family with non-default attributes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from edgeq.core.errors import EdgeqError  # noqa: E402
from edgeq.core.executor import Executor  # noqa: E402
from edgeq.importers.torch_export import import_exported_program, import_module, import_pt2  # noqa: E402
from edgeq.models.recipes.digits import accuracy, train_digits_cnn  # noqa: E402

EDGEQ = [sys.executable, "-m", "edgeq.cli"]


@pytest.fixture(scope="session")
def digits():
    model, data = train_digits_cnn(seed=0)
    return model, data


@pytest.fixture(scope="session")
def digits_graph(digits):
    model, data = digits
    return import_module(model, torch.from_numpy(data.x_test[:1]), name="digits")


@pytest.fixture(scope="session")
def digits_files(digits, session_tmp):
    """The digits CNN as a user hands it over: a torch.export.save'd program, calibration and test images."""
    model, data = digits
    root = session_tmp("digits")
    torch.export.save(torch.export.export(model, (torch.from_numpy(data.x_test[:1]),)), root / "digits.pt2")
    np.savez(root / "calib.npz", images=data.x_train[:256])
    np.savez(root / "test.npz", images=data.x_test, labels=data.y_test)
    return root


@pytest.fixture(scope="session")
def digits_bundles(digits, session_tmp):
    """Every ONNX preset of the digits CNN through the Python API (static int8 calibrated on training images)."""
    from edgeq import export_module

    model, data = digits
    root = session_tmp("digits-onnx")
    out = {}
    for q in ("f32", "f16", "int8", "int8-dyn"):
        export_module(model, torch.from_numpy(data.x_test[:1]), root / q, quant=q,
                      calib_images=data.x_train[:256] if q == "int8" else None, name="digits")
        out[q] = root / q
    return out


def _zoo():
    from torch import nn

    class Zoo(nn.Module):
        """Every op of the CNN family with non-default attributes (stride, dilation, groups, padding)."""

        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.pw = nn.Conv2d(8, 8, 1)
            self.mp = nn.MaxPool2d(3, stride=2, padding=1)
            self.ap = nn.AvgPool2d(2, stride=1, padding=1)
            self.c3 = nn.Conv2d(8, 12, (3, 1), padding=(1, 0))
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(12, 5)

        def forward(self, x):
            x = torch.relu(self.bn1(self.c1(x)))
            y = nn.functional.relu6(self.bn2(self.dw(x)))
            x = self.pw(y) + x
            x = self.ap(self.mp(x))
            x = torch.relu(self.c3(x))
            return self.fc(self.gap(x).flatten(1))

    torch.manual_seed(0)
    m = Zoo()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):     # non-trivial statistics, so folding is really exercised
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def _run_onnx(path: Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    from edgeq.runtime.onnx_backend import open_session

    return open_session(path, threads).run(["logits"], {"images": x})[0]


# --- import ------------------------------------------------------------------------

def test_digits_cnn_trains_and_the_executor_matches_torch(digits, digits_graph):
    model, data = digits
    assert len(data.x_test) >= 300
    with torch.no_grad():
        theirs = model(torch.from_numpy(data.x_test)).numpy()
    assert accuracy(theirs, data.y_test) >= 0.95
    ours = Executor(digits_graph).run_inputs({"images": data.x_test})["logits"]
    assert ours.shape == (len(data.x_test), 10)
    assert np.abs(ours - theirs).max() <= 1e-5 * max(1.0, float(np.abs(theirs).max()))
    ops = [n.op for n in digits_graph.nodes]
    assert "batch_norm" not in ops and ops.count("conv2d") == 4 and "add" in ops and "relu6" in ops
    assert "block.conv1.bias" in digits_graph.weights           # folded bias under the conv's own name


def test_digits_recipe_is_deterministic(digits):
    model, _ = digits
    again, _ = train_digits_cnn(seed=0)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_every_op_imports_and_matches_torch_decomposed_or_not():
    m = _zoo()
    x = torch.randn(3, 3, 17, 15, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = m(x).numpy()
    g = import_module(m, x)
    assert {n.op for n in g.nodes} == {"conv2d", "relu", "relu6", "add", "max_pool2d", "avg_pool2d",
                                       "global_avg_pool", "flatten", "linear"}
    assert np.abs(Executor(g).run_inputs({"images": x.numpy()})["logits"] - theirs).max() <= 1e-5
    core = import_exported_program(torch.export.export(m, (x,)).run_decompositions())
    assert [n.op for n in core.nodes] == [n.op for n in g.nodes]
    assert np.abs(Executor(core).run_inputs({"images": x.numpy()})["logits"] - theirs).max() <= 1e-5


def test_unsupported_ops_name_the_op_and_the_module():
    from torch import nn

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 3), nn.Sigmoid())

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)))

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(8, 4, batch_first=True)

        def forward(self, x):
            return self.rnn(x[:, 0])[0][:, -1]

    with pytest.raises(EdgeqError, match=r"unsupported op sigmoid in module head\.2 \(Sigmoid\)"):
        import_module(Gate(), torch.zeros(1, 1, 8, 8))
    class Swish(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU())

        def forward(self, x):
            return self.features(x).mean((2, 3))

    with pytest.raises(EdgeqError, match=r"unsupported op silu in module features\.1 \(SiLU\)"):
        import_module(Swish(), torch.zeros(1, 1, 8, 8))
    # an LSTM needs its input reshaped first: the first op outside the family is the one named
    with pytest.raises(EdgeqError, match=r"unsupported op select in module <root> \(Recurrent\)") as e:
        import_module(Recurrent(), torch.zeros(1, 1, 8, 8))
    assert "\n" not in str(e.value)


def test_pt2_archives_are_checked_before_torch_reads_them(digits_files, tmp_path):
    g = import_pt2(digits_files / "digits.pt2")
    assert g.kind == "cnn" and g.config.image_shape == (1, 8, 8) and g.config.n_classes == 10
    src = zipfile.ZipFile(digits_files / "digits.pt2")
    root = src.namelist()[0].split("/")[0]
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(evil, "w") as z:       # a legacy pickled weights file slipped into a real archive
        for i in src.infolist():
            z.writestr(i.filename, src.read(i.filename))
        z.writestr(f"{root}/data/weights/model.pt", b"\x80\x04cos\nsystem\n.")
    with pytest.raises(EdgeqError, match="is a pickle"):
        import_pt2(evil)
    pickled = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(pickled, "w") as z:    # a weight marked as pickled in the payload config
        for i in src.infolist():
            data = src.read(i.filename)
            if i.filename.endswith("model_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            z.writestr(i.filename, data)
    with pytest.raises(EdgeqError, match="pickled object"):
        import_pt2(pickled)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(EdgeqError, match="not a torch.export archive"):
        import_pt2(tmp_path / "junk.pt2")


# --- ONNX ----------------------------------------------------------------------------

def test_f32_and_f16_bundles_match_the_reference(digits, digits_graph, digits_bundles):
    _, data = digits
    ref = Executor(digits_graph).run_inputs({"images": data.x_test})["logits"]
    got = _run_onnx(digits_bundles["f32"] / "model.onnx", data.x_test)
    assert np.abs(got - ref).max() <= 1e-4
    half = _run_onnx(digits_bundles["f16"] / "model.onnx", data.x_test)
    assert np.mean(half.argmax(1) == ref.argmax(1)) >= 0.99
    size = lambda q: (digits_bundles[q] / "model.onnx").stat().st_size  # noqa: E731
    assert size("f16") < 0.6 * size("f32") and size("int8") < 0.4 * size("f32")
    m = onnx.load(str(digits_bundles["f32"] / "model.onnx"))
    onnx.checker.check_model(m)
    assert m.opset_import[0].version >= 17
    assert {n.op_type for n in m.graph.node} <= {"Conv", "Relu", "Clip", "MaxPool", "AveragePool", "Flatten", "Gemm",
                                                 "Add", "Identity"}


def test_int8_within_one_point_of_float_on_held_out_digits(digits, digits_graph, digits_bundles, digits_files):
    from edgeq.evaluate.bundle import evaluate_bundle

    _, data = digits
    ex = Executor(digits_graph)
    ref = lambda x: ex.run_inputs({"images": x})["logits"]  # noqa: E731
    res = evaluate_bundle(digits_bundles["int8"], images=str(digits_files / "test.npz"), reference_logits=ref)
    assert res["n_images"] >= 300 and res["backend"] == "onnx"
    assert res["accuracy_reference"] >= 0.95
    assert res["accuracy"] >= res["accuracy_reference"] - 0.01
    assert res["agreement"] >= 0.97
    dyn = evaluate_bundle(digits_bundles["int8-dyn"], images=str(digits_files / "test.npz"), reference_logits=ref,
                          record=False)
    assert dyn["accuracy"] >= dyn["accuracy_reference"] - 0.01
    m = json.loads((digits_bundles["int8"] / "manifest.json").read_text())
    assert m["model"]["kind"] == "cnn" and m["plan"]["preset"] == "int8"
    assert set(m["plan"]["activations"]) == {"images", "relu", "relu_1", "conv2d_2", "relu_2", "hardtanh"}
    assert m["plan"]["calibration"]["images"] == 256
    assert json.loads((digits_bundles["int8"] / "measurements.json").read_text())["eval"][-1]["accuracy"] == res["accuracy"]


def test_int8_runs_on_integer_kernels(digits_bundles, tmp_path):
    """onnxruntime turns every QDQ conv into QLinearConv, the residual add into QLinearAdd, the classifier into QGemm;
    the last conv is flattened in NHWC order, so the only transpose left is the image's into NHWC."""
    import onnxruntime as ort

    from edgeq.runtime.onnx_backend import session_options

    so = session_options(1)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(digits_bundles["int8"] / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 4 and "QLinearAdd" in ops and "QGemm" in ops
    assert "Conv" not in ops and "DequantizeLinear" not in ops and "Gemm" not in ops
    assert ops.count("Transpose") == 1 and ops.index("Transpose") < ops.index("QLinearConv")


def test_int8_nhwc_flatten_is_exact(digits, digits_bundles, tmp_path, monkeypatch):
    """The int8 last conv flattened in NHWC order (a Transpose, the classifier's columns permuted) gives the same
    logits, bit for bit, as the NCHW flatten it replaces (the lowering with the rewrite turned off)."""
    from edgeq import export_module
    from edgeq.targets.onnx import cnn

    model, data = digits
    monkeypatch.setattr(cnn, "nhwc_flattens", lambda *a: {})
    export_module(model, torch.from_numpy(data.x_test[:1]), tmp_path / "nchw", quant="int8",
                  calib_images=data.x_train[:256], name="digits")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "nchw" / "model.onnx")).graph.node]
    assert "Transpose" not in ops
    assert "Transpose" in [n.op_type for n in onnx.load(str(digits_bundles["int8"] / "model.onnx")).graph.node]
    assert np.array_equal(_run_onnx(tmp_path / "nchw" / "model.onnx", data.x_test),
                          _run_onnx(digits_bundles["int8"] / "model.onnx", data.x_test))


def test_every_op_lowers_and_runs(tmp_path):
    from edgeq import export_module

    m = _zoo()
    x = np.random.default_rng(0).standard_normal((6, 3, 17, 15)).astype(np.float32)
    ref = Executor(import_module(m, torch.from_numpy(x[:1]))).run_inputs({"images": x})["logits"]
    export_module(m, torch.from_numpy(x[:1]), tmp_path / "f32", quant="f32")
    assert np.abs(_run_onnx(tmp_path / "f32" / "model.onnx", x) - ref).max() <= 1e-4
    for q in ("int8", "int8-dyn"):
        export_module(m, torch.from_numpy(x[:1]), tmp_path / q, quant=q, calib_images=x if q == "int8" else None)
        got = _run_onnx(tmp_path / q / "model.onnx", x)
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        assert rel <= 0.15, (q, rel)           # a random net on noise: a smoke check that every op runs quantized


def test_same_inputs_same_bytes(digits, tmp_path):
    from edgeq import export_module

    model, data = digits
    for d in ("a", "b"):
        export_module(model, torch.from_numpy(data.x_test[:1]), tmp_path / d, quant="int8",
                      calib_images=data.x_train[:64], name="digits", check=False)
    for f in ("model.onnx", "manifest.json", "reference/images.npy", "reference/logits.npy"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_cli_export_and_eval_from_a_pt2(digits_files, tmp_path):
    out = tmp_path / "b"
    r = subprocess.run([*EDGEQ, "export", "--model", str(digits_files / "digits.pt2"), "--calib-images",
                        str(digits_files / "calib.npz"), "-o", str(out), "--quiet"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["artifacts"][0]["backend"] == "onnx" and m["plan"]["preset"] == "int8"    # the profile's default
    r = subprocess.run([*EDGEQ, "eval", str(out), "--images", str(digits_files / "test.npz"), "--reference",
                        str(digits_files / "digits.pt2"), "--json", "--no-record"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["n_images"] >= 300 and res["accuracy"] >= res["accuracy_reference"] - 0.01
    r = subprocess.run([*EDGEQ, "eval", str(out), "--images", str(digits_files / "test.npz")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2 and "cannot find the source model 'digits.pt2'; pass --reference PATH" in r.stderr
    from edgeq import runtime

    with runtime.load(out, threads=1) as s:
        logits = s.run({"images": np.load(out / "reference" / "images.npy")})["logits"]
    assert np.mean(logits.argmax(1) == np.load(out / "reference" / "logits.npy").argmax(1)) >= 0.75


def test_bad_inputs_are_one_clear_error_and_write_nothing(digits, digits_files, tmp_path):
    from edgeq import export_module

    model, data = digits
    example = torch.from_numpy(data.x_test[:1])
    np.savez(tmp_path / "wrong.npz", images=data.x_train[:10, :, :4])
    r = subprocess.run([*EDGEQ, "export", "--model", str(digits_files / "digits.pt2"), "--calib-images",
                        str(tmp_path / "wrong.npz"), "-o", str(tmp_path / "o1")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2
    assert "wrong.npz: 'images' has shape (10, 1, 4, 8)" in r.stderr and "expected (n, 1, 8, 8) float32" in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) < 300 and not (tmp_path / "o1").exists()
    with pytest.raises(EdgeqError, match="static int8 needs calibration images"):
        export_module(model, example, tmp_path / "o2", quant="int8")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"preset": "int8", "activations": {"images": [0, 1], "relu_9": [0, 4]}}))
    with pytest.raises(EdgeqError, match="plan names activation 'relu_9', which the model does not have"):
        export_module(model, example, tmp_path / "o3", quant="int8", plan=str(plan))
    plan.write_text(json.dumps({"preset": "int8", "tensors": {"fc.weigth": "int8"}}))
    with pytest.raises(EdgeqError, match="plan names tensor 'fc.weigth'"):
        export_module(model, example, tmp_path / "o4", quant="int8", plan=str(plan), calib_images=data.x_train[:8])
    assert not any(p.name.startswith(("o2", "o3", "o4", ".o")) for p in tmp_path.iterdir())


def test_a_plan_keeps_an_activation_float(digits, digits_graph, tmp_path):
    """Leaving an activation out of the plan's `activations` keeps it float there: the residual stays a float Add."""
    from edgeq import export_module

    model, data = digits
    plan = tmp_path / "plan.json"
    acts = {"images": [0.0, 1.0], "relu": [0.0, 4.0], "relu_1": [0.0, 5.0], "relu_2": [0.0, 10.0], "hardtanh": [0.0, 6.0]}
    plan.write_text(json.dumps({"preset": "int8", "activations": acts}))
    export_module(model, torch.from_numpy(data.x_test[:1]), tmp_path / "b", quant="int8", plan=str(plan))
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["plan"]["activations"] == acts
    ref = Executor(digits_graph).run_inputs({"images": data.x_test})["logits"]
    got = _run_onnx(tmp_path / "b" / "model.onnx", data.x_test)
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.97


def test_int8_conv_weights_count_one_scale_per_output_channel(digits_graph, digits_bundles):
    from edgeq.core.formats import get_format

    fmt = get_format("int8")
    w = digits_graph.weights["block.conv1.weight"].numpy()                  # (16, 16, 3, 3)
    assert fmt.nbytes(w.shape) == 16 * (16 * 9 + 4)
    back = fmt.roundtrip(w)
    scale = np.abs(w).reshape(16, -1).max(1) / 127
    assert back.shape == w.shape and np.abs(back - w).max() <= scale.max() / 2 + 1e-7
    m = json.loads((digits_bundles["int8"] / "manifest.json").read_text())
    expect = sum(fmt.nbytes(t.shape) if len(t.shape) > 1 else 4 * t.n_elements for t in digits_graph.weights.values())
    assert m["model"]["weight_bytes"] == expect


def test_cnn_runtime_runs_without_torch(digits_bundles):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from edgeq import runtime\n"
        f"s = runtime.load({str(digits_bundles['int8'])!r}, threads=2)\n"
        f"x = np.load({str(digits_bundles['int8'] / 'reference' / 'images.npy')!r})\n"
        "print(s.run({'images': x})['logits'].shape)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "assert 'onnx' not in sys.modules and 'sklearn' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(8, 10)" in out.stdout


def test_cli_plan_for_a_cnn_records_the_activation_ranges(digits_files, tmp_path):
    r = subprocess.run([*EDGEQ, "plan", "--model", str(digits_files / "digits.pt2"), "--quant", "int8",
                        "--calib-images", str(digits_files / "calib.npz"), "-o", str(tmp_path / "plan.json"), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["activations"]["images"] == [0.0, 1.0] and plan["activations"]["relu"][0] == 0.0
    assert plan["tensors"]["fc.weight"]["format"] == "int8"


def test_inspect_describes_a_pt2_and_a_cnn_bundle(digits_files, digits_bundles):
    from edgeq.bundle.inspect import inspect_path

    info = inspect_path(digits_files / "digits.pt2")
    assert info["classes"] == 10 and info["ops"]["conv2d"] == 4
    b = inspect_path(digits_bundles["int8"])
    assert b["preset"] == "int8" and b["checksums"] == "ok" and b["reference_agreement"] >= 0.75
