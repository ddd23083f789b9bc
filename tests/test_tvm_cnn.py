"""The TVM CNN lowering on a small CNN graph built by hand from the IR contract's ops (notes: cnn_contract),
compiled with LLVM and run by the TVM runtime, against torch.nn.functional on the same weights.

For the quantized presets the reference uses the formats' own round trip of each weight, so the
comparison is tight: it checks that TVM computes with exactly the stored values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm")
torch = pytest.importorskip("torch")
F = torch.nn.functional

from edgeq.core.formats import get_format                      # noqa: E402
from edgeq.core.ir import Graph, Node, Tensor, Value           # noqa: E402
from edgeq.core.plan import Plan                               # noqa: E402


def _t(name, arr):
    return Tensor(name=name, shape=tuple(arr.shape), load=lambda a=arr: a)


def small_cnn(seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)
    shapes = {"c1.weight": (8, 1, 3, 3), "c1.bias": (8,), "c2.weight": (8, 8, 3, 3), "c2.bias": (8,),
              "c3.weight": (32, 8, 2, 2), "c3.bias": (32,), "fc.weight": (10, 32), "fc.bias": (10,)}
    arrays = {n: (0.3 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
    nodes = [
        Node("conv2d", ["images", "c1.weight", "c1.bias"], ["h1"], {"stride": (1, 1), "padding": (1, 1),
                                                                    "dilation": (1, 1), "groups": 1}),
        Node("relu", ["h1"], ["r1"]),
        Node("conv2d", ["r1", "c2.weight", "c2.bias"], ["h2"], {"stride": (1, 1), "padding": (1, 1),
                                                                "dilation": (1, 1), "groups": 1}),
        Node("add", ["h2", "r1"], ["s2"]),
        Node("relu6", ["s2"], ["r2"]),
        Node("max_pool2d", ["r2"], ["p2"], {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0)}),
        Node("conv2d", ["p2", "c3.weight", "c3.bias"], ["h3"], {"stride": (1, 1), "padding": (0, 0),
                                                                "dilation": (1, 1), "groups": 1}),
        Node("relu", ["h3"], ["r3"]),
        Node("avg_pool2d", ["r3"], ["a3"], {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1)}),
        Node("global_avg_pool", ["a3"], ["g"]),
        Node("flatten", ["g"], ["f"], {"start_dim": 1}),
        Node("linear", ["f", "fc.weight", "fc.bias"], ["logits"]),
    ]
    return Graph(arch="cnn", kind="cnn", config=None, inputs=[Value("images", ("batch", 1, 8, 8), "f32")],
                 outputs=[Value("logits", ("batch", 10), "f32")], nodes=nodes,
                 weights={n: _t(n, a) for n, a in arrays.items()})


def torch_reference(graph: Graph, plan: Plan, x: np.ndarray) -> np.ndarray:
    """The same network in torch, each weight replaced by its format's round trip."""
    w = {}
    for n, t in graph.weights.items():
        a = t.numpy()
        fmt = plan.tensors[n].format
        w[n] = torch.from_numpy(a if a.ndim == 1 or fmt == "f32" else get_format(fmt).roundtrip(a).reshape(a.shape))
    h = torch.from_numpy(x)
    r1 = F.relu(F.conv2d(h, w["c1.weight"], w["c1.bias"], padding=1))
    r2 = torch.clamp(F.conv2d(r1, w["c2.weight"], w["c2.bias"], padding=1) + r1, 0, 6)
    p2 = F.max_pool2d(r2, 2, 2)
    r3 = F.relu(F.conv2d(p2, w["c3.weight"], w["c3.bias"]))
    a3 = F.avg_pool2d(r3, 3, 1, 1, count_include_pad=True)
    g = a3.mean(dim=(2, 3))
    return F.linear(g, w["fc.weight"], w["fc.bias"]).numpy()


@pytest.fixture(scope="module")
def graph():
    return small_cnn()


@pytest.mark.parametrize("quant", ["f32", "f16", "int8", "int4"])
def test_cnn_preset_runs_in_tvm_like_torch(graph, quant):
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from edgeq.targets.tvm.build import compile_module
    from edgeq.targets.tvm.lower import lower_tvm
    from edgeq.targets.tvm.presets import preset_formats

    plan = Plan(tensors=preset_formats(graph, quant))
    if quant == "int4":   # c3 (8*2*2 = 32 inputs per channel) and fc (32) take int4; c1, c2 fall back to int8
        assert plan.tensors["c3.weight"].format == plan.tensors["fc.weight"].format == "int4_g32"
        assert plan.tensors["c2.weight"].format == "int8_wo" and plan.tensors["c2.weight"].requested == "int4_g32"
    lowered = lower_tvm(graph, plan)
    ex = compile_module(lowered.mod, {"kind": "llvm"})
    dev = tvm.cpu()
    vm = VirtualMachine(ex, dev)
    params = [tvm.runtime.tensor(a, dev) for a in lowered.params.values()]
    for batch in (1, 5):                                    # the batch is symbolic
        x = np.random.default_rng(batch).random((batch, 1, 8, 8), dtype=np.float32)
        got = vm["main"](tvm.runtime.tensor(x, dev), *params).numpy()
        ref = torch_reference(graph, plan, x)
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 if quant != "f16" else 2e-3)
    stored = sum(a.nbytes for n, a in lowered.params.items() if n.startswith("c3.weight"))
    assert stored == get_format(plan.tensors["c3.weight"].format).nbytes(graph.weights["c3.weight"].shape)


# --- the digits CNN (acceptance), through the real importer and the bundle path ---------------------------

@pytest.fixture(scope="module")
def digits_tvm(tmp_path_factory):
    from edgeq import export_module
    from edgeq.models.recipes.digits import train_digits_cnn

    model, data = train_digits_cnn(seed=0)
    root = tmp_path_factory.mktemp("digits-tvm")
    np.savez(root / "test.npz", images=data.x_test, labels=data.y_test)
    out = {}
    for q in ("f32", "int8"):
        export_module(model, torch.from_numpy(data.x_test[:1]), root / q, quant=q, name="digits", backend="tvm")
        out[q] = root / q
    return model, data, root, out


def test_digits_int8_on_tvm_within_one_point_of_float(digits_tvm):
    from edgeq.evaluate.bundle import evaluate_bundle
    from edgeq.core.executor import Executor
    from edgeq.importers.torch_export import import_module

    model, data, root, bundles = digits_tvm
    ex = Executor(import_module(model, torch.from_numpy(data.x_test[:1]), name="digits"))
    ref = lambda x: ex.run_inputs({"images": x})["logits"]  # noqa: E731
    f32 = evaluate_bundle(bundles["f32"], images=str(root / "test.npz"), reference_logits=ref, record=False)
    int8 = evaluate_bundle(bundles["int8"], images=str(root / "test.npz"), reference_logits=ref, record=False)
    assert f32["backend"] == int8["backend"] == "tvm" and int8["n_images"] >= 300
    assert f32["accuracy"] == f32["accuracy_reference"] and f32["agreement"] == 1.0
    assert int8["accuracy"] >= f32["accuracy"] - 0.01, (int8, f32)
    m = json.loads((bundles["int8"] / "manifest.json").read_text())
    assert m["model"]["kind"] == "cnn" and set(m["plan"]["tensors"][n]["format"] for n in m["plan"]["tensors"]
                                                  if m["plan"]["tensors"][n]["format"] != "f32") == {"int8_wo"}
    meas = json.loads((bundles["int8"] / "measurements.json").read_text())
    assert meas["reference_check"]["backend"] == "tvm" and meas["reference_check"]["agreement"] >= 0.99


def test_digits_through_rpc_equals_local(digits_tvm):
    import socket
    import subprocess
    import sys
    import time

    from edgeq import runtime

    _, data, _, bundles = digits_tvm
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        x = data.x_test[:16]
        with runtime.load(bundles["int8"]) as s:
            local = s.run({"images": x})["logits"]
        with runtime.load(bundles["int8"], device=f"rpc://127.0.0.1:{port}") as r:
            remote = r.run({"images": x})["logits"]
        np.testing.assert_allclose(remote, local, atol=1e-6)
    finally:
        proc.kill()
        proc.wait(timeout=30)
